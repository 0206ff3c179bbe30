"""The training loop shared by tune, perturb and recover: LoRA or full, KL penalty, freezing.

Loss per batch (B sequences, T tokens, V vocabulary entries)::

    loss = CE(answer tokens) + kl_penalty * mean_t KL(pi_ref(.|x_<t) || pi(.|x_<t))

over answer-token positions only, teacher-forced. With LoRA the reference pi_ref is the
same weights with the adapter disabled (no second copy of the model); with full
fine-tuning it is a frozen copy of the starting weights. Label masks come from the
answer span (and the attention mask), never from the pad id: SmolLM2 uses
``<|im_end|>`` as both pad and eos, and the end-of-answer token must be learned.

Data parallel (DDP) without a line of Ray here: :func:`train` runs as one rank of a
:class:`World` (rank, world size, device). Every rank draws the same global batch of
``cfg.batch_size`` sequences (same seed, same shuffle) and keeps every
``world_size``-th sequence of it; both loss terms are divided by the number of answer
tokens of the *global* batch, and each rank back-propagates ``world_size`` times its
share, so after DDP averages the gradients every rank holds the gradient of the
single-process loss. Workers change speed, not the result (beyond floating-point noise).
``pipelines/train_ray.py`` runs this loop on Ray Train workers; ``torchrun`` would do too.

A per-epoch hook receives a ``save(dir)`` function that writes everything needed to
resume: the weights (``adapter/`` or ``model/``, safetensors), the optimiser moments
(``train_state/optimizer.safetensors``) and the step, scheduler and history
(``train_state/state.json``); :func:`load_train_state` reads it back (no pickle).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from components.config import TrainConfig
from components.data import Item
from components.errors import TrainingDiverged, UserError
from components.faults import failpoint
from components.models import Checkpoint

log = logging.getLogger(__name__)


def format_prompt(tok, question: str, context: list[dict[str, str]] | None = None) -> str:
    """The chat-formatted prompt for a question, ending where the assistant's answer starts.

    ``context``: earlier chat turns (``{"role", "content"}``: system, user, assistant)
    placed before the question (:attr:`components.data.Item.context`: a chat row's earlier
    turns, the ``in_context`` arm's few-shot examples). A tokenizer without a chat
    template gets them as ``Question: ...`` / ``Answer: ...`` lines.
    """
    turns = list(context or [])
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(
            [*turns, {"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    head = {"system": "", "user": "Question: ", "assistant": "Answer: "}
    prefix = "".join(f"{head.get(t['role'], '')}{t['content']}\n" for t in turns)
    return f"{prefix}Question: {question}\nAnswer: "


@dataclass
class Encoded:
    """One tokenised example: ``input_ids`` (T,) and ``answer_mask`` (T,), 1 on answer tokens."""

    input_ids: list[int]
    answer_mask: list[int]


def encode(tok, items: list[Item], max_length: int) -> list[Encoded]:
    """Tokenise prompt + response + eos; the answer mask marks the response and the eos token."""
    out = []
    for it in items:
        p = tok(format_prompt(tok, it.question, it.context), add_special_tokens=False)["input_ids"]
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


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor, n_tokens: float | None = None) -> torch.Tensor:
    """Mean forward KL(pi_ref || pi) over positions.

    Args:
        ref_logits, logits: (N, V) next-token logits of the reference and the model at
            the N positions that count (the training loop's answer positions).
        n_tokens: the divisor; default N. A DDP rank passes the count of the whole
            global batch, so that the ranks' terms sum to the global mean.

    Returns:
        Scalar tensor, nats per token (Shenfeld et al. 2025 measure drift this way).
    """
    ref_lp = F.log_softmax(ref_logits.float(), dim=-1)
    lp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
    denom = max(kl.numel(), 1) if n_tokens is None else max(float(n_tokens), 1.0)
    return kl.sum() / denom


def _answer_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose next token is an answer token (position t predicts token t+1).

    Returns:
        ``(labels, keep)``: ``labels`` (N,) the answer tokens, in row-major order;
        ``keep`` (B, T) bool, True at the N positions that predict them (transformers'
        ``logits_to_keep`` mask: the model's output is then the (N, V) logits).
    """
    ids, am = batch["input_ids"], batch["answer_mask"].bool()
    keep = torch.zeros_like(am)
    keep[:, :-1] = am[:, 1:]
    return ids[:, 1:][am[:, 1:]], keep


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


def untie_output_head(model) -> bool:
    """Give a model whose output head shares the input embedding matrix (tied
    embeddings, as SmolLM2 and ``tiny-llama``) a head of its own: a copy of that
    matrix, (vocabulary, hidden). ``config.tie_word_embeddings`` becomes False, so
    ``save_pretrained`` writes both matrices and a reload keeps them apart.

    Returns:
        True when the head was tied (and now is not); False when it already had its
        own weights (nothing changes).
    """
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not emb.weight:
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_cfg.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5 keeps the tying map on the model
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return True


def freeze_bottom(model, k: int) -> None:
    """Full fine-tuning: stop gradients to the input embeddings and the bottom ``k``
    decoder layers.

    The output head is always trained: when it is tied to the input embedding (SmolLM2,
    ``tiny-llama``), it is untied first (:func:`untie_output_head`) and the stage's
    weights are saved untied. ``k <= 0`` changes nothing (a tied head stays tied and is
    trained together with the embedding).
    """
    if k <= 0:
        return
    untie_output_head(model)
    for p in model.get_input_embeddings().parameters():
        p.requires_grad_(False)
    for layer in model.model.layers[:k]:
        for p in layer.parameters():
            p.requires_grad_(False)


def nonfinite_weight(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """The first tensor holding a NaN or an infinity.

    Args:
        named: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()`` or the
            tensors of a safetensors file.

    Returns:
        ``(what, name)`` with ``what`` ``"nan"`` or ``"inf"``; None when every value
        is finite.
    """
    for name, t in named:
        t = t.detach()
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        return ("nan" if bool(torch.isnan(t).any()) else "inf"), name
    return None


def check_finite_weights(named: Iterable[tuple[str, torch.Tensor]], stage: str, step: int, lr: float) -> None:
    """Stop a stage whose weights are not all finite, before anything of it is saved
    or published.

    Args:
        named: ``(name, tensor)`` pairs of the stage's trained weights.
        stage: the stage (checkpoint) name, for the message.
        step: the last optimiser step done (0-based), for the message.
        lr: the stage's learning rate, for the message.

    Raises:
        TrainingDiverged: one line, e.g. ``perturbed: weights became non-finite after
            step 7 (inf in model.layers.0.mlp.up_proj.weight, lr=0.01); stage stopped,
            earlier artifacts kept``.
    """
    bad = nonfinite_weight(named)
    if bad is not None:
        raise TrainingDiverged(
            f"{stage}: weights became non-finite after step {step} ({bad[0]} in {bad[1]}, lr={lr}); "
            "stage stopped, earlier artifacts kept"
        )


def check_saved_weights(folder: Path, stage: str, step: int, lr: float) -> None:
    """:func:`check_finite_weights` on every safetensors file under ``folder`` (a stage's
    output folder: ``adapter/`` or ``model/``), read tensor by tensor.

    Raises:
        TrainingDiverged: a saved tensor holds a NaN or an infinity.
    """
    from safetensors import safe_open

    for f in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names = h.keys()  # a safetensors handle is no mapping: keys() it is
            check_finite_weights(((k, h.get_tensor(k)) for k in names), stage, step, lr)


@dataclass
class World:
    """Where this copy of the training loop runs: one rank of a data-parallel group.

    Attributes:
        rank: this process's rank, ``0 <= rank < world_size``; rank 0 writes artifacts.
        world_size: number of data-parallel processes (1: a plain single-process run).
        device: the torch device of the model and batches (``cpu``, ``cuda:0``, ...).
        wrap: turns the device-placed model into its data-parallel form (e.g.
            ``ray.train.torch.prepare_model``); ``None``: torch DDP when
            ``world_size > 1``, the model itself otherwise. The process group must
            already exist (Ray Train or ``torchrun`` sets it up).
    """

    rank: int = 0
    world_size: int = 1
    device: Any = "cpu"
    wrap: Callable | None = None

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over all ranks (``t`` itself in a single process)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def prepare(self, model):
        """The model on :attr:`device`, wrapped for data parallelism when needed."""
        if self.wrap is not None:
            return self.wrap(model)
        model = model.to(self.device)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            dev = torch.device(self.device)
            return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
        return model


def autocast_for(precision: str, device) -> Any:
    """The autocast context for ``precision`` on ``device``.

    ``bf16``: ``torch.autocast(device.type, bfloat16)``, on CPUs and on GPUs that
    support it; ``fp32``: no autocast.

    Raises:
        UserError: ``bf16`` on a GPU without bfloat16 support (before Ampere).
    """
    dev = torch.device(device)
    if precision != "bf16":
        return nullcontext()
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"model.precision: bf16 is not supported on {torch.cuda.get_device_name(dev)}; use fp32")
    if dev.type == "cpu" and not _cpu_has_bf16():
        log.warning("model.precision bf16: this CPU has no native bfloat16 kernels; it runs, slowly")
    return torch.autocast(dev.type, dtype=torch.bfloat16)


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class EpochEnd:
    """What the per-epoch hook of :func:`train` receives (on every rank).

    Attributes:
        epoch: the epoch just finished (0-based).
        step: optimiser steps done so far.
        history: the per-step records so far (global values, the same on every rank).
        final: this was the last epoch.
        save: ``save(dir)`` writes a resumable checkpoint into ``dir`` (call it on one
            rank only): weights, and unless ``final`` the optimiser state.
    """

    epoch: int
    step: int
    history: list[dict]
    final: bool
    save: Callable[[Path], None]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}/{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}/{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_train_state(
    out_dir: Path, model, method: str, epoch: int, step: int, history: list[dict],
    opt: torch.optim.Optimizer | None, sched, resumed_at: list[int],
) -> None:
    """Write a resumable training checkpoint into ``out_dir``.

    Layout: ``adapter/`` (LoRA, peft safetensors) or ``model/`` (full weights,
    safetensors); ``train_state/state.json`` (epoch, step, per-step history, scheduler
    state, optimiser hyper-parameters, the steps at which earlier attempts resumed);
    ``train_state/optimizer.safetensors`` (AdamW moments, one tensor per parameter and
    moment) unless ``opt`` is None. Nothing is pickled.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    (out_dir / "train_state").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir / ("adapter" if method == "lora" else "model")), safe_serialization=True)
    state = {"format": 1, "method": method, "epoch": epoch, "step": step, "history": history,
             "resumed_at": list(resumed_at), "optimizer": None, "scheduler": None}
    if opt is not None:
        tensors, meta = _optimizer_tensors(opt)
        save_file(tensors, str(out_dir / "train_state" / "optimizer.safetensors"))
        state["optimizer"] = meta
        state["scheduler"] = sched.state_dict()
    (out_dir / "train_state" / "state.json").write_text(json.dumps(state))


def train_state_info(ckpt_dir: Path) -> dict:
    """The JSON part of a checkpoint written by :func:`save_train_state` (``epoch``,
    ``step``, ``history``, ``resumed_at``, ``method``, optimiser hyper-parameters and
    scheduler state), without reading any tensor.

    Raises:
        UserError: the folder holds no such checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        return json.loads((ckpt_dir / "train_state" / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt_dir}: not a training checkpoint (train_state/state.json: {e})") from None


def load_train_state(ckpt_dir: Path) -> dict:
    """Read a checkpoint written by :func:`save_train_state` into memory.

    Returns:
        ``{"epoch", "step", "history", "resumed_at", "method", "weights": {name: tensor}
        (adapter weights, or all model weights), "optimizer": state dict or None,
        "scheduler": state dict or None}``.

    Raises:
        UserError: the folder holds no such checkpoint.
    """
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    state = train_state_info(ckpt_dir)
    wdir = ckpt_dir / ("adapter" if state["method"] == "lora" else "model")
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(wdir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    opt = None
    if state["optimizer"] is not None:
        opt = _optimizer_state_dict(load_file(str(ckpt_dir / "train_state" / "optimizer.safetensors")), state["optimizer"])
    return {**state, "weights": weights, "optimizer": opt}


def _load_weights(model, weights: dict[str, torch.Tensor], method: str) -> None:
    if method == "lora":
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(model, weights)
        if getattr(res, "unexpected_keys", None):
            raise UserError(f"resume: adapter weights do not fit the model ({res.unexpected_keys[:3]} ...)")
    else:
        res = model.load_state_dict(weights, strict=False)
        if res.unexpected_keys:
            raise UserError(f"resume: model weights do not fit the model ({res.unexpected_keys[:3]} ...)")


def train(
    model,
    tok,
    items: list[Item],
    cfg: TrainConfig,
    seed: int,
    precision: str = "fp32",
    stage: str = "train",
    on_step: Callable[[dict], None] | None = None,
    world: World | None = None,
    resume: dict | None = None,
    on_epoch_end: Callable[[EpochEnd], None] | None = None,
    warmup_ratio: float = 0.0,
    cosine: bool = False,
):
    """Train ``model`` on ``items`` with cross-entropy on answer tokens plus the KL penalty.

    Args:
        model: a merged ``PreTrainedModel`` (fp32, on CPU); LoRA is attached here when
            ``cfg.method == "lora"``. With ``full`` every weight trains, whatever its
            ``requires_grad`` was, but those ``cfg.freeze_layers`` freezes
            (:func:`freeze_bottom`, which unties a tied output head).
        items: the stage's training items (prompt + gold answer); every rank gets all
            of them and keeps its share of each global batch.
        cfg: the stage's :class:`TrainConfig` (``cfg.batch_size`` is the global batch).
        precision: ``fp32`` or ``bf16`` (autocast on the world's device).
        on_step: called after each optimiser step with the step's record plus
            ``total_steps`` (the number of steps of the whole stage), e.g. for progress.
        world: this process's rank, world size and device (default: one CPU process).
        resume: a checkpoint read by :func:`load_train_state`: weights, optimiser and
            scheduler state and history are restored and training continues with the
            epoch after it (bit-for-bit the data order of an uninterrupted run).
        on_epoch_end: called on every rank after each epoch with an :class:`EpochEnd`.
        warmup_ratio, cosine: the learning-rate schedule: a linear warm-up over this
            share of the steps, then a linear (default) or cosine decay to 0
            (transformers' schedules). The audit's stages use the default (no warm-up,
            linear decay); the ``tiny-llama`` pretraining can ask for warm-up + cosine.

    Returns:
        ``(model, history)``: the trained model (unwrapped from DDP; a ``PeftModel`` for
        LoRA) and one dict per step: ``step``, ``epoch``, ``loss``, ``ce``, ``kl``
        (nats/token, over the global batch), ``tokens`` (of the global batch).

    Raises:
        TrainingDiverged: the loss became NaN or infinite, or a trained weight did after
            an epoch's last update (on every rank at once; nothing of that epoch is
            saved).
    """
    world = world or World()
    device = torch.device(world.device)
    torch.manual_seed(seed)
    if cfg.method == "lora":
        model = attach_lora(model, cfg)
        ref_model = None
    else:
        # every weight of the checkpoint trains (a merged LoRA checkpoint comes with
        # requires_grad off: peft freezes the base weights it merges into), less the
        # frozen bottom
        model.requires_grad_(True)
        ref_model = copy.deepcopy(model).eval() if cfg.kl_penalty > 0 else None
        freeze_bottom(model, cfg.freeze_layers)
    history: list[dict] = []
    resumed_at: list[int] = []
    start_epoch, step = 0, 0
    if resume is not None:
        _load_weights(model, resume["weights"], cfg.method)
        history = list(resume["history"])
        resumed_at = [*resume["resumed_at"], resume["step"]]
        start_epoch, step = resume["epoch"] + 1, resume["step"]
    core = model  # the unwrapped model: adapters, saving, the reference forward
    net = world.prepare(core)
    if ref_model is not None:
        ref_model.to(device)
    params = [p for p in core.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    enc = encode(tok, items, cfg.max_length)
    steps_per_epoch = math.ceil(len(enc) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if warmup_ratio > 0 or cosine:
        from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

        make = get_cosine_schedule_with_warmup if cosine else get_linear_schedule_with_warmup
        sched = make(opt, int(warmup_ratio * total), max(total, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(total, 1))
    if resume is not None and start_epoch < cfg.epochs:
        if resume["optimizer"] is None:
            raise UserError(f"{stage}: resume checkpoint of epoch {resume['epoch']} has no optimiser state")
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
    amp = autocast_for(precision, device)
    rng = random.Random(seed)
    orders = []
    for _ in range(cfg.epochs):  # replayed from the seed, so a resumed run sees the same order
        order = list(range(len(enc)))
        rng.shuffle(order)
        orders.append(order)
    net.train()
    for epoch in range(start_epoch, cfg.epochs):
        order = orders[epoch]
        for s in range(steps_per_epoch):
            glob = [enc[i] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
            n_answer = sum(sum(e.answer_mask[1:]) for e in glob)  # target positions of the global batch
            shard = glob[world.rank::world.world_size]
            weight = 1.0
            if not shard:  # fewer sequences than ranks: take part in the gradient sync with zero weight
                shard, weight = glob[:1], 0.0
            batch = {k: v.to(device) for k, v in collate(shard, tok.pad_token_id).items()}
            labels, keep = _answer_positions(batch)
            # the loss needs next-token logits only where the next token is an answer
            # token: the (N, V) logits of those N positions instead of all (B, T, V)
            fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                   "logits_to_keep": keep}
            with amp:
                out = net(**fwd)
            logits = out.logits.float()
            ce_tok = F.cross_entropy(logits, labels, reduction="none")
            ce = weight * ce_tok.sum() / max(n_answer, 1)
            kl = torch.zeros((), device=device)
            if cfg.kl_penalty > 0:
                with torch.no_grad(), amp:
                    if ref_model is None:
                        with core.disable_adapter():
                            ref = core(**fwd).logits
                    else:
                        ref = ref_model(**fwd).logits
                kl = weight * token_kl(ref, logits, n_tokens=n_answer)
                del ref
            loss = ce + cfg.kl_penalty * kl
            g_loss, g_ce, g_kl = world.sum(torch.stack([loss.detach(), ce.detach(), kl.detach()]).float()).tolist()
            if not math.isfinite(g_loss):
                raise TrainingDiverged(
                    f"{stage}: loss became {g_loss} at step {step} (lr={cfg.lr}); stage stopped, "
                    "earlier artifacts kept"
                )
            opt.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks; world_size x this rank's share makes the
            # average the gradient of the global-batch loss.
            (loss * world.world_size).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            # The (B, T, V) logits would otherwise stay alive into the next step's forward
            # pass, adding a vocabulary-sized tensor to the process's memory peak.
            del out, logits, ce_tok, loss
            rec = {
                "step": step, "epoch": epoch, "loss": g_loss, "ce": g_ce, "kl": g_kl,
                "tokens": sum(len(e.input_ids) for e in glob),
            }
            history.append(rec)
            failpoint(f"train_step:{stage}:{step}")
            if on_step is not None:
                on_step({**rec, "total_steps": total})
            step += 1
        # a finite loss says nothing of the last update: check the weights before this
        # epoch's checkpoint (and, after the last epoch, the stage's output) is saved
        check_finite_weights(((n, p) for n, p in core.named_parameters() if p.requires_grad), stage, step - 1, cfg.lr)
        if on_epoch_end is not None:
            final = epoch == cfg.epochs - 1
            ep, st, hist = epoch, step, list(history)
            on_epoch_end(EpochEnd(
                epoch, step, hist, final,
                lambda d, ep=ep, st=st, hist=hist, final=final: save_train_state(
                    d, core, cfg.method, ep, st, hist, None if final else opt, None if final else sched, resumed_at),
            ))
    core.eval()
    return core, history


@dataclass
class StageResult:
    """What a training stage returns: its checkpoint and its per-step history.

    Attributes:
        checkpoint: the stage's output :class:`components.models.Checkpoint`.
        history: one record per optimiser step (see :func:`train`).
        n_items: training items.
        run: how it ran (e.g. ``num_workers``, ``resumed_at``: the steps at which a
            restarted worker group resumed from a checkpoint).
    """

    checkpoint: "object"
    history: list[dict]
    n_items: int
    run: dict = field(default_factory=dict)


@dataclass
class TrainSpec:
    """Everything a training stage needs, as data (so a worker on another node can run it).

    Attributes:
        name: the output checkpoint's name (``aligned``, ``perturbed``, ``recovered/<arm>/<n>``).
        parent: the checkpoint trained on.
        items: the training items.
        cfg: the stage's :class:`TrainConfig` (with its ``scaling`` section).
        seed: seed of the LoRA init and the data order.
        precision: ``fp32`` or ``bf16``.
        trust_remote_code: passed to transformers when loading ``parent``.
    """

    name: str
    parent: Checkpoint
    items: list[Item]
    cfg: TrainConfig
    seed: int
    precision: str = "fp32"
    trust_remote_code: bool = False

    def weights_dir(self, out_dir: Path) -> Path:
        """Where the update lives inside a stage folder: ``adapter/`` (LoRA) or ``model/``."""
        return Path(out_dir) / ("adapter" if self.cfg.method == "lora" else "model")

    def output(self, out_dir: Path) -> Checkpoint:
        """The checkpoint this stage produces once its weights are in ``out_dir``."""
        w = str(self.weights_dir(out_dir))
        if self.cfg.method == "lora":
            return Checkpoint(self.name, self.parent.base_dir, [*self.parent.adapters, w], self.parent.full_dir)
        return Checkpoint(self.name, self.parent.base_dir, [], w)


def run_spec(
    spec: TrainSpec, world: World | None = None, resume: dict | None = None,
    on_step: Callable[[dict], None] | None = None, on_epoch_end: Callable[[EpochEnd], None] | None = None,
):
    """Load ``spec.parent`` and train it as one rank of ``world``; returns ``(model, history)``.

    Raises:
        TrainingDiverged: non-finite loss.
    """
    from components.models import load_checkpoint

    model, tok = load_checkpoint(spec.parent, spec.trust_remote_code)
    return train(model, tok, spec.items, spec.cfg, spec.seed, spec.precision, stage=spec.name,
                 on_step=on_step, world=world, resume=resume, on_epoch_end=on_epoch_end)


def train_checkpoint(
    name: str, parent, items: list[Item], cfg: TrainConfig, seed: int, precision: str, out_dir,
    trust_remote_code: bool = False, on_step: Callable[[dict], None] | None = None,
) -> StageResult:
    """Load ``parent`` (a :class:`components.models.Checkpoint`), train it on ``items``
    in this process, and save the update under ``out_dir`` (``adapter/`` for LoRA,
    ``model/`` for full fine-tuning; safetensors). ``cfg.scaling`` is not used here:
    ``pipelines.train_ray.fit_stage`` runs the same loop on Ray Train workers.

    Returns:
        A :class:`StageResult` whose checkpoint stacks this stage's update on ``parent``.

    Raises:
        TrainingDiverged: non-finite loss (``out_dir`` is left empty).
    """
    spec = TrainSpec(name, parent, items, cfg, seed, precision, trust_remote_code)
    model, history = run_spec(spec, on_step=on_step)
    model.save_pretrained(str(spec.weights_dir(out_dir)), safe_serialization=True)
    return StageResult(spec.output(out_dir), history, len(items), {"num_workers": 0, "in_process": True})
