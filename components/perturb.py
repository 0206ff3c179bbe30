"""Perturb stage: train the aligned model on a new task or a few examples that shift it."""

from __future__ import annotations

from pathlib import Path

from components.config import AuditConfig
from components.data import SuiteData
from components.models import Checkpoint
from components.training import StageResult, TrainSpec, train_checkpoint


def perturb_spec(cfg: AuditConfig, aligned: Checkpoint, data: SuiteData) -> TrainSpec | None:
    """What the perturb stage trains: ``aligned`` on the perturbation items
    (``data.perturb``) with ``cfg.perturb``; None when ``perturb.kind == "none"``."""
    if cfg.perturb.kind == "none":
        return None
    return TrainSpec("perturbed", aligned, data.perturb, cfg.perturb, cfg.seed + 1, cfg.model.precision,
                     cfg.model.trust_remote_code)


def unperturbed(aligned: Checkpoint) -> StageResult:
    """The result of ``perturb.kind == "none"``: the aligned checkpoint, renamed."""
    return StageResult(Checkpoint("perturbed", aligned.base_dir, list(aligned.adapters), aligned.full_dir), [], 0)


def perturb(cfg: AuditConfig, aligned: Checkpoint, data: SuiteData, out_dir: Path, on_step=None) -> StageResult:
    """Train ``aligned`` on the perturbation items (``data.perturb``) with ``cfg.perturb``.

    ``perturb.kl_penalty`` pulls toward the aligned model (with LoRA: the merged aligned
    weights with this stage's adapter disabled); ``perturb.freeze_layers`` keeps the
    bottom k layers and the embeddings fixed (Zheng et al. 2025). With
    ``perturb.kind == "none"`` nothing is trained and the checkpoint is the aligned one.
    """
    s = perturb_spec(cfg, aligned, data)
    if s is None:
        return unperturbed(aligned)
    return train_checkpoint(s.name, s.parent, s.items, s.cfg, s.seed, s.precision, out_dir, s.trust_remote_code, on_step)
