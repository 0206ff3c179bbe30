"""The verdict's arithmetic and labels on per-item results whose truth is set by hand."""

from __future__ import annotations

import numpy as np
import pytest

from components.config import VerdictConfig
from components.verdict import compute_verdict

N = 40


def col(frac: float, n: int = N) -> list[float]:
    """n items, the first ``frac`` of them correct."""
    k = int(round(frac * n))
    return [1.0] * k + [0.0] * (n - k)


def stage(task: float, know: float, n: int = N) -> dict:
    return {"task_correct": col(task, n), "knowledge_correct": col(know, n)}


def verdict(cfg: VerdictConfig | None = None, groups=None, **stages):
    return compute_verdict({k.replace("__", "/"): v for k, v in stages.items()}, 0.25, cfg or VerdictConfig(),
                           n_boot=500, seed=0, groups=groups)


def test_spurious_when_knowledge_is_retained_and_task_returns():
    v = verdict(aligned=stage(0.9, 0.9), perturbed=stage(0.1, 0.85),
                recovered__in_task__10=stage(0.8, 0.9), recovered__irrelevant__10=stage(0.6, 0.9))
    assert v["label"] == "spurious"
    assert v["task_drop"] == pytest.approx(0.8)
    assert v["knowledge_retention"] == pytest.approx((0.85 - 0.25) / (0.9 - 0.25))
    assert v["recovery_ratio"]["in_task/10"] == pytest.approx(0.7 / 0.8)
    assert v["recovery_ratio"]["irrelevant/10"] == pytest.approx(0.5 / 0.8)
    # the evidence reads the interval as the rule does: in_task's lower bound reaches 0.5,
    # irrelevant's point 0.625 does, its lower bound does not
    assert v["recovery_evidence"]["in_task"] == "recovery ratio lower bound >= 0.5 at n=10"
    assert v["recovery_ratio_ci"]["irrelevant/10"][0] < 0.5
    assert v["recovery_evidence"]["irrelevant"] == "not within n <= 10"
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


def test_mixed_when_the_whole_interval_lies_between_thresholds():
    n = 400
    v = verdict(aligned=stage(0.9, 0.9, n), perturbed=stage(0.1, 0.65, n), recovered__in_task__10=stage(0.2, 0.65, n))
    lo, hi = v["knowledge_retention_ci"]
    assert 0.5 <= lo <= v["knowledge_retention"] <= hi < 0.8
    assert v["label"] == "mixed", v["reason"]


def test_inconclusive_when_the_interval_straddles_a_threshold():
    # the same point estimate on 40 items: the interval reaches across 0.5
    v = verdict(aligned=stage(0.9, 0.9), perturbed=stage(0.1, 0.6), recovered__in_task__10=stage(0.2, 0.6))
    lo, hi = v["knowledge_retention_ci"]
    assert lo < 0.5 < hi
    assert v["label"] == "inconclusive" and "straddles" in v["reason"]


def test_inconclusive_when_aligned_knowledge_does_not_clear_chance():
    # the case: K(aligned) = K(perturbed) = 0.30 with chance 0.25 was called spurious, retention 1.00
    v = verdict(aligned=stage(0.9, 0.3), perturbed=stage(0.1, 0.3), recovered__in_task__10=stage(0.1, 0.3))
    assert v["label"] == "inconclusive"
    assert "does not clear chance" in v["checks"][0]
    v = verdict(aligned=stage(0.9, 0.25), perturbed=stage(0.1, 0.25), recovered__in_task__10=stage(0.1, 0.25))
    assert v["knowledge_retention"] is None and v["label"] == "inconclusive"


def test_inconclusive_when_the_tune_stage_broke_the_task():
    # base answered everything, aligning to terse answers broke it: 1.00 -> 0.33
    v = verdict(base=stage(1.0, 0.9), aligned=stage(0.33, 0.9), perturbed=stage(0.0, 0.9),
                recovered__in_task__10=stage(0.3, 0.9))
    assert v["label"] == "inconclusive"
    assert v["checks"][0].startswith("the tune stage broke the task")
    assert v["tune_change"]["value"] == pytest.approx(1.0 - 13 / 40)
    # a small tune cost is tolerated
    v = verdict(base=stage(1.0, 0.9), aligned=stage(0.85, 0.9), perturbed=stage(0.0, 0.9))
    assert v["label"] == "spurious" and not v["checks"]


