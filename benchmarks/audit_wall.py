"""Wall time and peak memory of the default audit, by stage, and the cost of orchestration.

Two runs of the same config, each with an empty stage store (the converted model cache
is shared, so neither pays the GGUF conversion):

1. ``direct``: the stage functions called one after another in this process (torch on
   all cores), no Ray, no MLflow. Gives the time of model load, the known-fact filter,
   each training stage and each probe.
2. ``orchestrated``: ``run_audit`` as ``cl-audit run`` does it: Ray tasks (stages in
   parallel where the DAG allows) and MLflow logging (sqlite).

The orchestration share is (orchestrated - direct) / orchestrated wall time; a negative
value means Ray's parallel stages more than paid for themselves. MLflow's share is the
time spent inside the tracker's calls. Peak RSS is sampled every 0.2 s over this process
and every Ray process together, as RSS and as PSS (shared library pages split between
the processes that map them).

Usage:
    .venv/bin/python benchmarks/audit_wall.py [--quick] [--set key=value ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402

from components.config import load_config  # noqa: E402


class RSSSampler:
    """Peaks (bytes) of the summed memory of this process and all Ray processes: RSS
    (shared pages such as torch's libraries counted once per process) and PSS (each
    shared page split between the processes that map it: what they use together)."""

    def __init__(self, period: float = 0.3):
        self.period, self.peak, self.peak_pss, self._stop = period, 0, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = pss = 0
            for p in psutil.process_iter(["pid", "cmdline"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if p.info["pid"] == me or cmd.startswith("ray::") or "raylet" in cmd or "gcs_server" in cmd:
                        full = p.memory_full_info()
                        total += full.rss
                        pss += full.pss
                except (psutil.Error, TypeError, AttributeError):
                    pass
            self.peak = max(self.peak, total)
            self.peak_pss = max(self.peak_pss, pss)
            time.sleep(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def fresh_home(src_cache: Path) -> Path:
    home = Path(tempfile.mkdtemp(prefix="cl-audit-bench-"))
    (home / "cache").symlink_to(src_cache)
    return home


def direct(cfg, home: Path) -> dict[str, float]:
    """Every stage function in this process, timed one by one."""
    import torch

    from components.models import Checkpoint, load_checkpoint
    from pipelines.dag import prepare, probe_stage, train_stage

    torch.set_num_threads(os.cpu_count() or 1)
    t: dict[str, float] = {}
    s = time.perf_counter()
    prep = prepare(cfg, home)
    t["prepare (model + known-fact filter)"] = time.perf_counter() - s
    s = time.perf_counter()
    load_checkpoint(Checkpoint(**prep["base"]))
    t["  of which one model load"] = time.perf_counter() - s
    data = prep["data"]
    base = {"checkpoint": prep["base"]}
    stages = {"base": base}
    s = time.perf_counter()
    stages["aligned"] = train_stage("tune", cfg, home, base, data)
    t["train tune"] = time.perf_counter() - s
    s = time.perf_counter()
    stages["perturbed"] = train_stage("perturb", cfg, home, stages["aligned"], data)
    t["train perturb"] = time.perf_counter() - s
    for arm in cfg.recover.arms:
        for n in cfg.recover.sizes:
            s = time.perf_counter()
            stages[f"recovered/{arm}/{n}"] = train_stage("recover", cfg, home, stages["perturbed"], data, arm, n)
            t[f"train recover {arm}/{n}"] = time.perf_counter() - s
    for name, st in stages.items():
        s = time.perf_counter()
        probe_stage(cfg, home, st, data)
        t[f"probe {name}"] = time.perf_counter() - s
    return t


def orchestrated(cfg, home: Path) -> tuple[float, float]:
    """``run_audit`` through Ray and MLflow; returns (wall seconds, seconds inside MLflow calls)."""
    import ray

    from pipelines import tracking
    from pipelines.audit import run_audit

    spent = [0.0]
    for name in ("__init__", "start", "stage", "finish"):
        orig = getattr(tracking.AuditTracker, name)

        def timed(self, *a, _orig=orig, **k):
            s = time.perf_counter()
            try:
                return _orig(self, *a, **k)
            finally:
                spent[0] += time.perf_counter() - s

        setattr(tracking.AuditTracker, name, timed)
    s = time.perf_counter()
    run_audit(cfg, home / "out", home)
    wall = time.perf_counter() - s
    ray.shutdown()
    return wall, spent[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--keep", type=Path, default=None,
                    help="copy the orchestrated run's folder (summary.json, ...) here, e.g. to compare precisions")
    args = ap.parse_args()
    cfg = load_config("capitals", overrides=args.overrides, quick=args.quick)
    cache = Path(os.environ.get("CL_AUDIT_HOME", "runs")).resolve() / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    h1 = fresh_home(cache)
    with RSSSampler() as rss_d:
        s = time.perf_counter()
        stages = direct(cfg, h1)
        direct_wall = time.perf_counter() - s
    h2 = fresh_home(cache)
    with RSSSampler() as rss_o:
        orch_wall, mlflow_s = orchestrated(cfg, h2)

    print(f"config: capitals{' --quick' if args.quick else ''} {' '.join(args.overrides)}; cores={os.cpu_count()}")
    print(f"{'stage (direct, in-process)':42s} {'seconds':>8s}")
    for k, v in stages.items():
        print(f"{k:42s} {v:8.1f}")
    print(f"{'direct total':42s} {direct_wall:8.1f}   peak RSS {rss_d.peak / 2**30:.2f} GiB"
          f"   peak PSS {rss_d.peak_pss / 2**30:.2f} GiB")
    print(f"{'orchestrated (Ray + MLflow) total':42s} {orch_wall:8.1f}   peak RSS {rss_o.peak / 2**30:.2f} GiB"
          f"   peak PSS {rss_o.peak_pss / 2**30:.2f} GiB (summed over processes)")
    print(f"{'  of which inside MLflow calls':42s} {mlflow_s:8.1f}   ({mlflow_s / orch_wall:.1%} of wall)")
    print(f"orchestration share (orchestrated - direct) / orchestrated: {(orch_wall - direct_wall) / orch_wall:+.1%}")
    if args.keep:
        shutil.copytree(h2 / "out", args.keep, dirs_exist_ok=True)
    for h in (h1, h2):
        shutil.rmtree(h, ignore_errors=True)


if __name__ == "__main__":
    main()
