"""Audits of checkpoints that already exist (``--aligned`` / ``--perturbed``, issue 17):
fine-tuned outside cl-audit the way a user would, given back as a directory, an adapter,
a merged copy and an MLflow model URI, and refused with one line when they do not fit
the base model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, tiny_config

SCALARS = ("task_acc", "knowledge_acc", "knowledge_mrr", "knowledge_margin", "gold_logprob", "perturb_acc",
           "kl_to_base", "kl_to_aligned", "first_token_prob")


@pytest.fixture(scope="module")
def pipeline(tiny_run, home):
    """The session's tiny audit, and the checkpoints its tune and perturb stages saved
    (read back from the store: every stage is reused)."""
    from components import runner

    cfg, out, summary = tiny_run
    prep = runner.prepare(cfg, home)
    base = {"checkpoint": prep["base"], "history": []}
    aligned = runner.train("tune", cfg, home, base, prep["data"])
    perturbed = runner.train("perturb", cfg, home, aligned, prep["data"])
    assert aligned["reused"] and perturbed["reused"]
    return {"cfg": cfg, "summary": summary, "prep": prep, "aligned": aligned, "perturbed": perturbed,
            "tune_adapter": Path(aligned["checkpoint"]["adapters"][-1]),
            "perturb_adapter": Path(perturbed["checkpoint"]["adapters"][-1])}


def _audit(home, tmp_path, **given):
    from pipelines.audit import run_audit

    cfg = tiny_config(*[f"stages.{k}.from={json.dumps(str(v))}" for k, v in given.items()])
    return run_audit(cfg, tmp_path / "run", home)


def _stage_scalars(summary, stage):
    return {k: summary["stages"][stage][k] for k in SCALARS if k in summary["stages"][stage]}


def _merged(ckpt: dict, out: Path) -> Path:
    """A full-weight copy of a pipeline checkpoint, as a user makes one:
    ``PeftModel.from_pretrained(...).merge_and_unload().save_pretrained``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt["base_dir"], dtype=torch.float32)
    for a in ckpt["adapters"]:
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(ckpt["base_dir"]).save_pretrained(out)
    return out


def test_pipeline_adapters_given_back_give_the_same_audit(pipeline, home, tmp_path):
    """--aligned and --perturbed with the adapters the pipeline saved: every stage's
    metrics and the verdict are those of the audit that trained them (bit for bit)."""
    s = _audit(home, tmp_path, aligned=pipeline["tune_adapter"], perturbed=pipeline["perturb_adapter"])
    ref = pipeline["summary"]
    for stage in ref["stages"]:
        assert _stage_scalars(s, stage) == _stage_scalars(ref, stage), stage
    assert s["verdict"]["label"] == ref["verdict"]["label"]
    assert s["verdict"]["task_drop"] == ref["verdict"]["task_drop"]
    g = s["given"]["perturbed"]
    assert (g["kind"], g["adapter"], g["applied_to"]) == ("adapter", True, "aligned")
    assert g["path"] == str(pipeline["perturb_adapter"])
    assert len(g["weights_sha256"]) == 64
    assert s["given"]["aligned"]["ref"] == str(pipeline["tune_adapter"])


def test_merged_full_weights_given_as_perturbed_alone(pipeline, home, tmp_path):
    """A merged full-weight copy of the pipeline's perturbed model, given alone: the
    aligned stage is the base model itself, the perturbed stage's metrics are the
    pipeline's, and its weight drift is a full delta from the base."""
    merged = _merged(pipeline["perturbed"]["checkpoint"], tmp_path / "merged")
    s = _audit(home, tmp_path, perturbed=merged)
    ref = pipeline["summary"]
    aligned = _stage_scalars(s, "aligned")
    assert aligned.pop("kl_to_aligned") == 0.0
    assert aligned == {k: v for k, v in _stage_scalars(ref, "base").items() if k in aligned}
    got, want = _stage_scalars(s, "perturbed"), _stage_scalars(ref, "perturbed")
    for k in ("task_acc", "knowledge_acc", "knowledge_mrr", "perturb_acc"):
        assert got[k] == want[k], k
    for k in ("knowledge_margin", "gold_logprob", "kl_to_base"):  # fp32 merge order: equal to 1e-5
        assert math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-6), (k, got[k], want[k])
    assert s["given"]["aligned"]["kind"] == "base"
    assert s["given"]["perturbed"]["kind"] == "dir" and not s["given"]["perturbed"]["adapter"]
    drift = s["stages"]["perturbed"].get("weight_drift") or {}
    # a full delta from the base: the LoRA updates the blocks (layers 1, 2), not the embeddings (layer 0)
    assert drift["0"] == 0.0 and drift["1"] > 0.1 and drift["2"] > 0.1
