"""Tune stage: align the base model to the suite's task (DESIGN.md, "The DAG")."""

from __future__ import annotations

from pathlib import Path

from components.config import AuditConfig
from components.data import SuiteData
from components.models import Checkpoint
from components.training import StageResult, TrainSpec, train_checkpoint


def tune_spec(cfg: AuditConfig, base: Checkpoint, data: SuiteData) -> TrainSpec:
    """What the tune stage trains: ``base`` on the alignment items (``data.align``) with
    ``cfg.tune``; the optional KL penalty pulls toward the base model."""
    return TrainSpec("aligned", base, data.align, cfg.tune, cfg.seed, cfg.model.precision,
                     cfg.model.trust_remote_code)


def tune(cfg: AuditConfig, base: Checkpoint, data: SuiteData, out_dir: Path, on_step=None) -> StageResult:
    """Train ``base`` on the alignment items (``data.align``) with ``cfg.tune``, in this process.

    The optional KL penalty pulls toward the base model. Output: the ``aligned``
    checkpoint (LoRA adapter or full weights in ``out_dir``, safetensors).
    """
    s = tune_spec(cfg, base, data)
    return train_checkpoint(s.name, s.parent, s.items, s.cfg, s.seed, s.precision, out_dir, s.trust_remote_code, on_step)
