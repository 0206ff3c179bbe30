"""LoRA training throughput of our loop vs a transformers ``Trainer`` + peft, vs the matmul rate.

All three are measured in one process on the same machine, model (SmolLM2-135M-Instruct
from the run folder's cache), data (capitals alignment items, prompt + response padded
to a fixed length) and batch (8 x 64 tokens):

- ``matmul``: the dense matmul rate of this CPU in the same dtype (square matrices).
- ``ours``: ``components.training.train`` (the loop every stage uses).
- ``trainer``: ``transformers.Trainer`` with the same peft ``LoraConfig``.

Achieved FLOP/s counts 4 x N x tokens per step for LoRA (forward 2N; backward 2N for the
input gradients; the frozen base weights get no weight gradients; the LoRA weights'
share is below 1%), N = parameters in the decoder's matrices, plus 4 x the output head's
parameters per position whose logits are computed: our loop computes them only where
the next token is an answer token (the Trainer computes them at every position, so
its useful tokens/s is what the two are compared on).

Usage:
    .venv/bin/python benchmarks/training_throughput.py [--steps 8] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from components.config import TrainConfig  # noqa: E402
from components.registry import load_config  # noqa: E402
from components.data import Item  # noqa: E402
from components.registry import SUITES  # noqa: E402
from components.base_model import resolve_model  # noqa: E402
from components.models import Checkpoint, load_checkpoint  # noqa: E402
from components.training import Encoded, collate, encode, train  # noqa: E402

BATCH, SEQ = 8, 64


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Dense matmul FLOP/s (2 n^3 per product) of this CPU in ``dtype``."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def fixed_length_items(items: list[Item], tok, n: int) -> list[Item]:
    """Items whose prompt + response fill at least SEQ tokens (longer ones are cut)."""
    out = []
    for it in items:
        if len(encode(tok, [it], 10_000)[0].input_ids) >= SEQ:
            out.append(it)
        if len(out) == n:
            return out
    # pad short responses with a repeated sentence so that every row is SEQ tokens
    for it in items:
        if len(out) == n:
            break
        out.append(Item(**{**it.to_dict(), "template": it.template + " That is a well known fact." * 4}))
    return out


def decoder_params(model) -> tuple[int, int]:
    """(parameters of the decoder's matrices, parameters of the output head)."""
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and p is not head)
    return body, head.numel()


def logit_share(tok, items: list[Item]) -> float:
    """Share of the positions whose next token is an answer token (where our loop
    computes logits), over all positions of ``items``."""
    enc = encode(tok, items, SEQ)
    return sum(sum(e.answer_mask[1:]) for e in enc) / sum(len(e.input_ids) for e in enc)


def run_ours(base: Checkpoint, items, steps: int, precision: str) -> tuple[float, float]:
    model, tok = load_checkpoint(base)
    cfg = TrainConfig(epochs=1, batch_size=BATCH, max_length=SEQ, lr=1e-4)
    stamps: list[tuple[float, int]] = []
    train(model, tok, items[: BATCH * (steps + 1)], cfg, 0, precision,
          on_step=lambda r: stamps.append((time.perf_counter(), r["tokens"])))
    # the first step warms up; measure the rest
    t0 = stamps[0][0]
    toks = sum(t for _, t in stamps[1:])
    return toks / (stamps[-1][0] - t0), toks


def run_trainer(base: Checkpoint, items, steps: int, precision: str) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, tok = load_checkpoint(base)
    cfg = TrainConfig()
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    enc = encode(tok, items[: BATCH * (steps + 1)], SEQ)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(enc)

        def __getitem__(self, i):
            return enc[i]

    def collator(batch: list[Encoded]):
        b = collate(batch, tok.pad_token_id)
        labels = b["input_ids"].masked_fill(b["answer_mask"] == 0, -100)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "cl-audit-trainer-bench"),
        per_device_train_batch_size=BATCH, max_steps=steps + 1, learning_rate=1e-4, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
        bf16=precision == "bf16", remove_unused_columns=False, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=DS(), data_collator=collator, callbacks=[Clock()]).train()
    toks = sum(len(e.input_ids) for e in enc[BATCH:BATCH * (steps + 1)])
    return toks / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config("capitals")
    from pipelines.mlflow_env import default_home  # the root of cl-audit (--home / CL_AUDIT_HOME)
    home = default_home()
    items = SUITES["capitals"].raw_items(4, 0)
    model_dir = resolve_model(cfg.model, home / "cache", [], 0)
    base = Checkpoint("base", str(model_dir))
    _, tok = load_checkpoint(base)
    batch_items = fixed_length_items(items, tok, BATCH * (args.steps + 1))
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    mm = matmul_rate(dtype)
    ours, _ = run_ours(base, batch_items, args.steps, args.precision)
    hf = run_trainer(base, batch_items, args.steps, args.precision)
    model, _ = load_checkpoint(base)
    body, head = decoder_params(model)
    measured = batch_items[BATCH: BATCH * (args.steps + 1)]  # the first step is warm-up
    share = logit_share(tok, measured)
    flops = 4 * (body + head * share) * ours
    print(f"threads={torch.get_num_threads()} precision={args.precision} batch={BATCH}x{SEQ} steps={args.steps}")
    print(f"matmul rate          : {mm / 1e9:8.1f} GFLOP/s   (logits at {share:.0%} of our positions)")
    print(f"ours (train loop)    : {ours:8.1f} tokens/s  {flops / 1e9:8.1f} GFLOP/s")
    print(f"Trainer + peft       : {hf:8.1f} tokens/s")
    print(f"ratio ours/Trainer   : {ours / hf:8.2f}x   (target >= 1.0)")
    print(f"ratio ours/matmul    : {flops / mm:8.1%}   (target >= 40%)")


if __name__ == "__main__":
    main()
