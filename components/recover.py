"""Recover stage: train the perturbed model on n examples of one arm."""

from __future__ import annotations

from typing import TYPE_CHECKING

from components.config import AuditConfig
from components.data import Item, SuiteData
from components.errors import UserError
from components.models import Checkpoint

if TYPE_CHECKING:  # torch is imported by the training stages, not by the audit's driver
    from components.training import TrainSpec


def recovery_set(data: SuiteData, arm: str, n: int) -> list[Item]:
    """The first ``n`` items of the arm's pool: ``in_task`` (the task on items disjoint
    from every evaluation item) or ``irrelevant`` (an unrelated task).

    Raises:
        UserError: ``n`` larger than the pool.
    """
    pool = {"in_task": data.recover, "irrelevant": data.irrelevant}[arm]
    if n > len(pool):
        raise UserError(f"recover.sizes: {n} is larger than the {arm} recovery pool ({len(pool)} items)")
    return pool[:n]


def recover_spec(cfg: AuditConfig, perturbed: Checkpoint, data: SuiteData, arm: str, n: int) -> TrainSpec:
    """What the recover stage trains: ``perturbed`` on ``n`` items of ``arm`` with ``cfg.recover``.

    Raises:
        UserError: ``n`` larger than the arm's pool.
    """
    from components.training import TrainSpec

    return TrainSpec(f"recovered/{arm}/{n}", perturbed, recovery_set(data, arm, n), cfg.recover, cfg.seed + 2,
                     cfg.model.precision, cfg.model.trust_remote_code)
