"""Where the seconds of one probe go, and how far each part is from this CPU's matmul rate.

Runs the probe stage function (:func:`components.probe.probe`, 2 torch threads) on the
base checkpoint twice in one process: once timed, each part wrapped with a
``perf_counter`` (generation of the evaluation and perturbation answers, candidate
scoring with the pool bounds and the KL reference rows, the all-answers ranking rounds,
the hidden states of every layer, the linear probes, model load, files), then once under
``torch.utils.flop_counter.FlopCounterMode`` to count each part's FLOPs (matmuls and
attention). The KL drift of ``assess`` (two references, read from the probe's file) is
timed after. The dense fp32 matmul rate (2048 x 2048, as ``training_throughput.py``
measures it) is measured in the same process. Prints a markdown table (seconds, share,
GFLOP, GFLOP/s and the share of the matmul rate) and writes the figures as JSON.

Usage:
    PYTHONPATH=. .venv/bin/python benchmarks/probe_profile.py capitals            # the default audit
    PYTHONPATH=. .venv/bin/python benchmarks/probe_profile.py tests/configs/tiny.yaml
"""
import os, sys, time, json, tempfile
sys.path.insert(0, os.getcwd())
import torch
torch.set_num_threads(2)
from pathlib import Path
from components.registry import load_config
from components.runner import prepare
import components.probe as P, components.knowledge as K, components.linear_probe as LP
from components.models import Checkpoint
from torch.utils.flop_counter import FlopCounterMode
from contextlib import nullcontext
COUNT=[False]
class _C:
    def __init__(self): self.m = FlopCounterMode(display=False) if COUNT[0] else None
    def __enter__(self):
        if self.m: self.m.__enter__()
        return self
    def __exit__(self,*a):
        if self.m: self.m.__exit__(*a)
    def total(self): return self.m.get_total_flops() if self.m else 0


suite_cfg = sys.argv[1]
from pipelines.mlflow_env import default_home
home = default_home()
cfg = load_config(config_file=Path(suite_cfg)) if suite_cfg.endswith(".yaml") else load_config(suite_cfg, quick=len(sys.argv) > 2)
prep = prepare(cfg, home)
data = prep["data"]
ckpt = Checkpoint(**prep["base"])
sect = {}
flops = {}
cur = []
def wrap(mod, name, label):
    f = getattr(mod, name)
    def g(*a, **k):
        if cur:  # nested: attribute to outer
            return f(*a, **k)
        cur.append(label)
        t = time.perf_counter()
        with _C() as pr:
            r = f(*a, **k)
        dt = time.perf_counter() - t
        if COUNT[0]: flops[label] = flops.get(label, 0) + pr.total()
        else: sect[label] = sect.get(label, 0) + dt
        cur.pop()
        return r
    setattr(mod, name, g)
gen_calls = [0]
orig_gen = P.generate_answers
def gen(model, tok, items, *a, **k):
    gen_calls[0] += 1
    label = "generation (eval)" if gen_calls[0] == 1 else "generation (perturb eval)"
    t = time.perf_counter()
    with _C() as pr:
        r = orig_gen(model, tok, items, *a, **k)
    if COUNT[0]: flops[label] = pr.total()
    else: sect[label] = time.perf_counter() - t
    return r
P.generate_answers = gen
wrap(K, "score_candidates", "candidate scoring (K + pool bounds + gold rows)")
wrap(K, "_score_ragged", "knowledge ranking (all answers)")
wrap(P, "prompt_features", "hidden states (every layer)")
wrap(P, "layer_probes", "linear probes (sklearn)")
wrap(P, "load_checkpoint", "model load")
wrap(P, "save_file", "save files")
def mm_rate(n=2048, reps=10):
    a = torch.randn(n, n); b = torch.randn(n, n)
    for _ in range(2): a @ b
    t = time.perf_counter()
    for _ in range(reps): a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)
rate = mm_rate()
with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    res = P.probe(cfg, ckpt, data, Path(d))
    total = time.perf_counter() - t
    # KL drift as assess computes it (base vs itself, both refs)
    from components.metrics import drift_kl
    t = time.perf_counter()
    ref = P.load_ref_logprobs(Path(d)); lens = __import__("numpy").array(res["answer_tokens"])
    for _ in range(2): drift_kl(ref, ref, lens)
    sect["KL drift (assess, 2 refs, load + compute)"] = time.perf_counter() - t
    refshape = tuple(ref.shape)
COUNT[0] = True; gen_calls[0] = 0
with tempfile.TemporaryDirectory() as d:
    P.probe(cfg, ckpt, data, Path(d))
rows = []
other = total - sum(v for k, v in sect.items() if not k.startswith("KL"))
print(f"suite config {suite_cfg}: {len(data.eval)} eval items, {len(data.perturb_eval)} perturb items, ref rows {refshape}")
print(f"matmul rate (fp32, 2048^2, 2 threads): {rate/1e9:.1f} GFLOP/s")
print(f"probe total: {total:.2f} s")
print("| part | s | share | GFLOP | GFLOP/s | of matmul rate |")
print("|---|---:|---:|---:|---:|---:|")
for k, v in sect.items():
    fl = flops.get(k, 0)
    print(f"| {k} | {v:.2f} | {v/total:.0%} | {fl/1e9:.1f} | {fl/1e9/v:.1f} | {fl/v/rate:.0%} |")
print(f"| other (metrics, bootstrap, parquet) | {other:.2f} | {other/total:.0%} | | | |")
json.dump({"suite": suite_cfg, "total": total, "sections": sect, "flops": flops, "matmul": rate,
           "metrics": {k: v["value"] for k, v in res["metrics"].items()}}, open(os.environ.get("PROBE_PROFILE_JSON", f"probe_profile.{os.path.basename(suite_cfg)}.json"), "w"), indent=1)
