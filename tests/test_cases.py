"""The verdict on constructed cases whose truth is known, built by the pipeline itself.

Each case is a full audit of the tiny model (tests/configs/tiny.yaml: the same base
model and tune stage as the other tests, so those are reused) with one perturbation.
Nothing here is circular: the knowledge measures rank the gold answer among the answers
the *base* model finds most likely (hard candidates), in phrasings the tune stage never
trains, and the overwritten facts are trained onto invented answers that are in no
candidate set.

- ``none``: nothing trained -> ``no_forgetting``, knowledge retained;
- ``refusal`` and ``abstain`` (every answer ``Unknown.``: a disposition shift without
  refusal words): the task drops, the knowledge measures stay -> ``spurious``;
- ``reinit`` (every decoder block re-initialised) and a destructive learning rate:
  knowledge at chance, not returning -> ``knowledge_loss``;
- ``wrong_facts``: the evaluated facts trained onto invented answers -> the knowledge
  measures fall at ``perturbed``; the label then follows the recovery evidence;
- ``wrong_facts`` with half of the facts overwritten: the overwritten half falls; in
  this 2-layer model the update also drags the other half down (measured: 0.92 -> 0.36
  for the kept facts, the same as the overwritten ones), so the "retention around 0.5"
  of the construction holds on SmolLM2 (tests/test_real_model.py), not here: the test
  asserts what the tiny model does, that knowledge is not retained.

All trained perturbations use the same strength (learning rate 0.002, epochs, items)
except the destructive one (learning rate 0.1): only *what* is trained differs. At 0.003
the tiny model's knowledge measures already sag under a refusal (retention 0.79
[0.65, 0.90], inconclusive), and a format shift sags at 0.002 too (0.85 [0.75, 0.96]):
a 2-layer model does not keep facts apart from how it answers, so the format case is
left to SmolLM2.
"""

from __future__ import annotations

import functools

import pandas as pd
import pytest
from safetensors import safe_open

from pipelines.audit import run_audit

from conftest import tiny_config

CASE = ("perturb.lr=0.002", "recover.arms=[in_task]", "data.n_eval=40")
MEASURES = ("knowledge_acc", "knowledge_mrr", "knowledge_margin")


@pytest.fixture(scope="module")
def case(home, ray_local, tmp_path_factory):
    """``case(kind, *overrides)`` runs (once) the audit with ``perturb.kind=kind``;
    returns (summary, out dir)."""
    root = tmp_path_factory.mktemp("cases")

    @functools.cache
    def run(kind: str, *extra: str):
        cfg = tiny_config(f"perturb.kind={kind}", *CASE, *extra)
        out = root / "_".join([kind, *[e.replace("=", "-").replace(".", "_") for e in extra]])
        return run_audit(cfg, out, home), out

    return run


def _retained(v: dict, measure: str = "knowledge_acc") -> None:
    lo, hi = v["retention"][measure]["ci"]
    assert lo >= v["thresholds"]["retention_threshold"], (measure, v["retention"][measure])


def test_nothing_trained_is_no_forgetting(case):
    s, _ = case("none")
    st, v = s["stages"], s["verdict"]
    assert v["label"] == "no_forgetting", v["reason"]
    assert v["task_drop"] == 0.0 and v["task_drop_ci"] == [0.0, 0.0]
    for m in MEASURES:
        assert v["retention"][m]["value"] == pytest.approx(1.0)
    assert all(d == 0.0 for d in st["perturbed"]["weight_drift"].values())
    assert st["perturbed"]["task_correct_to_wrong"] == 0 and st["perturbed"]["task_wrong_to_correct"] == 0


@pytest.mark.parametrize("kind", ["refusal", "abstain"])
def test_a_disposition_or_format_shift_is_spurious(case, kind):
    s, _ = case(kind)
    st, v = s["stages"], s["verdict"]
    assert v["label"] == "spurious", v["reason"]
    assert st["perturbed"]["task_acc"] < st["aligned"]["task_acc"] and v["task_drop_ci"][0] > 0
    # the perturbation was learned on held-out items
    assert st["perturbed"]["perturb_acc"] >= 0.75
    _retained(v, v["decided_by"])
    assert st["perturbed"]["ci"]["knowledge_acc"][0] > 2 * st["perturbed"]["knowledge_chance"]


