"""The verdict's arithmetic and labels on per-item results whose truth is set by hand."""

from __future__ import annotations

import numpy as np
import pytest

from components.config import VerdictConfig
from components.verdict import compute_verdict

N = 40


def col(frac: float) -> list[float]:
    """N items, the first ``frac`` of them correct."""
    k = int(round(frac * N))
    return [1.0] * k + [0.0] * (N - k)


def stage(task: float, know: float) -> dict:
    return {"task_correct": col(task), "knowledge_correct": col(know)}


def verdict(**stages):
    return compute_verdict({k.replace("__", "/"): v for k, v in stages.items()}, 0.25, VerdictConfig(),
                           n_boot=500, seed=0)


def test_spurious_when_knowledge_is_retained_and_task_returns():
    v = verdict(aligned=stage(0.9, 0.9), perturbed=stage(0.1, 0.85),
                recovered__in_task__10=stage(0.8, 0.9), recovered__irrelevant__10=stage(0.6, 0.9))
    assert v["label"] == "spurious"
    assert v["task_drop"] == pytest.approx(0.8)
    assert v["knowledge_retention"] == pytest.approx((0.85 - 0.25) / (0.9 - 0.25))
    assert v["recovery_ratio"]["in_task/10"] == pytest.approx(0.7 / 0.8)
    assert v["recovery_ratio"]["irrelevant/10"] == pytest.approx(0.5 / 0.8)
    assert v["recovery_evidence"]["irrelevant"] == "recovery ratio >= 0.5 at n=10"
    lo, hi = v["task_drop_ci"]
    assert lo <= 0.8 <= hi and lo > 0


def test_spurious_when_knowledge_returns_after_irrelevant_recovery():
    v = verdict(aligned=stage(0.9, 0.9), perturbed=stage(0.0, 0.4),
                recovered__irrelevant__5=stage(0.5, 0.88))
    assert v["knowledge_retention"] < 0.5
    assert v["knowledge_after_recovery"]["irrelevant/5"] >= 0.8
    assert v["label"] == "spurious"


def test_knowledge_loss_when_ranking_falls_to_chance_and_nothing_returns():
    v = verdict(aligned=stage(0.9, 0.9), perturbed=stage(0.05, 0.25),
                recovered__in_task__10=stage(0.1, 0.3), recovered__irrelevant__10=stage(0.05, 0.25))
    assert v["label"] == "knowledge_loss"
    assert v["knowledge_retention"] == pytest.approx(0.0)
    assert v["recovery_evidence"]["in_task"] == "not within n <= 10"


def test_no_forgetting_when_the_drop_is_not_significant():
    v = verdict(aligned=stage(0.9, 0.9), perturbed=stage(0.9, 0.9), recovered__in_task__10=stage(0.9, 0.9))
    assert v["label"] == "no_forgetting"
    assert v["task_drop"] == 0.0
    assert v["recovery_ratio"]["in_task/10"] is None  # undefined without a drop


def test_mixed_between_thresholds():
    v = verdict(aligned=stage(0.9, 0.9), perturbed=stage(0.1, 0.65), recovered__in_task__10=stage(0.2, 0.65))
    assert 0.5 <= v["knowledge_retention"] < 0.8
    assert v["label"] == "mixed"


def test_retention_undefined_when_aligned_is_at_chance():
    v = verdict(aligned=stage(0.9, 0.25), perturbed=stage(0.1, 0.25), recovered__in_task__10=stage(0.1, 0.25))
    assert v["knowledge_retention"] is None
    assert v["label"] == "knowledge_loss"


def test_ci_is_paired_over_items():
    # identical per-item vectors: every resample gives a drop of exactly 0
    a = {"task_correct": list(np.random.default_rng(1).integers(0, 2, N).astype(float)),
         "knowledge_correct": col(0.9)}
    v = compute_verdict({"aligned": a, "perturbed": a, "recovered/in_task/1": a}, 0.25, VerdictConfig(),
                        n_boot=200, seed=0)
    assert v["task_drop_ci"] == [0.0, 0.0]


def test_probe_retention_with_paired_ci_beside_the_label():
    M = 20
    def probe(frac: float) -> dict:  # M probed items, the first frac of them right, at layers 0..2
        k = int(round(frac * M))
        return {str(layer): [1.0] * k + [0.0] * (M - k) for layer in range(3)}

    a = {**stage(0.9, 0.9), "probe_correct": probe(0.9)}
    p = {**stage(0.1, 0.85), "probe_correct": {**probe(0.6), "0": [0.0] * M}}
    v = compute_verdict({"aligned": a, "perturbed": p, "recovered/in_task/10": stage(0.8, 0.9)}, 0.25,
                        VerdictConfig(), n_boot=300, seed=0, probe_chance=0.3)
    # layers 1..L only (layer 0, the embeddings, is not averaged): first 18 vs 12 of 20 items correct
    assert v["probe_retention"] == pytest.approx((12 / 20 - 0.3) / (18 / 20 - 0.3))
    lo, hi = v["probe_retention_ci"]
    assert lo < v["probe_retention"] < hi
    assert v["label"] == "spurious"  # decided by the likelihood ranking, as without probes
    assert compute_verdict({"aligned": a, "perturbed": p}, 0.25, VerdictConfig(), n_boot=50)["probe_retention"] is None
