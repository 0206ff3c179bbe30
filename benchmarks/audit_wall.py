"""Wall time and peak memory of the default audit, by stage, and the cost of orchestration.

Two runs of the same config, each with an empty stage store (the converted model cache
is shared, so neither pays the GGUF conversion):

1. ``orchestrated``: ``run_audit`` as ``cl-audit run`` does it: Ray tasks (stages in
   parallel where the DAG allows; the workers on mimalloc unless ``CL_AUDIT_MALLOC=system``)
   and MLflow logging (sqlite). It runs first, so the driver holds what ``cl-audit run``'s
   does (no torch, no model).
2. ``direct``: the stage functions called one after another in this process (torch on
   all cores), no Ray, no MLflow. Gives the time of model load, the known-fact filter,
   each training stage and each probe.

The orchestration share is (orchestrated - direct) / orchestrated wall time; a negative
value means Ray's parallel stages more than paid for themselves. MLflow's share is the
time spent inside the tracker's calls. Peak memory is sampled every 0.3 s over this
process and every process it started (Ray's GCS, raylet, dashboard, log monitor,
autoscaler monitor, agents and workers), as RSS and as PSS (shared library pages split
between the processes that map them); the per-process split at the peak is printed
after the totals (``--trace FILE`` keeps every sample).

Usage:
    .venv/bin/python benchmarks/audit_wall.py [--quick] [--set key=value ...] [--keep DIR] [--only direct|orchestrated]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402

from components.registry import load_config  # noqa: E402


# Ray's own processes, by a word of their command line (also their short name here)
RAY_SERVICES = ("raylet", "gcs_server", "log_monitor", "dashboard_agent", "runtime_env", "default_worker.py",
                "monitor.py")
RAY_MARKERS = ("ray::", "ray/_private", "ray/dashboard", *RAY_SERVICES)


def short_name(cmd: str, pid: int, me: int) -> str:
    """A short label for a process of the audit: ``driver``, ``ray::probe_stage``,
    ``ray::IDLE``, ``raylet``, ``gcs_server``, ``log_monitor``, ..."""
    if pid == me:
        return "driver"
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    for key in RAY_SERVICES:
        if key in cmd:
            return key
    first = cmd.split()[0] if cmd else "?"
    return Path(first).name + (" " + Path(cmd.split()[1]).name if len(cmd.split()) > 1 else "")


class RSSSampler:
    """Peaks (bytes) of the summed memory of this process and every process it started
    (Ray's GCS, raylet, log monitor, dashboard agents, workers: all descendants of the
    driver under a local ``ray.init``): RSS (shared pages such as torch's libraries
    counted once per process) and PSS (each shared page split between the processes
    that map it: what they use together).

    ``peak_split`` holds, for the sample with the highest summed RSS, one
    ``(pid, name, rss, pss)`` per process (bytes). ``strays`` records Ray-looking
    processes that are *not* descendants of this one (another user's Ray, or a process
    Ray re-parented to init): pid -> its largest RSS; they are not counted.
    """

    def __init__(self, period: float = 0.3, trace: Path | None = None):
        self.trace, self._t0 = trace, time.time()
        self.period, self.peak, self.peak_pss, self._stop = period, 0, 0, threading.Event()
        self.peak_split: list[tuple[int, str, int, int]] = []
        self.peak_pss_split: list[tuple[int, str, int, int]] = []
        self.strays: dict[int, int] = {}
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> list[tuple[int, str, int, int]]:
        me = psutil.Process()
        ours = {me.pid, *(c.pid for c in me.children(recursive=True))}
        split = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                pid = p.info["pid"]
                if pid in ours:
                    full = p.memory_full_info()
                    split.append((pid, short_name(cmd, pid, me.pid), full.rss, full.pss))
                elif any(m in cmd for m in RAY_MARKERS):
                    self.strays[pid] = max(self.strays.get(pid, 0), p.memory_info().rss)
            except (psutil.Error, TypeError, AttributeError):
                pass
        return split

    def _run(self) -> None:
        trace = open(self.trace, "a") if self.trace is not None else None  # open once, not per sample
        try:
            self._loop(trace)
        finally:
            if trace is not None:
                trace.close()

    def _loop(self, trace) -> None:
        while not self._stop.is_set():
            split = self._sample()
            total, pss = sum(s[2] for s in split), sum(s[3] for s in split)
            if trace is not None:
                trace.write(json.dumps({"t": round(time.time() - self._t0, 1), "rss": total, "pss": pss,
                                        "procs": split}) + "\n")
            if total > self.peak:
                self.peak, self.peak_split = total, split
            if pss > self.peak_pss:
                self.peak_pss, self.peak_pss_split = pss, split
            time.sleep(self.period)

    def report(self, title: str) -> str:
        """The per-process split at the summed-RSS peak (and at the PSS peak), as text."""
        lines = []
        for what, split in (("RSS", self.peak_split), ("PSS", self.peak_pss_split)):
            tot_r, tot_p = sum(s[2] for s in split), sum(s[3] for s in split)
            lines.append(f"{title}: processes at the summed-{what} peak (RSS {tot_r / 2**30:.2f} GiB, "
                         f"PSS {tot_p / 2**30:.2f} GiB)")
            lines.append(f"  {'pid':>7s} {'process':32s} {'RSS MiB':>9s} {'PSS MiB':>9s}")
            for pid, name, rss, pss in sorted(split, key=lambda s: -s[2]):
                lines.append(f"  {pid:7d} {name[:32]:32s} {rss / 2**20:9.0f} {pss / 2**20:9.0f}")
        if self.strays:
            lines.append(f"{title}: {len(self.strays)} Ray-looking processes outside this process tree seen "
                         f"(another Ray on the machine; not counted), largest RSS "
                         f"{max(self.strays.values()) / 2**20:.0f} MiB")
        return "\n".join(lines)

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
    from components.runner import prepare, probe as probe_stage, train as train_stage

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
    ap.add_argument("--trace", type=Path, default=None,
                    help="append every memory sample of the orchestrated run (per process) to this JSON-lines file")
    ap.add_argument("--only", choices=("direct", "orchestrated"), default=None,
                    help="run only one of the two runs (no orchestration share then)")
    args = ap.parse_args()
    cfg = load_config("capitals", overrides=args.overrides, quick=args.quick)
    from pipelines.mlflow_env import default_home  # the root of cl-audit (--home / CL_AUDIT_HOME)
    cache = default_home() / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    # The orchestrated run goes first, so that its driver has imported what `cl-audit run`
    # imports and no more (the direct run loads torch and the model into this process).
    homes, stages, rss_d, rss_o, orch_home = [], {}, None, None, None
    if args.only != "direct":
        orch_home = fresh_home(cache)
        homes.append(orch_home)
        with RSSSampler(trace=args.trace) as rss_o:
            orch_wall, mlflow_s = orchestrated(cfg, orch_home)
    if args.only != "orchestrated":
        homes.append(fresh_home(cache))
        with RSSSampler() as rss_d:
            s = time.perf_counter()
            stages = direct(cfg, homes[-1])
            direct_wall = time.perf_counter() - s

    from pipelines.dag import worker_allocator_env

    print(f"config: capitals{' --quick' if args.quick else ''} {' '.join(args.overrides)}; cores={os.cpu_count()}"
          f"; load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    alloc = "mimalloc" if worker_allocator_env() else "system malloc"
    print(f"allocator: orchestrated stage workers {alloc}; this process (driver, direct run) system malloc")
    if rss_d is not None:
        print(f"{'stage (direct, in-process)':42s} {'seconds':>8s}")
        for k, v in stages.items():
            print(f"{k:42s} {v:8.1f}")
        print(f"{'direct total':42s} {direct_wall:8.1f}   peak RSS {rss_d.peak / 2**30:.2f} GiB"
              f"   peak PSS {rss_d.peak_pss / 2**30:.2f} GiB")
    if rss_o is not None:
        print(f"{'orchestrated (Ray + MLflow) total':42s} {orch_wall:8.1f}   peak RSS {rss_o.peak / 2**30:.2f} GiB"
              f"   peak PSS {rss_o.peak_pss / 2**30:.2f} GiB (summed over processes)")
        print(f"{'  of which inside MLflow calls':42s} {mlflow_s:8.1f}   ({mlflow_s / orch_wall:.1%} of wall)")
    if rss_d is not None and rss_o is not None:
        print(f"orchestration share (orchestrated - direct) / orchestrated: {(orch_wall - direct_wall) / orch_wall:+.1%}")
    if rss_o is not None:
        print(rss_o.report("orchestrated"))
    if args.keep and rss_o is not None:
        shutil.copytree(orch_home / "out", args.keep, dirs_exist_ok=True)
    for h in homes:
        shutil.rmtree(h, ignore_errors=True)


if __name__ == "__main__":
    main()
