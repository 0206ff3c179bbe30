"""The whole DAG on the tiny model: Ray tasks, the stage store, MLflow records, the contract."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from components.artifacts import Store
from pipelines.audit import run_audit, stage_order

from conftest import SCHEMA, tiny_config

STAGES = ["base", "aligned", "perturbed", "recovered/in_task/4", "recovered/irrelevant/4"]


def test_summary_matches_the_contract(tiny_run):
    cfg, out, summary = tiny_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    jsonschema.validate(on_disk, json.loads(SCHEMA.read_text()))
    assert list(on_disk["stages"]) == STAGES == stage_order(cfg)
    # the default tiny run perturbs hard (lr 0.01 on a 2-layer model): the task is gone and
    # the facts partly sag, so the retention interval reaches across the 0.8 threshold
    v = on_disk["verdict"]
    lo, hi = v["knowledge_retention_ci"]
    assert v["label"] == "inconclusive" and "straddles" in v["reason"], v["reason"]
    assert lo < v["thresholds"]["retention_threshold"] <= hi or lo < v["thresholds"]["loss_threshold"] <= hi
    assert v["task_drop_ci"][0] > 0.5
    assert set(on_disk["verdict"]["recovery_ratio"]) == {"in_task/4", "irrelevant/4"}


def test_metric_values_make_sense(tiny_run):
    _, _, s = tiny_run
    st = s["stages"]
    # the pretrained tiny model knows its evaluation facts: they were filtered to be known
    assert st["base"]["task_acc"] == 1.0
    assert st["base"]["knowledge_acc"] >= 0.75
    assert st["base"]["knowledge_chance"] == 1 / 8  # K = 8 candidates
    assert st["base"]["knowledge_chances"]["knowledge_mrr"] < 1 / 8
    assert st["base"]["kl_to_base"] == 0.0 and st["aligned"]["kl_to_aligned"] == 0.0
    assert st["perturbed"]["kl_to_aligned"] > 0
    # the refusal perturbation is learned: held-out questions get refusals
    assert st["perturbed"]["perturb_acc"] > st["aligned"]["perturb_acc"]
    for name in STAGES:
        for k in ("task_acc", "knowledge_acc"):
            lo, hi = st[name]["ci"][k]
            assert lo <= st[name][k] <= hi


def test_outputs_beside_the_summary(tiny_run):
    cfg, out, s = tiny_run
    m = pd.read_parquet(out / "metrics.parquet")
    assert list(m.columns) == ["stage", "metric", "layer", "value", "ci_low", "ci_high"]
    row = m[(m.stage == "perturbed") & (m.metric == "task_acc")].iloc[0]
    assert row.value == pytest.approx(s["stages"]["perturbed"]["task_acc"])
    assert set(m.stage) >= set(STAGES) | {"verdict"}
    for name in STAGES:
        p = pd.read_parquet(out / "predictions" / f"{name}.parquet")
        assert len(p) == cfg.data.n_eval
        assert p.task_correct.mean() == pytest.approx(s["stages"][name]["task_acc"])
    assert "perturb:" in (out / "config.yaml").read_text()
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["pools"]["eval"]["n_items"] == cfg.data.n_eval
    assert len(manifest["pools"]["eval"]["sha256"]) == 64


def test_probes_drift_and_transitions_in_the_outputs(tiny_run):
    cfg, out, s = tiny_run
    st = s["stages"]
    L = cfg.model.tiny_layers
    m = pd.read_parquet(out / "metrics.parquet")
    for name in STAGES:
        # a linear probe per layer (0 = embeddings .. L), with its chance level and CI
        assert sorted(map(int, st[name]["probe_acc"])) == list(range(L + 1))
        assert 0 < st[name]["probe_chance"] < 1
        for lay, v in st[name]["probe_acc"].items():
            lo, hi = st[name]["ci"]["probe_acc"][lay]
            assert 0 <= lo <= v <= hi <= 1
        rows = m[(m.stage == name) & (m.metric == "probe_acc")]
        assert sorted(rows.layer.tolist()) == list(range(L + 1))
    assert "weight_drift" not in st["base"]
    for name in STAGES[1:]:
        # every trained stage moved its blocks (LoRA on all linear layers), not the embeddings
        drift = st[name]["weight_drift"]
        assert drift["0"] == 0.0 and all(drift[str(k)] > 0 for k in range(1, L + 1))
        rows = m[(m.stage == name) & (m.metric == "weight_drift")]
        assert rows.set_index("layer").value.to_dict() == pytest.approx({int(k): v for k, v in drift.items()})
        assert rows.ci_low.isna().all()  # exact, not an estimate over items
        # transitions from the parent stage, consistent with the accuracies
        parent = st[name]["transitions_from"]
        delta = st[name]["task_acc"] - st[parent]["task_acc"]
        n = cfg.data.n_eval
        assert (st[name]["task_wrong_to_correct"] - st[name]["task_correct_to_wrong"]) / n == pytest.approx(delta)
        lo, hi = st[name]["ci"]["task_correct_to_wrong"]
        assert lo <= st[name]["task_correct_to_wrong"] <= hi
    angles = st["perturbed"]["principal_angle_mean"]
    assert sorted(map(int, angles)) == list(range(1, L + 1)) and all(0 < a <= 90 for a in angles.values())
    v = s["verdict"]
    assert v["probe_chance"] == st["base"]["probe_chance"]
    assert "probe_retention" in v and len(v["probe_retention_ci"]) == 2
    verdict_rows = m[m.stage == "verdict"].set_index("metric")
    assert verdict_rows.loc["task_drop", "ci_low"] == pytest.approx(v["task_drop_ci"][0])


def test_mlflow_parent_and_nested_runs(tiny_run):
    _, out, s = tiny_run
    client = MlflowClient(s["mlflow"]["tracking_uri"])
    parent = client.get_run(s["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["verdict"] == s["verdict"]["label"]
    assert parent.data.tags["model_digest"] == s["model_digest"]
    assert len(parent.data.tags["git_commit"]) >= 7
    assert parent.data.params["perturb.kind"] == "refusal"
    assert parent.data.metrics["task_drop"] == pytest.approx(s["verdict"]["task_drop"])
    top = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "metrics.parquet", "config.yaml", "data_manifest.json", "predictions"} <= top
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == set(STAGES)
    aligned = by_name["aligned"]
    assert aligned.data.metrics["task_acc"] == pytest.approx(s["stages"]["aligned"]["task_acc"])
    loss = client.get_metric_history(aligned.info.run_id, "train/loss")
    assert len(loss) >= 4 and sorted(m.step for m in loss) == list(range(len(loss)))
    arts = {f.path for f in client.list_artifacts(aligned.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in arts
    assert by_name["perturbed"].data.metrics["kl_to_aligned"] == pytest.approx(
        s["stages"]["perturbed"]["kl_to_aligned"])
    # per-layer metrics under names that say layer, each with its interval beside it
    am = aligned.data.metrics
    for k, v in s["stages"]["aligned"]["probe_acc"].items():
        key = f"probe_acc/layer_{int(k):02d}"
        assert am[key] == pytest.approx(v)
        assert [am[f"{key}_ci_low"], am[f"{key}_ci_high"]] == pytest.approx(s["stages"]["aligned"]["ci"]["probe_acc"][k])
        assert [m.step for m in client.get_metric_history(aligned.info.run_id, key)] == [0]
    assert "probe_acc" not in am and "weight_drift/layer_01" in am
    for k in ("task_acc", "knowledge_acc", "kl_to_aligned"):
        assert [am[f"{k}_ci_low"], am[f"{k}_ci_high"]] == pytest.approx(s["stages"]["aligned"]["ci"][k])
    # params that apply only: no sweep.*, no biography.* on capitals; model.tiny_* for the tiny model
    params = parent.data.params
    assert not any(k.startswith(("sweep.", "biography.")) for k in params) and "model.tiny_layers" in params
    assert parent.info.run_name.startswith(f"audit-capitals-tiny-llama-{s['config_digest'][:8]}-s0-")
    assert parent.data.tags["mlflow.source.name"] == "cl-audit run" and parent.data.tags["mlflow.user"]
    assert parent.data.tags["mlflow.source.type"] == "LOCAL"


def test_every_checkpoint_is_a_logged_model_that_answers_as_the_probe(tiny_run, monkeypatch):
    """Each checkpoint is a pyfunc logged model of its stage run, its metrics linked to it;
    loaded back (``models:/<id>`` and ``runs:/<run>/model``) it answers the evaluation
    questions exactly as the audit's predictions say."""
    import mlflow.pyfunc

    _, out, s = tiny_run
    uri = s["mlflow"]["tracking_uri"]
    client = MlflowClient(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ and runs:/ URIs are resolved in the global store
    _answers_as_the_probe(client, out, s)


def _answers_as_the_probe(client, out, s) -> None:
    import mlflow.pyfunc

    models = {m.tags["cl_audit.stage"]: m for m in client.search_logged_models([s["mlflow"]["experiment_id"]])
              if m.source_run_id in s["mlflow"]["stage_run_ids"].values()}
    assert set(models) == set(STAGES)
    for name, m in models.items():
        assert m.source_run_id == s["mlflow"]["stage_run_ids"][name] and str(m.status).endswith("READY")
    perturbed = models["perturbed"]
    linked = {x.key for x in perturbed.metrics}
    assert {"task_acc", "task_acc_ci_low", "knowledge_acc", "probe_acc/layer_01"} <= linked
    pred = pd.read_parquet(out / "predictions" / "perturbed.parquet")
    got = mlflow.pyfunc.load_model(f"models:/{perturbed.model_id}").predict(pred["question"].tolist())
    assert got == pred["response"].tolist()
    rid = s["mlflow"]["stage_run_ids"]["recovered/in_task/4"]
    pred = pd.read_parquet(out / "predictions" / "recovered" / "in_task" / "4.parquet")
    got = mlflow.pyfunc.load_model(f"runs:/{rid}/model").predict(pred[["question"]])
    assert got == pred["response"].tolist()


def test_rerun_reuses_every_stage(tiny_run, home, tmp_path):
    cfg, _, first = tiny_run
    store = Store(home / "store")
    before = store.executions()
    again = run_audit(cfg, tmp_path / "again", home)
    assert store.executions() == before  # nothing recomputed
    assert again["stages"] == first["stages"]
    assert again["verdict"]["label"] == first["verdict"]["label"]
    assert again["mlflow"]["run_id"] != first["mlflow"]["run_id"]


def test_changed_penalty_recomputes_only_downstream(tiny_run, home, tmp_path):
    cfg = tiny_config("perturb.kl_penalty=1.0", "recover.arms=[in_task]")
    store = Store(home / "store")
    n0 = len(store.executions())
    s = run_audit(cfg, tmp_path / "kl", home)
    new = [k.split("-")[0] for k in store.executions()[n0:]]
    # tune and the base/aligned probes are reused; perturb, one recovery, their probes and
    # the weight-drift analysis (over the new checkpoints) run
    assert sorted(new) == ["drift", "perturb", "probe", "probe", "recover"]
    assert s["stages"]["aligned"] == tiny_run[2]["stages"]["aligned"]


def test_driver_runs_the_dag_without_torch():
    """The audit's driver imports no torch until the DAG is done: with the stage workers
    each holding torch and a model, a driver copy of torch (~150 MB) adds to the peak."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "import pipelines.cli, pipelines.audit, pipelines.dag, components.recover\n"
        "from components.artifacts import machine_info\n"
        "machine_info()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_allocator_choice(monkeypatch):
    """The local Ray's stage workers get mimalloc from the installed wheel; ``system``, a
    cluster (``RAY_ADDRESS``) or an unknown name are handled."""
    from components.errors import UserError
    from pipelines.dag import worker_allocator_env

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("CL_AUDIT_MALLOC", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = worker_allocator_env()
    assert list(env) == ["LD_PRELOAD"]
    lib = Path(env["LD_PRELOAD"])
    assert lib.name == "libmimalloc.so" and lib.is_file()
    monkeypatch.setenv("CL_AUDIT_MALLOC", "MiMalloc")
    assert worker_allocator_env() == env
    monkeypatch.setenv("CL_AUDIT_MALLOC", "system")
    assert worker_allocator_env() == {}
    monkeypatch.setenv("CL_AUDIT_MALLOC", "mimalloc")
    monkeypatch.setenv("LD_PRELOAD", "/opt/my-profiler.so")  # the user's own preload is kept
    assert worker_allocator_env() == {}
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert worker_allocator_env() == {}
    monkeypatch.setenv("CL_AUDIT_MALLOC", "jemalloc")
    with pytest.raises(UserError, match="CL_AUDIT_MALLOC='jemalloc': expected one of mimalloc, system"):
        worker_allocator_env()


def test_stage_workers_run_on_mimalloc_and_hand_memory_back(ray_local):
    """A stage task's process has mimalloc mapped, and the release after a stage reaches
    it: 200 MB freed in the task leave the worker's RSS within 100 MB of where it started."""
    import ray

    @ray.remote(num_cpus=1)
    def task():
        import numpy as np

        from components.runner import release_memory as _release_memory

        def rss() -> int:
            return int(next(x for x in open("/proc/self/status") if x.startswith("VmRSS")).split()[1]) * 1024

        mapped = any("libmimalloc" in x for x in open("/proc/self/maps"))
        _release_memory()  # a reused worker: nothing freed-but-kept from an earlier task
        before = rss()
        blocks = [np.ones(2**20 // 8) for _ in range(200)]  # 200 blocks of 1 MiB
        grown = rss() - before
        del blocks
        _release_memory()
        return mapped, grown, rss() - before

    mapped, grown, left = ray.get(task.remote())
    assert mapped
    assert grown > 190 * 2**20
    assert left < 100 * 2**20
