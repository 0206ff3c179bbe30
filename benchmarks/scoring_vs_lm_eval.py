"""Our multiple-choice likelihood scorer vs lm-evaluation-harness's, side by side.

The same capitals items (prompt = the chat-formatted question; K continuations = the
response template filled with each candidate, then the end-of-turn token), the same
SmolLM2-135M-Instruct model object, in one process:

- ours: ``components.metrics.score_candidates`` (prompt + the candidates' common
  prefix run once per item, KV cache expanded over the K candidates, length-sorted
  batches, vocabulary logits only at continuation positions);
- lm-evaluation-harness: ``HFLM(pretrained=<the same model>).loglikelihood`` on
  ``(context, continuation)`` requests, its ``acc`` path.

Prints items/s of each (median of interleaved repeats, after a warm-up), their ratio,
and the share of items where both rank the same candidate first. lm-evaluation-harness
moves the context's trailing newline into the continuation, so its scores carry one
extra token that is the same for every candidate of an item; the largest difference
after removing that per-item constant is printed too.

Run (the model cache of ``cl-audit run capitals`` is reused via ``CL_AUDIT_HOME``)::

    pip install lm-eval==0.4.13          # the `bench` extra; it does not pull torch
    python benchmarks/scoring_vs_lm_eval.py --n-items 160 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-items", type=int, default=160, help="capitals items (4 candidates each)")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass, both scorers")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each scorer, interleaved")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from components.registry import SUITES
    from components.metrics import score_candidates
    from components.models import load_tokenizer, materialise_smollm2
    from components.training import format_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
    from pipelines.mlflow_env import default_home  # the root of cl-audit (--home / CL_AUDIT_HOME)
    home = default_home()
    model_dir = materialise_smollm2(home / "cache")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    tok = load_tokenizer(model_dir)
    items = SUITES["capitals"].raw_items(4, 0)[: args.n_items]
    K = len(items[0].candidates)

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device="cpu", dtype="float32")
    requests = [
        Instance("loglikelihood", {}, (format_prompt(tok, it.question), it.response(c) + tok.eos_token), n * K + k)
        for n, it in enumerate(items) for k, c in enumerate(it.candidates)
    ]

    def ours(sub):
        return score_candidates(model, tok, sub, args.batch_size).logprob

    def theirs(reqs):
        out = lm.loglikelihood(reqs, disable_tqdm=True)
        return np.array([lp for lp, _ in out]).reshape(-1, K)

    # warm-up (first calls allocate, build caches, tokenise the chat template)
    ours(items[:4])
    theirs(requests[: 4 * K])
    t_ours, t_theirs = [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            a = ours(items)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = theirs(requests)
            t_theirs.append(time.perf_counter() - t0)
    n = len(items)
    ips_ours = n / statistics.median(t_ours)
    ips_theirs = n / statistics.median(t_theirs)
    agree = float((a.argmax(1) == b.argmax(1)).mean())
    d = a - b
    resid = float(np.abs(d - d.mean(1, keepdims=True)).max())
    res = {
        "model": model_dir.name, "n_items": n, "candidates": K, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "lm_eval": lm_eval.__version__, "torch": torch.__version__,
        "items_per_s_ours": round(ips_ours, 2), "items_per_s_lm_eval": round(ips_theirs, 2),
        "throughput_ratio": round(ips_ours / ips_theirs, 2), "agreement": agree,
        "max_abs_logprob_diff_after_item_constant": resid,
        "seconds_ours": [round(t, 2) for t in t_ours], "seconds_lm_eval": [round(t, 2) for t in t_theirs],
        "knowledge_acc_ours": float((a.argmax(1) == 0).mean()),
        "knowledge_acc_lm_eval": float((b.argmax(1) == 0).mean()),
    }
    print(f"items: {n} x {K} candidates, batch {args.batch_size}, {res['threads']} threads, "
          f"lm-eval {lm_eval.__version__}, torch {torch.__version__}")
    print(f"ours:    {ips_ours:7.2f} items/s  (runs: {res['seconds_ours']} s)")
    print(f"lm-eval: {ips_theirs:7.2f} items/s  (runs: {res['seconds_lm_eval']} s)")
    print(f"throughput ratio (ours / lm-eval): {res['throughput_ratio']:.2f}x")
    print(f"same top candidate: {agree:.1%} of items; knowledge_acc ours {res['knowledge_acc_ours']:.3f}, "
          f"lm-eval {res['knowledge_acc_lm_eval']:.3f}")
    print(f"largest log-prob difference after the per-item constant: {resid:.2e} nats")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
