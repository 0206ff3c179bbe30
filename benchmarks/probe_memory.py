"""Peak memory of one probe against the number of evaluation items (issue 21: bounded in N).

Each size gets a fresh Python process that runs the probe stage function
(:func:`components.probe.probe`, 2 torch threads) on the base checkpoint with the
evaluation items repeated to N (copies with their own ids; every other setting as the
config gives it), after the model and the data were prepared once in the parent. A
sampling thread reads the process's PSS (``/proc/self/smaps_rollup``) every 50 ms; the
kernel's peak RSS (``VmHWM``) is read at the end. Printed per N: peak PSS, peak RSS,
seconds, and the ratio of each peak to the smallest N's (target: at most 1.15 at 2,000).

Usage:
    PYTHONPATH=. .venv/bin/python benchmarks/probe_memory.py [--config tests/configs/tiny.yaml] [--sizes 40 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _pss_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("Pss:")) / 1024


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024


def _config(config: str | None, overrides: list[str]):
    from components.registry import load_config

    return load_config(config_file=Path(config), overrides=overrides) if config else load_config(
        "capitals", overrides=overrides)


def child(home: Path, config: str | None, overrides: list[str], n: int) -> None:
    """Probe the base checkpoint on ``n`` evaluation items; print one JSON line."""
    import copy

    import torch

    from components.models import Checkpoint
    from components.probe import probe
    from components.runner import prepare

    torch.set_num_threads(2)
    cfg = _config(config, overrides)
    prep = prepare(cfg, home)
    data = prep["data"]
    items = []
    while len(items) < n:
        for it in data.eval[: n - len(items)]:
            c = copy.deepcopy(it)
            c.id = f"{it.id}~{len(items)}"
            items.append(c)
    data.eval = items
    peak = [_pss_mib()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _pss_mib())
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        probe(cfg, Checkpoint(**prep["base"]), data, Path(d))
    seconds = time.perf_counter() - t
    stop.set()
    th.join()
    print("RESULT " + json.dumps({"n": n, "peak_pss_mib": peak[0], "peak_rss_mib": _hwm_mib(), "seconds": seconds}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="a config file (default: the capitals suite)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--sizes", type=int, nargs="+", default=[40, 2000])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from pipelines.mlflow_env import default_home

    home = default_home()
    if args.child is not None:
        child(home, args.config, args.overrides, args.child)
        return
    from components.runner import prepare

    prepare(_config(args.config, args.overrides), home)  # model and data once, from the store after
    figures = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), *(["--config", args.config] if args.config else []),
               *sum((["--set", o] for o in args.overrides), [])]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            sys.exit(f"probe_memory: the run with {n} items failed:\n{r.stderr[-3000:]}")
        figures.append(json.loads(line[len("RESULT "):]))
    b = figures[0]
    print(f"config: {args.config or 'capitals'} {' '.join(args.overrides)}; 2 torch threads; "
          f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'items':>6s} {'peak PSS MiB':>12s} {'x first':>8s} {'peak RSS MiB':>12s} {'x first':>8s} {'seconds':>8s}")
    for f in figures:
        print(f"{f['n']:6d} {f['peak_pss_mib']:12.0f} {f['peak_pss_mib'] / b['peak_pss_mib']:8.2f}"
              f" {f['peak_rss_mib']:12.0f} {f['peak_rss_mib'] / b['peak_rss_mib']:8.2f} {f['seconds']:8.1f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
