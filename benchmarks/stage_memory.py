"""Peak memory and time of the default audit's stages in one process, per memory allocator.

Each allocator gets a fresh Python process that runs ``tune``, ``perturb`` and the probe of
the perturbed checkpoint (the stage functions the Ray workers run, 2 torch threads), with
the known-fact filter and the converted model taken from the cache:

- ``system``: glibc's malloc, as a plain ``python`` has it;
- ``mimalloc``: the ``cmeel-mimalloc`` library preloaded (``LD_PRELOAD``), what the local
  Ray's stage workers use by default (``pipelines.dag.worker_allocator_env``);
- ``system-mmap256k``: glibc with a fixed 256 KiB mmap threshold
  (``MALLOC_MMAP_THRESHOLD_=262144``): every larger block goes back to the OS when freed,
  which shows how much of glibc's peak is freed memory it kept, not live tensors.

The kernel's peak RSS of the process (``VmHWM``, reset before each stage) gives each
stage's exact peak; it, the stage's seconds and the ratios to ``system`` are printed,
and the stage results are checked to be the same under every allocator (the losses of
every step, the probe's metrics).

Usage:
    PYTHONPATH=. .venv/bin/python benchmarks/stage_memory.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STAGES = ("tune", "perturb", "probe perturbed")


def _status_mib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last reset) of this process, MiB."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) // 1024 for x in f if x.startswith(field))


def _reset_peak() -> None:
    """Start a new ``VmHWM`` peak at the current RSS (Linux >= 4.0: ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(home: Path, overrides: list[str]) -> None:
    """Run the stages in this process and print one JSON line of figures."""
    import torch

    from components.registry import load_config
    from components.runner import prepare, probe as probe_stage, train as train_stage

    torch.set_num_threads(2)
    cfg = load_config("capitals", overrides=overrides)
    prep = prepare(cfg, home)
    out: dict = {}
    results = {}
    stage = {"checkpoint": prep["base"]}
    for name in STAGES:
        _reset_peak()
        s = time.perf_counter()
        if name == "tune":
            stage = results[name] = train_stage("tune", cfg, home, stage, prep["data"])
        elif name == "perturb":
            stage = results[name] = train_stage("perturb", cfg, home, stage, prep["data"])
        else:
            results[name] = probe_stage(cfg, home, stage, prep["data"])
        out[name] = {"seconds": time.perf_counter() - s, "peak_mib": _status_mib("VmHWM"),
                     "after_mib": _status_mib("VmRSS")}
    out["losses"] = [[h["loss"] for h in results[k]["history"]] for k in ("tune", "perturb")]
    out["metrics"] = {k: v["value"] for k, v in results["probe perturbed"]["metrics"].items()}
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.overrides)
        return

    from components.registry import load_config
    from components.runner import prepare
    from pipelines.dag import worker_allocator_env

    os.environ.pop("CL_AUDIT_MALLOC", None)
    os.environ.pop("RAY_ADDRESS", None)
    mimalloc = worker_allocator_env()
    if not mimalloc:
        sys.exit("stage_memory: the cmeel-mimalloc wheel is not installed (Linux only)")
    from pipelines.mlflow_env import default_home  # the root of cl-audit (--home / CL_AUDIT_HOME)
    cache = default_home() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    # the known-fact filter once, shared by every child (its store entry is copied)
    seed_home = Path(tempfile.mkdtemp(prefix="cl-audit-stagemem-"))
    (seed_home / "cache").symlink_to(cache)
    prepare(load_config("capitals", overrides=args.overrides), seed_home)
    variants = {"system": {}, "mimalloc": mimalloc, "system-mmap256k": {"MALLOC_MMAP_THRESHOLD_": "262144"}}
    figures = {}
    for name, env in variants.items():
        home = Path(tempfile.mkdtemp(prefix=f"cl-audit-stagemem-{name}-"))
        (home / "cache").symlink_to(cache)
        shutil.copytree(seed_home / "store", home / "store", ignore=shutil.ignore_patterns("*.lock", "executions.log"))
        cmd = [sys.executable, __file__, "--child", str(home), *sum((["--set", o] for o in args.overrides), [])]
        clean = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
        r = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            sys.exit(f"stage_memory: the {name} run failed:\n{r.stderr[-3000:]}")
        figures[name] = json.loads(line[len("RESULT "):])
        shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(seed_home, ignore_errors=True)

    base = figures["system"]
    print(f"config: capitals {' '.join(args.overrides)}; cores={os.cpu_count()}; 2 torch threads; "
          f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'stage':18s} {'allocator':16s} {'peak RSS MiB':>12s} {'x system':>9s} {'seconds':>8s} {'x system':>9s}"
          f" {'RSS after':>9s}")
    for stage in STAGES:
        for name, f in figures.items():
            st, b = f[stage], base[stage]
            print(f"{stage:18s} {name:16s} {st['peak_mib']:12d} {st['peak_mib'] / b['peak_mib']:9.2f}"
                  f" {st['seconds']:8.1f} {st['seconds'] / b['seconds']:9.2f} {st['after_mib']:9d}")
    same = all(f["losses"] == base["losses"] and f["metrics"] == base["metrics"] for f in figures.values())
    print(f"step losses and probe metrics identical under every allocator: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