def test_knowledge_that_fell_while_the_task_held_is_not_no_forgetting():
    v = verdict(aligned=stage(0.5, 0.9), perturbed=stage(0.5, 0.3), recovered__in_task__10=stage(0.5, 0.3))
    assert v["task_drop_ci"][0] <= 0
    assert v["label"] == "knowledge_loss" and "while the task held" in v["reason"]


def test_measures_that_disagree_make_the_label_mixed():
    a, p = stage(0.9, 0.9), stage(0.1, 0.9)
    a["knowledge_mrr"], p["knowledge_mrr"] = col(0.9), col(0.05)
    v = compute_verdict({"aligned": a, "perturbed": p}, {"knowledge_acc": 0.25, "knowledge_mrr": 0.03},
                        VerdictConfig(), n_boot=300, seed=0)
    assert v["retention"]["knowledge_acc"]["ci"][0] >= 0.8
    assert v["retention"]["knowledge_mrr"]["ci"][1] < 0.5
    assert v["label"] == "mixed" and "disagree" in v["reason"]
    # deciding by the reciprocal rank instead
    v = compute_verdict({"aligned": a, "perturbed": p}, {"knowledge_acc": 0.25, "knowledge_mrr": 0.03},
                        VerdictConfig(knowledge_measure="knowledge_mrr"), n_boot=300, seed=0)
    assert v["decided_by"] == "knowledge_mrr" and v["label"] == "mixed"


def test_cluster_bootstrap_widens_the_interval_of_shared_subjects():
    # 10 people x 4 questions: items of one person move together
    rng = np.random.default_rng(3)
    people = np.repeat(np.arange(10), 4)
    per_person = rng.random(10) < 0.5
    know = per_person[people].astype(float).tolist()
    a = {"task_correct": [1.0] * 40, "knowledge_correct": [1.0] * 40}
    p = {"task_correct": [0.0] * 40, "knowledge_correct": know}
    iid = compute_verdict({"aligned": a, "perturbed": p}, 0.25, VerdictConfig(), n_boot=1000, seed=0)
    clus = compute_verdict({"aligned": a, "perturbed": p}, 0.25, VerdictConfig(), n_boot=1000, seed=0,
                           groups=people.tolist())
    w = lambda v: v["knowledge_retention_ci"][1] - v["knowledge_retention_ci"][0]  # noqa: E731
    assert w(clus) > 1.3 * w(iid)


def test_undefined_resamples_are_not_dropped():
    from components.verdict import percentile_ci

    s = np.array([1.0] * 90 + [np.nan] * 10)
    assert percentile_ci(s, 0.95) == (None, None)  # 10% undefined > 2.5%
    s = np.array([1.0] * 990 + [np.nan] * 10)
    lo, hi = percentile_ci(s, 0.95)
    assert lo == hi == 1.0
    s = np.concatenate([np.linspace(0, 1, 980), [np.nan] * 20])
    lo, _ = percentile_ci(s, 0.95)
    assert lo < np.quantile(np.linspace(0, 1, 980), 0.025)  # the undefined ones count at the bottom


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


def test_the_task_back_in_context_reads_as_spurious_unless_knowledge_is_lost():
    # retention straddles the thresholds (0.55 of the way), trained recovery brings nothing
    # back, but in context, with no weight update, the task returns: the facts were in the weights
    mid = stage(0.1, 0.25 + 0.55 * 0.65)
    v = verdict(aligned=stage(0.9, 0.9), perturbed=mid, recovered__in_task__4=stage(0.1, 0.6),
                recovered__in_context__4=stage(0.85, 0.6))
    assert v["recovery_ratio"]["in_context/4"] == pytest.approx(0.75 / 0.8)
    assert v["recovery_evidence"]["in_context"] == "recovery ratio lower bound >= 0.5 at n=4"
    assert v["label"] == "spurious"
    assert "the task returns in context with no weight update (in_context/4" in v["reason"]
    without = verdict(aligned=stage(0.9, 0.9), perturbed=mid, recovered__in_task__4=stage(0.1, 0.6))
    assert without["label"] != "spurious"
    # knowledge lost by its interval: the task coming back in context does not overrule it (mixed)
    lost = verdict(aligned=stage(0.9, 0.9), perturbed=stage(0.05, 0.25), recovered__in_context__4=stage(0.85, 0.25))
    assert lost["label"] == "mixed"
