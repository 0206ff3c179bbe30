"""Perturb stage: train the aligned model on a new task or a few examples that shift it,
or (a known case of knowledge loss) re-initialise its decoder blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from components.config import AuditConfig
from components.data import SuiteData
from components.errors import UserError
from components.models import Checkpoint, load_checkpoint
from components.training import StageResult, TrainSpec


def perturb_spec(cfg: AuditConfig, aligned: Checkpoint, data: SuiteData) -> TrainSpec | None:
    """What the perturb stage trains: ``aligned`` on the perturbation items
    (``data.perturb``) with ``cfg.perturb``; None when nothing is trained (``perturb.kind`` ``none`` or ``reinit``)."""
    if cfg.perturb.kind in ("none", "reinit"):
        return None
    return TrainSpec("perturbed", aligned, data.perturb, cfg.perturb, cfg.seed + 1, cfg.model.precision,
                     cfg.model.trust_remote_code)


def unperturbed(aligned: Checkpoint) -> StageResult:
    """The result of ``perturb.kind == "none"``: the aligned checkpoint, renamed."""
    return StageResult(Checkpoint("perturbed", aligned.base_dir, list(aligned.adapters), aligned.full_dir), [], 0)


@torch.no_grad()
def reinit_blocks(
    parent: Checkpoint, layers: list[int] | None, seed: int, out_dir: Path, trust_remote_code: bool = False
) -> StageResult:
    """Re-initialise decoder blocks of ``parent`` and save the result as full weights.

    Every linear weight in a chosen block is drawn from N(0, initializer_range^2) (the
    model config's value, 0.02 if absent), biases set to 0, and normalisation weights to
    1: the block is as at initialisation, whatever it had learned is gone. The token
    embeddings, the final norm and the output head are kept.

    Args:
        layers: 0-based block indices; None: every block.

    Returns:
        A :class:`StageResult` whose checkpoint has ``full_dir = out_dir/"model"``
        (safetensors) and no adapters.

    Raises:
        UserError: a block index beyond the model's depth.
    """
    model, _ = load_checkpoint(parent, trust_remote_code)
    blocks = model.get_decoder().layers
    chosen = list(range(len(blocks))) if layers is None else layers
    if any(i >= len(blocks) for i in chosen):
        raise UserError(f"perturb.reinit_layers: {chosen} has an index beyond the model's {len(blocks)} blocks")
    std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    gen = torch.Generator().manual_seed(seed)
    for i in chosen:
        for mod in blocks[i].modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
                mod.weight.fill_(1.0)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
    full = Path(out_dir) / "model"
    model.save_pretrained(str(full), safe_serialization=True)
    return StageResult(Checkpoint("perturbed", parent.base_dir, [], str(full)), [], 0)
