"""Stage reuse in the sweep: the same 3 x 4 grid twice, reuse off vs on.

    PYTHONPATH=. python benchmarks/sweep_reuse.py [--home DIR] [--json FILE]

The grid is perturb.kl_penalty in {0, 0.1, 1} x recover.size in {1, 2, 4, 6} (in-task
arm) on the tiny suite (``tests/configs/tiny.yaml``), 2 trials at a time. Both sweeps run
in this process on one local Ray, after a warm-up that builds the tiny model and splits
the data (so neither pays for that):

- naive (``sweep.reuse=false``): every trial computes every stage (tune, perturb,
  recover and four probes) in a private store;
- reuse (``sweep.reuse=true``): the trials share one content-addressed store, so tune
  runs once, perturb once per penalty, recover + probe once per cell.

Prints the wall time and the stage executions (counted in the stores'
``executions.log``) of each, their ratio (target: reuse <= 0.4 of naive wall time), and
the largest difference between the two sweeps' trial metrics (target: identical).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import ray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.artifacts import Store  # noqa: E402
from components.config import load_config  # noqa: E402
from pipelines.dag import init_ray, prepare  # noqa: E402
from pipelines.sweep import CELL_COLUMNS, METRIC_COLUMNS, run_sweep  # noqa: E402

GRID = ["sweep.kl_penalty=[0.0,0.1,1.0]", "sweep.sizes=[1,2,4,6]", "sweep.arms=[in_task]", "sweep.max_concurrent=2"]


def executions(root: Path) -> Counter:
    """Stage executions (by kind) in every store under ``root``."""
    out: Counter = Counter()
    for log in root.rglob("executions.log"):
        out.update(k.split("-")[0] for k in Store(log.parent).executions())
    out.pop("filter", None)  # data preparation, done in the warm-up
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    root = (args.home or Path(tempfile.mkdtemp(prefix="sweep-reuse-"))).resolve()
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    init_ray()
    figures = {}
    tables = {}
    for mode in ("naive", "reuse"):
        home = root / mode
        home.mkdir(exist_ok=True)
        if not (home / "cache").exists():
            (home / "cache").symlink_to(cache, target_is_directory=True)
        cfg = load_config(config_file=ROOT / "tests" / "configs" / "tiny.yaml",
                          overrides=[*GRID, f"sweep.reuse={str(mode == 'reuse').lower()}"])
        # warm-up, outside the timing: the tiny model, the data split, and a Ray worker
        # that has imported torch (as run_sweep's own prepare task will find it)
        ray.get(ray.remote(num_cpus=cfg.ray.probe_cpus)(prepare).remote(cfg, str(home)))
        out = home / "sweep"
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        summary = run_sweep(cfg, out, home, tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
        wall = time.perf_counter() - t0
        assert summary["trials"]["finished"] == 12, summary["trials"]
        ex = executions(home)
        figures[mode] = {"wall_s": round(wall, 1), "stage_executions": sum(ex.values()), "by_stage": dict(ex),
                         "load_average_1min": [round(load, 1), round(os.getloadavg()[0], 1)]}
        tables[mode] = pd.read_parquet(out / "sweep.parquet").sort_values(CELL_COLUMNS).reset_index(drop=True)
        print(f"{mode:6s} wall {wall:7.1f} s   stage executions {sum(ex.values()):3d}  {dict(sorted(ex.items()))}"
              f"   (load average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", flush=True)

    a, b = tables["naive"], tables["reuse"]
    assert a[CELL_COLUMNS].equals(b[CELL_COLUMNS])
    diff = np.nanmax(np.abs(a[METRIC_COLUMNS].to_numpy(float) - b[METRIC_COLUMNS].to_numpy(float)))
    same_nan = bool((a[METRIC_COLUMNS].isna() == b[METRIC_COLUMNS].isna()).all().all())
    same_labels = bool((a.label == b.label).all())
    ratio = figures["reuse"]["wall_s"] / figures["naive"]["wall_s"]
    ex_ratio = figures["reuse"]["stage_executions"] / figures["naive"]["stage_executions"]
    figures.update({"wall_ratio": round(ratio, 3), "execution_ratio": round(ex_ratio, 3),
                    "max_abs_metric_diff": float(diff), "same_missing_values": same_nan, "same_labels": same_labels,
                    "grid": GRID, "work_folder": str(root)})
    print(f"ratio  wall {ratio:.3f} (target <= 0.4)   stage executions {ex_ratio:.3f}")
    print(f"trial metrics: max |naive - reuse| = {diff:.3g}; same labels: {same_labels}; "
          f"same missing values: {same_nan}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
