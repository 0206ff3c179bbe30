"""The training loop shared by tune, perturb and recover: LoRA or full, KL penalty, freezing.

Loss per batch (B sequences, T tokens, V vocabulary entries)::

    loss = CE(answer tokens) + kl_penalty * mean_t KL(pi_ref(.|x_<t) || pi(.|x_<t))

over answer-token positions only, teacher-forced. With LoRA the reference pi_ref is the
same weights with the adapter disabled (no second copy of the model); with full
fine-tuning it is a frozen copy of the starting weights. Label masks come from the
answer span (and the attention mask), never from the pad id: SmolLM2 uses
``<|im_end|>`` as both pad and eos, and the end-of-answer token must be learned.
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from components.config import TrainConfig
from components.data import Item
from components.errors import TrainingDiverged


def format_prompt(tok, question: str) -> str:
    """The chat-formatted prompt for a question, ending where the assistant's answer starts."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {question}\nAnswer: "


@dataclass
class Encoded:
    """One tokenised example: ``input_ids`` (T,) and ``answer_mask`` (T,), 1 on answer tokens."""

    input_ids: list[int]
    answer_mask: list[int]


def encode(tok, items: list[Item], max_length: int) -> list[Encoded]:
    """Tokenise prompt + response + eos; the answer mask marks the response and the eos token."""
    out = []
    for it in items:
        p = tok(format_prompt(tok, it.question), add_special_tokens=False)["input_ids"]
        a = tok(it.response(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + a)[:max_length]
        mask = ([0] * len(p) + [1] * len(a))[:max_length]
        out.append(Encoded(ids, mask))
    return out


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Returns ``input_ids``, ``attention_mask``, ``answer_mask``: (B, T)."""
    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), T), dtype=torch.long)
    ans = torch.zeros((len(batch), T), dtype=torch.long)
    for b, e in enumerate(batch):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        att[b, :n] = 1
        ans[b, :n] = torch.tensor(e.answer_mask)
    return {"input_ids": ids, "attention_mask": att, "answer_mask": ans * att}


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean forward KL(pi_ref || pi) over masked positions.

    Args:
        ref_logits, logits: (B, T, V) next-token logits of the reference and the model.
        mask: (B, T) 1 where the position counts.

    Returns:
        Scalar tensor, nats per token (Shenfeld et al. 2025 measure drift this way).
    """
    ref_lp = F.log_softmax(ref_logits.float(), dim=-1)
    lp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
    m = mask.float()
    return (kl * m).sum() / m.sum().clamp(min=1)


def _answer_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets shifted by one: position t predicts token t+1. Returns (labels, mask), (B, T-1)."""
    return batch["input_ids"][:, 1:], batch["answer_mask"][:, 1:]


def attach_lora(model, cfg: TrainConfig):
    """Wrap ``model`` in a peft LoRA model on all linear layers above ``cfg.freeze_layers``."""
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    layers = list(range(min(cfg.freeze_layers, n_layers), n_layers))
    if not layers:
        raise TrainingDiverged(f"freeze_layers: {cfg.freeze_layers} freezes all {n_layers} layers; nothing to train")
    target: str | list[str] = "all-linear"
    if cfg.freeze_layers > 0:
        # peft refuses "all-linear" together with layers_to_transform: name the decoder
        # layers' linear modules instead (q_proj, ..., down_proj for Llama).
        target = sorted({
            n.rsplit(".", 1)[-1] for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n
        })
    lcfg = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=target, task_type="CAUSAL_LM",
        layers_to_transform=layers if cfg.freeze_layers > 0 else None,
        layers_pattern="layers" if cfg.freeze_layers > 0 else None,
    )
    return get_peft_model(model, lcfg)


def freeze_bottom(model, k: int) -> None:
    """Full fine-tuning: stop gradients to the embeddings and the bottom ``k`` decoder layers."""
    if k <= 0:
        return
    for p in model.get_input_embeddings().parameters():
        p.requires_grad_(False)
    for layer in model.model.layers[:k]:
        for p in layer.parameters():
            p.requires_grad_(False)


def train(
    model,
    tok,
    items: list[Item],
    cfg: TrainConfig,
    seed: int,
    precision: str = "fp32",
    stage: str = "train",
    on_step: Callable[[dict], None] | None = None,
):
    """Train ``model`` on ``items`` with cross-entropy on answer tokens plus the KL penalty.

    Args:
        model: a merged ``PreTrainedModel`` (fp32); LoRA is attached here when
            ``cfg.method == "lora"``.
        items: the stage's training items (prompt + gold answer).
        cfg: the stage's :class:`TrainConfig`.
        precision: ``fp32`` or ``bf16`` (CPU autocast).
        on_step: called after each optimiser step with the step's record plus
            ``total_steps`` (the number of steps of the whole stage), e.g. for progress.

    Returns:
        ``(model, history)``: the trained model (a ``PeftModel`` for LoRA) and one dict per
        step: ``step``, ``epoch``, ``loss``, ``ce``, ``kl`` (nats/token), ``tokens``.

    Raises:
        TrainingDiverged: the loss became NaN or infinite (nothing is saved).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if cfg.method == "lora":
        model = attach_lora(model, cfg)
        ref_model = None
    else:
        ref_model = copy.deepcopy(model).eval() if cfg.kl_penalty > 0 else None
        freeze_bottom(model, cfg.freeze_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    enc = encode(tok, items, cfg.max_length)
    steps_per_epoch = math.ceil(len(enc) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(total, 1))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    history: list[dict] = []
    model.train()
    step = 0
    for epoch in range(cfg.epochs):
        order = list(range(len(enc)))
        rng.shuffle(order)
        for s in range(steps_per_epoch):
            batch = collate([enc[i] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]], tok.pad_token_id)
            labels, mask = _answer_positions(batch)
            with amp:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits[:, :-1].float()
            ce_tok = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none")
            m = mask.reshape(-1).float()
            ce = (ce_tok * m).sum() / m.sum().clamp(min=1)
            kl = torch.zeros(())
            if cfg.kl_penalty > 0:
                with torch.no_grad(), amp:
                    if ref_model is None:
                        with model.disable_adapter():
                            ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    else:
                        ref = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                kl = token_kl(ref[:, :-1], logits, mask)
            loss = ce + cfg.kl_penalty * kl
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"{stage}: loss became {loss.item()} at step {step} (lr={cfg.lr}); stage stopped, "
                    "earlier artifacts kept"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            rec = {
                "step": step, "epoch": epoch, "loss": loss.item(), "ce": ce.item(), "kl": kl.item(),
                "tokens": int(batch["attention_mask"].sum()),
            }
            history.append(rec)
            if on_step is not None:
                on_step({**rec, "total_steps": total})
            step += 1
    model.eval()
    return model, history


@dataclass
class StageResult:
    """What a training stage returns: its checkpoint and its per-step history."""

    checkpoint: "object"
    history: list[dict]
    n_items: int


def train_checkpoint(
    name: str, parent, items: list[Item], cfg: TrainConfig, seed: int, precision: str, out_dir,
    trust_remote_code: bool = False, on_step: Callable[[dict], None] | None = None,
) -> StageResult:
    """Load ``parent`` (a :class:`components.models.Checkpoint`), train it on ``items``,
    and save the update under ``out_dir`` (``adapter/`` for LoRA, ``model/`` for full
    fine-tuning; safetensors).

    Returns:
        A :class:`StageResult` whose checkpoint stacks this stage's update on ``parent``.

    Raises:
        TrainingDiverged: non-finite loss (``out_dir`` is left empty).
    """
    from pathlib import Path

    from components.models import Checkpoint, load_checkpoint

    out_dir = Path(out_dir)
    model, tok = load_checkpoint(parent, trust_remote_code)
    model, history = train(model, tok, items, cfg, seed, precision, stage=name, on_step=on_step)
    if cfg.method == "lora":
        adapter = out_dir / "adapter"
        model.save_pretrained(str(adapter), safe_serialization=True)
        ckpt = Checkpoint(name, parent.base_dir, [*parent.adapters, str(adapter)], parent.full_dir)
    else:
        full = out_dir / "model"
        model.save_pretrained(str(full), safe_serialization=True)
        ckpt = Checkpoint(name, parent.base_dir, [], str(full))
    return StageResult(ckpt, history, len(items))
