"""Tune stage: align the base model to the suite's task (DESIGN.md, "The DAG")."""

from __future__ import annotations

from pathlib import Path

from components.config import AuditConfig
from components.data import SuiteData
from components.models import Checkpoint
from components.training import StageResult, train_checkpoint


def tune(cfg: AuditConfig, base: Checkpoint, data: SuiteData, out_dir: Path, on_step=None) -> StageResult:
    """Train ``base`` on the alignment items (``data.align``) with ``cfg.tune``.

    The optional KL penalty pulls toward the base model. Output: the ``aligned``
    checkpoint (LoRA adapter or full weights in ``out_dir``, safetensors).
    """
    return train_checkpoint(
        "aligned", base, data.align, cfg.tune, cfg.seed, cfg.model.precision, out_dir,
        cfg.model.trust_remote_code, on_step,
    )
