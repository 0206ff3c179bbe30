"""Tune stage: align the base model to the suite's task (DESIGN.md, "The DAG")."""

from __future__ import annotations


from components.config import AuditConfig
from components.data import SuiteData
from components.models import Checkpoint
from components.training import TrainSpec


def tune_spec(cfg: AuditConfig, base: Checkpoint, data: SuiteData) -> TrainSpec:
    """What the tune stage trains: ``base`` on the alignment items (``data.align``) with
    ``cfg.tune``; the optional KL penalty pulls toward the base model."""
    return TrainSpec("aligned", base, data.align, cfg.tune, cfg.seed, cfg.model.precision,
                     cfg.model.trust_remote_code)
