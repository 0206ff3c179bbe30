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

Prints for each: the wall time of ``run_sweep``, the stage executions (counted in the
stores' ``executions.log``), the seconds those stages computed for, and the median
duration of a trial in a warm trial process (after the first ``max_concurrent``); then
their ratios (target: reuse <= 0.4 of the naive wall time) and the largest difference
between the two sweeps' trial metrics (target: identical). The wall time includes what
reuse cannot remove: Ray Tune's start, the first trial processes importing torch, peft
and mlflow, and the driver's writing of the outputs.
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
from components.registry import load_config  # noqa: E402
from components.runner import prepare  # noqa: E402
from pipelines.dag import init_ray  # noqa: E402
from pipelines.sweep import run_sweep  # noqa: E402
from pipelines.sweep_analysis import CELL_COLUMNS, METRIC_COLUMNS  # noqa: E402

GRID = ["sweep.kl_penalty=[0.0,0.1,1.0]", "sweep.sizes=[1,2,4,6]", "sweep.arms=[in_task]", "sweep.max_concurrent=2"]


def executions(root: Path) -> tuple[Counter, float]:
    """Stage executions (by kind) in every store under ``root``, and the seconds those
    stages computed for (their ``result.json``); data preparation is left out."""
    out: Counter = Counter()
    seconds = 0.0
    for log in root.rglob("executions.log"):
        store = Store(log.parent)
        for key in store.executions():
            kind = key.split("-")[0]
            if kind != "filter":  # data preparation, done in the warm-up
                out[kind] += 1
                seconds += float(store.load(key).get("seconds", 0.0))
    return out, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra config override for both sweeps, e.g. --set model.tiny_layers=4")
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
                          overrides=[*GRID, *args.overrides, f"sweep.reuse={str(mode == 'reuse').lower()}"])
        # warm-up, outside the timing: the tiny model, the data split, and a Ray worker
        # that has imported torch (as run_sweep's own prepare task will find it)
        ray.get(ray.remote(num_cpus=cfg.ray.probe_cpus)(prepare).remote(cfg, str(home)))
        out = home / "sweep"
        load = os.getloadavg()[0]
        events: list[tuple[float, str]] = []
        t0 = time.perf_counter()
        summary = run_sweep(cfg, out, home, tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                            progress=lambda m: events.append((time.perf_counter() - t0, m)))
        wall = time.perf_counter() - t0
        assert summary["trials"]["finished"] == 12, summary["trials"]
        ex, stage_s = executions(home)
        table = pd.read_parquet(out / "sweep.parquet")
        # trials after the first max_concurrent ones run in warm trial processes
        warm = table.sort_values("trial_id").seconds.iloc[cfg.sweep.max_concurrent:]
        figures[mode] = {"wall_s": round(wall, 1), "stage_executions": sum(ex.values()), "by_stage": dict(ex),
                         "stage_compute_s": round(stage_s, 1), "warm_trial_median_s": round(float(warm.median()), 2),
                         "load_average_1min": [round(load, 1), round(os.getloadavg()[0], 1)]}
        tables[mode] = table.sort_values(CELL_COLUMNS).reset_index(drop=True)
        # where the wall time went: data preparation, Tune start, trials, outputs
        ready = next(t for t, m in events if m.startswith("model ready"))
        ends = [t for t, m in events if " finished: " in m]
        first_end = min(ends)
        figures[mode]["timeline_s"] = {"prepared": round(ready, 1), "first_trial_done": round(first_end, 1),
                                       "last_trial_done": round(max(ends), 1), "returned": round(wall, 1)}
        print(f"{mode:6s} wall {wall:7.1f} s   stage executions {sum(ex.values()):3d} {dict(sorted(ex.items()))}"
              f"   stage compute {stage_s:6.1f} s   warm trial (median) {warm.median():5.2f} s"
              f"   (load average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", flush=True)
        print(f"       timeline: data prepared {ready:.1f} s, first trial done {first_end:.1f} s, "
              f"last trial done {max(ends):.1f} s, outputs written {wall:.1f} s", flush=True)

    a, b = tables["naive"], tables["reuse"]
    assert a[CELL_COLUMNS].equals(b[CELL_COLUMNS])
    diff = np.nanmax(np.abs(a[METRIC_COLUMNS].to_numpy(float) - b[METRIC_COLUMNS].to_numpy(float)))
    same_nan = bool((a[METRIC_COLUMNS].isna() == b[METRIC_COLUMNS].isna()).all().all())
    same_labels = bool((a.label == b.label).all())
    ratio = figures["reuse"]["wall_s"] / figures["naive"]["wall_s"]
    ex_ratio = figures["reuse"]["stage_executions"] / figures["naive"]["stage_executions"]
    compute_ratio = figures["reuse"]["stage_compute_s"] / figures["naive"]["stage_compute_s"]
    warm_ratio = figures["reuse"]["warm_trial_median_s"] / figures["naive"]["warm_trial_median_s"]
    figures.update({"wall_ratio": round(ratio, 3), "execution_ratio": round(ex_ratio, 3),
                    "stage_compute_ratio": round(compute_ratio, 3), "warm_trial_ratio": round(warm_ratio, 3),
                    "overrides": args.overrides,
                    "max_abs_metric_diff": float(diff), "same_missing_values": same_nan, "same_labels": same_labels,
                    "grid": GRID, "work_folder": str(root)})
    print(f"ratio  wall {ratio:.3f} (target <= 0.4)   stage executions {ex_ratio:.3f}   "
          f"stage compute {compute_ratio:.3f}   warm trial {warm_ratio:.3f}")
    print(f"trial metrics: max |naive - reuse| = {diff:.3g}; same labels: {same_labels}; "
          f"same missing values: {same_nan}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