def test_wrong_facts_lower_every_knowledge_measure_and_the_label_follows_recovery(case):
    s, out = case("wrong_facts")
    st, v = s["stages"], s["verdict"]
    # the overwritten facts lose their rank: every ranking measure falls at perturbed
    for m in MEASURES:
        assert st["perturbed"]["ci"][m][1] < st["aligned"]["ci"][m][0], m
    assert v["retention"]["knowledge_acc"]["ci"][1] < v["thresholds"]["loss_threshold"]
    assert st["perturbed"]["knowledge_correct_to_wrong"] >= 8
    before = pd.read_parquet(out / "predictions" / "aligned.parquet")
    after = pd.read_parquet(out / "predictions" / "perturbed.parquet")
    assert int((before.knowledge_correct & ~after.knowledge_correct).sum()) == st["perturbed"]["knowledge_correct_to_wrong"]
    # the invented answers are in no candidate set: the case is not circular
    invented = set(s["data"]["overwritten"].values())
    assert len(invented) >= 8 and not invented & set(after.candidates.explode())
    # the label rests on the recovery evidence on disjoint items
    lo = v["knowledge_after_recovery_ci"]["in_task/4"][0]
    if lo is not None and lo >= v["thresholds"]["retention_threshold"]:
        assert v["label"] == "spurious", v["reason"]
    else:
        assert v["label"] in ("knowledge_loss", "mixed"), v["reason"]
        assert v["label"] == "knowledge_loss" or "task returns" in v["reason"] or "disagree" in v["reason"]


def test_half_of_the_facts_overwritten_fall_and_are_not_retained(case):
    s, out = case("wrong_facts", "perturb.overwrite_fraction=0.5")
    v = s["verdict"]
    over = set(s["data"]["overwritten"])
    assert len(over) == 20  # of 40 evaluated facts
    before = pd.read_parquet(out / "predictions" / "aligned.parquet")
    after = pd.read_parquet(out / "predictions" / "perturbed.parquet")
    chance = s["stages"]["perturbed"]["knowledge_chance"]
    m = after.item_id.isin(over)
    ret_over = (after[m].knowledge_acc.mean() - chance) / (before[m].knowledge_acc.mean() - chance)
    assert ret_over < v["thresholds"]["loss_threshold"]
    assert v["retention"]["knowledge_acc"]["ci"][1] < v["thresholds"]["retention_threshold"]
    assert v["label"] not in ("spurious", "no_forgetting"), v["reason"]


@pytest.mark.parametrize("how", [("reinit",), ("refusal", "perturb.lr=0.1")])
def test_a_wrecked_model_is_knowledge_loss_at_chance(case, how):
    s, _ = case(*how)
    st, v = s["stages"], s["verdict"]
    assert v["label"] == "knowledge_loss", v["reason"]
    chance = st["perturbed"]["knowledge_chance"]
    lo, hi = st["perturbed"]["ci"]["knowledge_acc"]
    assert lo <= chance + 0.1 and st["perturbed"]["knowledge_acc"] <= chance + 0.25
    assert v["retention"]["knowledge_acc"]["ci"][1] < v["thresholds"]["loss_threshold"]


def test_reinit_replaces_every_block_and_saves_safetensors(case, home):
    from components.artifacts import Store

    s, _ = case("reinit")
    st = s["stages"]
    blocks = {k: d for k, d in st["perturbed"]["weight_drift"].items() if int(k) >= 1}
    assert len(blocks) == 2 and all(d > 0.5 for d in blocks.values())
    assert st["perturbed"]["weight_drift"]["0"] == 0.0  # the embeddings were kept
    store = Store(home / "store")
    perturbs = [k for k in store.executions() if k.startswith("perturb-")]
    full = [store.path(k) / "model" / "model.safetensors" for k in perturbs]
    full = [f for f in full if f.exists()]
    assert len(full) >= 1
    with safe_open(str(full[0]), framework="pt") as f:
        assert any(".layers.0." in k for k in f.keys())
