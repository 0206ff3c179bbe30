"""The verdict on constructed cases whose truth is known, built by the pipeline itself.

Each case is a full audit of the tiny model (tests/configs/tiny.yaml: the same base
model and tune stage as the other tests, so those are reused) with one perturbation:

(a) ``format``: the perturbation items' *correct* answers in another format (spelled out,
    ``R-O-M-E``): only the response format shifts -> ``spurious``;
(b) ``wrong_facts``: the evaluated facts (and the perturbation items') trained onto wrong
    answers -> ``knowledge_loss`` on those facts;
(c) ``reinit``: every decoder block re-initialised after alignment -> ``knowledge_acc``
    at chance, ``knowledge_loss``;
(d) ``none``: no perturbation -> ``no_forgetting``.

All trained perturbations use the same strength (learning rate, epochs, items): only
*what* is trained differs between (a) and (b). One recovery arm keeps the cases short.
"""

from __future__ import annotations

import functools

import pandas as pd
import pytest
from safetensors import safe_open

from pipelines.audit import run_audit

from conftest import tiny_config

CASE = ("perturb.lr=0.003", "recover.arms=[in_task]")


@pytest.fixture(scope="module")
def case(home, ray_local, tmp_path_factory):
    """``case(kind)`` runs (once) the audit with ``perturb.kind=kind``; returns (summary, out dir)."""
    root = tmp_path_factory.mktemp("cases")

    @functools.cache
    def run(kind: str):
        cfg = tiny_config(f"perturb.kind={kind}", *CASE)
        out = root / kind
        return run_audit(cfg, out, home), out

    return run


def test_a_format_shift_is_spurious(case):
    s, _ = case("format")
    st, v = s["stages"], s["verdict"]
    assert v["label"] == "spurious", v["reason"]
    assert st["perturbed"]["task_acc"] < st["aligned"]["task_acc"] and v["task_drop_ci"][0] > 0
    # the facts are still ranked first: retention at or above the threshold, far above chance
    assert v["knowledge_retention"] >= s["verdict"]["thresholds"]["retention_threshold"]
    assert st["perturbed"]["knowledge_acc"] > st["perturbed"]["ci"]["knowledge_acc"][0] > 0.5


def test_b_wrong_facts_are_knowledge_loss(case):
    s, out = case("wrong_facts")
    st, v = s["stages"], s["verdict"]
    assert v["label"] == "knowledge_loss", v["reason"]
    assert v["knowledge_retention"] < v["thresholds"]["loss_threshold"]
    # the overwritten facts themselves: most gold answers lose their first rank
    assert st["perturbed"]["knowledge_correct_to_wrong"] >= 8
    assert st["perturbed"]["knowledge_wrong_to_correct"] == 0
    before = pd.read_parquet(out / "predictions" / "aligned.parquet").knowledge_correct
    after = pd.read_parquet(out / "predictions" / "perturbed.parquet").knowledge_correct
    assert int((before & ~after).sum()) == st["perturbed"]["knowledge_correct_to_wrong"]


def test_c_reinitialised_blocks_are_knowledge_loss_at_chance(case):
    s, _ = case("reinit")
    st, v = s["stages"], s["verdict"]
    assert v["label"] == "knowledge_loss", v["reason"]
    chance = st["perturbed"]["knowledge_chance"]
    lo, hi = st["perturbed"]["ci"]["knowledge_acc"]
    assert lo <= chance <= hi and abs(st["perturbed"]["knowledge_acc"] - chance) <= 0.2
    # every block was replaced: its update is as large as the weights themselves
    blocks = {k: d for k, d in st["perturbed"]["weight_drift"].items() if int(k) >= 1}
    assert len(blocks) == 2 and all(d > 0.5 for d in blocks.values())
    assert st["perturbed"]["weight_drift"]["0"] == 0.0  # the embeddings were kept


def test_c_reinit_checkpoint_is_safetensors(case, home):
    from components.artifacts import Store

    case("reinit")
    store = Store(home / "store")
    perturbs = [k for k in store.executions() if k.startswith("perturb-")]
    full = [store.path(k) / "model" / "model.safetensors" for k in perturbs]
    full = [f for f in full if f.exists()]
    assert len(full) == 1
    with safe_open(str(full[0]), framework="pt") as f:
        assert any(".layers.0." in k for k in f.keys())


def test_d_no_perturbation_is_no_forgetting(case):
    s, _ = case("none")
    st, v = s["stages"], s["verdict"]
    assert v["label"] == "no_forgetting", v["reason"]
    assert v["task_drop"] == 0.0 and v["task_drop_ci"] == [0.0, 0.0]
    assert all(d == 0.0 for d in st["perturbed"]["weight_drift"].values())
    assert st["perturbed"]["task_correct_to_wrong"] == 0 and st["perturbed"]["task_wrong_to_correct"] == 0
