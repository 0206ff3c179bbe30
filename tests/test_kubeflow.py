"""The Kubeflow pipeline: compiled YAML, and a real local run (kfp.local) on the tiny model
whose numbers equal those of `cl-audit run` with the same config and seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import yaml

from components.registry import config_from_tree
from pipelines.kubeflow import build_pipeline, compile_pipeline, default_image

from conftest import ROOT, tiny_config

COMMITTED = ROOT / "infra" / "kubeflow" / "audit-pipeline.yaml"
# How infra/kubeflow/audit-pipeline.yaml was made (infra/README.md says the same).
COMMITTED_ARGS = ["compile", "capitals", "--tracking-uri", "http://mlflow.cl-audit.svc.cluster.local:5000"]


def _component_of(spec: dict, task: str) -> dict:
    ref = spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]
    return spec["components"][ref]


def test_compiled_pipeline_loads_back_with_typed_artifacts(tmp_path):
    from kfp import components

    cfg = tiny_config()
    path = compile_pipeline(cfg, tmp_path / "p.yaml")
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "cl-audit"
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert {"prepare-data", "tune", "perturb", "probe", "verdict", "for-loop-1"} <= set(tasks)
    out = lambda task, name: _component_of(spec, task)["outputDefinitions"]["artifacts"][name]["artifactType"]  # noqa: E731
    assert out("prepare-data", "data")["schemaTitle"] == "system.Dataset"
    assert out("prepare-data", "base_model")["schemaTitle"] == "system.Model"
    assert out("tune", "aligned")["schemaTitle"] == "system.Model"
    assert out("perturb", "perturbed")["schemaTitle"] == "system.Model"
    assert out("probe", "metrics")["schemaTitle"] == "system.Metrics"
    assert out("verdict", "metrics")["schemaTitle"] == "system.Metrics"
    # the recovered checkpoints and their probes reach the verdict as collected lists
    vin = _component_of(spec, "verdict")["inputDefinitions"]["artifacts"]
    assert vin["recovered"]["isArtifactList"] and vin["recovered_probes"]["isArtifactList"]
    # the parameters are the audit config: the default resolves to the same config
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["config"]["parameterType"] == "STRUCT"
    assert config_from_tree(params["config"]["defaultValue"]).digest() == cfg.digest()
    assert params["overrides"]["parameterType"] == "LIST"
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {default_image()} == {"cl-audit:0.1.0"}
    # resources from the config's ray section
    tune_exec = spec["deploymentSpec"]["executors"][_component_of(spec, "tune")["executorLabel"]]
    assert tune_exec["container"]["resources"]["resourceCpuLimit"] == "1"


def test_committed_pipeline_is_what_compile_writes(tmp_path):
    out = tmp_path / "audit-pipeline.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", *COMMITTED_ARGS, "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"Wrote {out}" in r.stdout
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(COMMITTED.read_text()), (
        "infra/kubeflow/audit-pipeline.yaml is stale: run cl-audit " + " ".join(COMMITTED_ARGS))


def test_compile_bad_override_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "compile", "--set", "probe.n_bootstrap=1",
                        "--out", str(tmp_path / "p.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and "probe.n_bootstrap" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


def test_local_pipeline_run_equals_cl_audit_run(tiny_run, home, tmp_path, monkeypatch):
    """kfp.local runs every component as a subprocess (the same stage functions, a fresh
    stage store); its summary and metrics equal the Ray DAG's for the same config."""
    from kfp import local

    cfg, ref_dir, ref = tiny_run
    kfp_home = tmp_path / "home"
    kfp_home.mkdir()
    # the tiny base model is shared (built once per session); the stage store is not, so
    # every stage is computed again inside the pipeline's components
    (kfp_home / "cache").symlink_to(home / "cache", target_is_directory=True)
    monkeypatch.setenv("CL_AUDIT_HOME", str(kfp_home))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    root = tmp_path / "root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    uri = f"sqlite:///{kfp_home / 'mlflow.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "non-Python base image": the image has Python
        build_pipeline(cfg, tracking_uri=uri)()

    (run,) = [p for p in root.iterdir() if p.name.startswith("cl-audit-")]
    out = run / "verdict" / "audit"
    got = json.loads((out / "summary.json").read_text())
    computed = [line.split()[1].split("-")[0] for line in (kfp_home / "store" / "executions.log").read_text().splitlines()]
    assert sorted(computed) == sorted(["drift", "filter", "candidates", "tune", "perturb", "recover", "recover"] + ["probe"] * 5)
    for k in ("config_digest", "model_digest", "data_digest", "seed"):
        assert got[k] == ref[k]
    # every metric and CI of every checkpoint is equal; the weight-drift values are equal up
    # to float32 summation order (the verdict component merges the LoRA deltas with another
    # BLAS thread count than the Ray drift task)
    drift_keys = {"weight_drift", "update_norm", "principal_angle_mean", "principal_angle_min"}

    def split(stages):
        exact = {n: {k: v for k, v in st.items() if k not in drift_keys} for n, st in stages.items()}
        drift = {n: {k: v for k, v in st.items() if k in drift_keys} for n, st in stages.items()}
        return exact, drift

    (got_exact, got_drift), (ref_exact, ref_drift) = split(got["stages"]), split(ref["stages"])
    differing = sorted((n, k) for n in ref_exact for k in set(ref_exact[n]) | set(got_exact.get(n, {}))
                       if got_exact.get(n, {}).get(k) != ref_exact[n].get(k))
    assert differing == [], [(n, k, got_exact.get(n, {}).get(k), ref_exact[n].get(k)) for n, k in differing]
    assert set(got_exact) == set(ref_exact)
    assert any(d for d in ref_drift.values())
    for n, d in ref_drift.items():
        for k, per_layer in d.items():
            assert got_drift[n][k] == pytest.approx(per_layer, rel=1e-6, abs=1e-9), (n, k)
    assert got["verdict"] == ref["verdict"]
    assert got["verdict"]["task_drop"] == ref["verdict"]["task_drop"]
    assert got["mlflow"]["tracking_uri"] == uri and got["mlflow"]["run_id"] != ref["mlflow"]["run_id"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "metrics.parquet"), pd.read_parquet(ref_dir / "metrics.parquet"))
    # the probe components' kfp Metrics carry the same values
    probes = {}
    for f in run.rglob("executor_output.json"):
        arts = json.loads(f.read_text()).get("artifacts", {})
        if "result" in arts and "metrics" in arts:
            stage = arts["result"]["artifacts"][0]["metadata"]["stage"]
            probes[stage] = arts["metrics"]["artifacts"][0]["metadata"]
    assert set(probes) == set(ref["stages"])
    for stage, m in probes.items():
        assert m["task_acc"] == ref["stages"][stage]["task_acc"]
        assert m["knowledge_acc"] == ref["stages"][stage]["knowledge_acc"]
    verdict_metrics = json.loads((run / "verdict" / "executor_output.json").read_text())
    vm = verdict_metrics["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert vm["task_drop"] == ref["verdict"]["task_drop"]
    assert vm["perturbed/kl_to_aligned"] == ref["stages"]["perturbed"]["kl_to_aligned"]
    # MLflow: the same parent/nested structure as cl-audit run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(got["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["verdict"] == ref["verdict"]["label"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_name for c in children} == set(ref["stages"])


def test_checkpoint_artifact_round_trip(tmp_path):
    """A checkpoint artifact holds its adapters and JSON, with paths relative to itself."""
    from pipelines.kubeflow_steps import export_checkpoint, import_checkpoint

    a = tmp_path / "adapter"
    a.mkdir()
    (a / "adapter_model.safetensors").write_bytes(b"x")
    ckpt = {"name": "aligned", "base_dir": "/b", "adapters": [str(a)], "full_dir": None, "digest": "tune-1"}
    art = tmp_path / "aligned"
    export_checkpoint(ckpt, art, {"history": [], "n_items": 3})
    assert json.loads((art / "checkpoint.json").read_text())["adapters"] == ["adapters/0"]
    moved = tmp_path / "elsewhere"
    art.rename(moved)  # an artifact is read wherever the next component finds it
    back = import_checkpoint(moved, tmp_path / "base")
    assert back["adapters"] == [str(moved / "adapters" / "0")]
    assert back["base_dir"] == str(tmp_path / "base" / "model") and back["digest"] == "tune-1"
    assert (moved / "adapters" / "0" / "adapter_model.safetensors").read_bytes() == b"x"
    assert json.loads((moved / "stage.json").read_text())["n_items"] == 3
