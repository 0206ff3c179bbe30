"""Perturb stage: train the aligned model on a new task or a few examples that shift it."""

from __future__ import annotations

from pathlib import Path

from components.config import AuditConfig
from components.data import SuiteData
from components.models import Checkpoint
from components.training import StageResult, train_checkpoint


def perturb(cfg: AuditConfig, aligned: Checkpoint, data: SuiteData, out_dir: Path, on_step=None) -> StageResult:
    """Train ``aligned`` on the perturbation items (``data.perturb``) with ``cfg.perturb``.

    ``perturb.kl_penalty`` pulls toward the aligned model (with LoRA: the merged aligned
    weights with this stage's adapter disabled); ``perturb.freeze_layers`` keeps the
    bottom k layers and the embeddings fixed (Zheng et al. 2025). With
    ``perturb.kind == "none"`` nothing is trained and the checkpoint is the aligned one.
    """
    if cfg.perturb.kind == "none":
        return StageResult(
            Checkpoint("perturbed", aligned.base_dir, list(aligned.adapters), aligned.full_dir), [], 0
        )
    return train_checkpoint(
        "perturbed", aligned, data.perturb, cfg.perturb, cfg.seed + 1, cfg.model.precision, out_dir,
        cfg.model.trust_remote_code, on_step,
    )
