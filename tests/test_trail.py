"""The audit trail against a real ``mlflow server`` on 127.0.0.1 (sqlite backend, served
artifacts): lineage tags and dataset inputs, the manifest and ``verify``, the model
registry, ``history`` and ``compare`` of two tiny audits (with and without
``perturb.freeze_layers``)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from components.data import Item, items_sha256
from pipelines.audit import items_from_frame
from components.verdict import bootstrap_diff
from pipelines import trail

from conftest import ROOT, TINY, MlflowServer, tiny_config

REGISTERED = "tiny-audit"


def cli(*args: str, home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CL_AUDIT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on a free port of 127.0.0.1; stopped at the end, also on failure."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield srv.start().uri, srv.artifacts
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def audits(server, home, ray_local, tmp_path_factory):
    """Two tiny audits on the server: A registers its checkpoints; B freezes the bottom layer."""
    from pipelines.audit import run_audit

    uri, _ = server
    out = tmp_path_factory.mktemp("trail")
    a = run_audit(tiny_config(), out / "a", home, uri, register=REGISTERED)
    b = run_audit(tiny_config("perturb.freeze_layers=1"), out / "b", home, uri)
    return a, out / "a", b, out / "b"


def _flip_byte(path: Path, offset: int = 100) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:])
    return data


def test_lineage_tags_and_dataset_inputs(server, audits):
    uri, _ = server
    a, out_a, b, _ = audits
    client = MlflowClient(uri)
    parent = client.get_run(a["mlflow"]["run_id"])
    t = parent.data.tags
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert t["git_commit"] == t["mlflow.source.git.commit"] == head
    assert t["git_dirty"] in {"true", "false"}
    assert t["version.torch"] == torch.__version__ and t["version.mlflow"] == mlflow.__version__
    assert t["cl_audit.seed"] == "0" and t["cl_audit.kind"] == "audit"
    assert t["machine.cpu_count"] == str(os.cpu_count())
    assert t["machine.gpu_count"] == str(torch.cuda.device_count())
    assert t["model_digest"] == a["model_digest"] and len(a["model_digest"]) == 64
    assert t["model.source"].startswith("tiny-llama: LlamaForCausalLM") and t["model.source"] == a["model_source"]

    # every pool of the split is a dataset input of the audit, with the data manifest's digest
    pools = json.loads((out_a / "data_manifest.json").read_text())["pools"]
    got = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert set(got) == set(pools)
    for name, d in got.items():
        tags = {x.key: x.value for x in d.tags}
        assert tags["sha256"] == pools[name]["sha256"] and d.dataset.digest == pools[name]["sha256"][:32]
        assert tags["n_items"] == str(pools[name]["n_items"])
        assert tags["mlflow.data.context"] == ("evaluation" if name in ("eval", "perturb_eval") else "training")

    runs = a["mlflow"]["stage_run_ids"]
    child = {name: client.get_run(rid) for name, rid in runs.items()}
    for name, up in (("aligned", "base"), ("perturbed", "aligned"), ("recovered/in_task/4", "perturbed"),
                     ("recovered/irrelevant/4", "perturbed")):
        ct = child[name].data.tags
        assert ct["mlflow.parentRunId"] == parent.info.run_id
        assert ct["cl_audit.upstream.stage"] == up and ct["cl_audit.upstream.run_id"] == runs[up]
        assert ct["git_commit"] == head and ct["model_digest"] == a["model_digest"]
        expected_key = f"base-{a['model_digest'][:20]}" if up == "base" else child[up].data.tags["cl_audit.train_key"]
        assert ct["cl_audit.upstream.key"] == expected_key
        assert ct["cl_audit.kl_reference.run_ids"] == f"{runs['base']},{runs['aligned']}"

    # the recovery run trained on exactly its 4 items: the logged source holds them, digest and all
    rec = child["recovered/in_task/4"].inputs.dataset_inputs
    assert [d.dataset.name for d in rec] == ["recover.in_task.4", "eval", "perturb_eval"]
    ds = rec[0]
    tags = {x.key: x.value for x in ds.tags}
    assert tags["mlflow.data.context"] == "training" and tags["n_items"] == "4"
    assert ds.dataset.source_type == "cl_audit_run_artifact"
    src = json.loads(ds.dataset.source)
    assert src["uri"] == f"runs:/{parent.info.run_id}/data/recover.in_task.4.parquet"
    local = mlflow.artifacts.download_artifacts(artifact_uri=src["uri"], tracking_uri=uri)
    df = pd.read_parquet(local)
    items = items_from_frame(df)
    assert items_sha256(items) == tags["sha256"]
    assert all(isinstance(i, Item) and i.phrasings for i in items)

    # audit B computed its perturbed stage afresh (freeze_layers=1): the machine it ran on
    bt = client.get_run(b["mlflow"]["stage_run_ids"]["perturbed"]).data.tags
    assert bt["cl_audit.reused"] == "False"
    assert bt["machine.cpu_count"] == str(os.cpu_count()) and bt["machine.ray_cpus"] == "1.0"


def test_verify_passes_untouched_and_names_a_changed_file(server, audits, home):
    uri, artifacts = server
    a, out_a, _, _ = audits
    run_id = a["mlflow"]["run_id"]
    manifest = json.loads((out_a / "manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert {"summary.json", "metrics.parquet", "config.yaml", "data/eval.parquet",
            "stages/aligned/adapter/adapter_model.safetensors", "stages/perturbed/probe/probe.json"} <= paths
    summ = next(f for f in manifest["files"] if f["path"] == "summary.json")
    assert summ["sha256"] == hashlib.sha256((out_a / "summary.json").read_bytes()).hexdigest()

    local = trail.verify(str(out_a), uri)  # the store trusted to anchor the manifest
    assert local.ok and local.checked == len(manifest["files"]), local.mismatches
    r = cli("verify", run_id, "--tracking-uri", uri, home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"OK: {len(manifest['files'])} files of MLflow run {run_id}" in r.stdout
    assert f"manifest.json matches the sha256 recorded on MLflow run {run_id}" in r.stdout

    original = _flip_byte(out_a / "metrics.parquet")
    try:
        r = cli("verify", str(out_a), "--tracking-uri", uri, home=home)
    finally:
        (out_a / "metrics.parquet").write_bytes(original)
    assert r.returncode == 1
    bad = [x for x in r.stdout.splitlines() if x.startswith("MISMATCH")]
    assert len(bad) == 1 and bad[0].startswith("MISMATCH metrics.parquet: sha256"), r.stdout

    aligned_run = a["mlflow"]["stage_run_ids"]["aligned"]
    [stored] = artifacts.rglob(f"{aligned_run}/artifacts/adapter/adapter_model.safetensors")
    original = _flip_byte(stored)
    try:
        r = cli("verify", run_id, "--tracking-uri", uri, home=home)
    finally:
        stored.write_bytes(original)
    assert r.returncode == 1
    bad = [x for x in r.stdout.splitlines() if x.startswith("MISMATCH")]
    assert bad == [x for x in bad if "stages/aligned/adapter/adapter_model.safetensors: sha256" in x] and len(bad) == 1
    assert f"FAILED: 1 of {len(manifest['files'])} files" in r.stdout


def test_registered_versions_carry_stage_audit_and_verdict(server, audits, monkeypatch):
    uri, _ = server
    a, out_a, b, _ = audits
    client = MlflowClient(uri)
    runs = a["mlflow"]["stage_run_ids"]
    versions = {v.tags["cl_audit.stage"]: v for v in client.search_model_versions(f"name='{REGISTERED}'")}
    assert set(versions) == {"aligned", "perturbed", "recovered/in_task/4", "recovered/irrelevant/4"}
    assert a["registered_model"] == {"name": REGISTERED, "versions": {k: v.version for k, v in versions.items()}}
    v = a["verdict"]
    for stage, mv in versions.items():
        assert mv.tags["cl_audit.audit_run_id"] == a["mlflow"]["run_id"] != b["mlflow"]["run_id"]
        assert mv.tags["cl_audit.verdict"] == v["label"]
        assert float(mv.tags["cl_audit.knowledge_retention"]) == pytest.approx(v["knowledge_retention"], abs=1e-4)
        assert json.loads(mv.tags["cl_audit.knowledge_retention_ci"]) == pytest.approx(v["knowledge_retention_ci"],
                                                                                       abs=1e-4)
        assert mv.source.startswith("models:/m-") and mv.run_id == runs[stage]
        assert client.get_logged_model(mv.source.removeprefix("models:/")).source_run_id == runs[stage]
    rr = versions["recovered/in_task/4"].tags
    assert float(rr["cl_audit.recovery_ratio"]) == pytest.approx(v["recovery_ratio"]["in_task/4"], abs=1e-4)
    chain = json.loads(versions["recovered/in_task/4"].tags["cl_audit.adapters"])
    assert chain == [f"runs:/{runs[s]}/adapter" for s in ("aligned", "perturbed", "recovered/in_task/4")]
    # aliases name the roles; best-recovery is the largest recovery ratio (ties: smaller n, then arm)
    model = client.get_registered_model(REGISTERED)
    aliases = {al: versions_by_number(versions)[ver] for al, ver in model.aliases.items()}
    best = max(("in_task", "irrelevant"), key=lambda arm: (v["recovery_ratio"][f"{arm}/4"], arm == "in_task"))
    assert aliases == {"aligned": "aligned", "perturbed": "perturbed", "recovered-in_task-4": "recovered/in_task/4",
                       "recovered-irrelevant-4": "recovered/irrelevant/4", "best-recovery": f"recovered/{best}/4"}
    # the registered model holds the very adapter the manifest lists, and loads
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # a models:/<id> URI is resolved in the global store
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=versions["perturbed"].source))
    want = next(f for f in json.loads((out_a / "manifest.json").read_text())["files"]
                if f["path"] == "stages/perturbed/adapter/adapter_model.safetensors")
    assert (local / "MLmodel").exists()
    got = hashlib.sha256((local / "artifacts" / "adapter_1" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert got == want["sha256"]

    # registering the same audit again adds no version; the aliases stay
    from pipelines.audit import registry_aliases
    from pipelines.tracking import AuditTracker

    t = AuditTracker(uri, "cl-audit")
    t.attach(a["mlflow"]["run_id"])
    t.children.update(runs)
    stages = list(versions)
    chains = {st: json.loads(versions[st].tags["cl_audit.adapters"]) for st in stages}
    again = t.register(REGISTERED, stages, {"cl_audit.verdict": v["label"]}, chains, None, registry_aliases(stages, v))
    assert [mv.version for mv in again] == [versions[st].version for st in stages]
    assert len(client.search_model_versions(f"name='{REGISTERED}'")) == len(versions)
    assert client.get_registered_model(REGISTERED).aliases == model.aliases


def versions_by_number(versions: dict) -> dict[str, str]:
    return {mv.version: stage for stage, mv in versions.items()}


def test_history_lists_both_audits_newest_first(server, audits, home):
    uri, _ = server
    a, _, b, _ = audits
    r = cli("history", "--tracking-uri", uri, home=home)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    ia = next(i for i, x in enumerate(lines) if a["mlflow"]["run_id"] in x)
    ib = next(i for i, x in enumerate(lines) if b["mlflow"]["run_id"] in x)
    assert ib < ia  # newest first
    head = next(x for x in lines if "perturb.freeze_layers" in x)  # the setting that differs: a column
    assert head.split()[:6] == ["date", "run", "kind", "model", "suite", "seed"]
    for s, line in ((a, lines[ia]), (b, lines[ib])):
        assert "tiny-llama" in line and "capitals" in line and "audit" in line
        assert s["verdict"]["label"] in line and f"{s['verdict']['task_drop']:.2f}" in line
        best = max(sorted(s["verdict"]["recovery_ratio"].items()), key=lambda kv: kv[1])
        assert f"{best[1]:.2f} {best[0]}" in line
    rows = trail.history(uri, suite="capitals", model="tiny-llama")
    assert [row["run_id"] for row in rows][:2] == [b["mlflow"]["run_id"], a["mlflow"]["run_id"]]
    assert [row["differs"]["perturb.freeze_layers"] for row in rows[:2]] == ["1", "0"]
    assert [row["seed"] for row in rows[:2]] == ["0", "0"] and "perturb.kind" not in rows[0]["differs"]
    assert trail.history(uri, suite="biography") == []


def test_compare_shows_config_difference_and_significance(server, audits, home):
    uri, _ = server
    a, out_a, b, out_b = audits
    r = cli("compare", a["mlflow"]["run_id"], b["mlflow"]["run_id"], "--tracking-uri", uri, home=home)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    diff_rows = [x.split() for x in out.splitlines() if x.strip().startswith("perturb.freeze_layers")]
    assert diff_rows == [["perturb.freeze_layers", "0", "1"]]
    assert f"verdict: A {a['verdict']['label']} -> B {b['verdict']['label']}" in out
    assert "paired bootstrap of B - A over the same evaluation items" in out
    for st in ("aligned", "perturbed"):
        row = next(x for x in out.splitlines() if x.split()[:2] == [st, "knowledge_acc"])
        assert f"{a['stages'][st]['knowledge_acc']:.3f}" in row and f"{b['stages'][st]['knowledge_acc']:.3f}" in row
        assert row.rstrip().endswith("paired bootstrap")
    # the same comparison from the run folders, without the tracking store
    c = trail.compare(str(out_a), str(out_b))
    assert c.paired and c.config_diff == [("perturb.freeze_layers", 0, 1)]
    row = next(x for x in c.rows if (x["stage"], x["metric"]) == ("perturbed", "knowledge_acc"))
    assert row["diff"] == pytest.approx(b["stages"]["perturbed"]["knowledge_acc"] - a["stages"]["perturbed"]["knowledge_acc"])
    assert row["significant_uncorrected"] == (row["diff_ci"][0] > 0 or row["diff_ci"][1] < 0)
    assert row["significant"] == (row["p_adjusted"] < 0.05) and row["p_adjusted"] >= row["p"]
    sig = {(x["stage"], x["metric"]) for x in c.rows if x["significant"]}
    assert c.correction == "holm" and c.tests == sum(1 for x in c.rows if x["p"] is not None)
    assert f"{len(sig)} of {c.tests} differences significant after holm correction" in out
    ret = next(x for x in c.rows if x["metric"] == "knowledge_retention")
    assert ret["a"] == pytest.approx(a["verdict"]["knowledge_retention"])
    # the unchanged stages (same tune, same base) do not differ at all
    same = next(x for x in c.rows if (x["stage"], x["metric"]) == ("aligned", "task_acc"))
    assert same["diff"] == 0 and same["diff_ci"] == [0.0, 0.0] and same["significant"] is False


def _fake_audit(folder: Path, seed: int, task: dict, knowledge: dict, old_predictions: bool = False) -> dict:
    """A run folder (summary.json with the verdict components.verdict computes, config.yaml,
    predictions/<stage>.parquet) from per-item ``task`` and ``knowledge`` ({measure: (N,)})
    arrays per stage; ``old_predictions``: only ``knowledge_correct``, as before the measures."""
    from components.config import VerdictConfig
    from components.verdict import compute_verdict

    chances = {"knowledge_acc": 0.25, "knowledge_mrr": 0.3}
    per_item = {st: {"task_correct": task[st], **{m: knowledge[m][st] for m in knowledge}} for st in task}
    verdict = compute_verdict(per_item, chances, VerdictConfig(), n_boot=200)
    stages = {}
    for st, t in task.items():
        k = knowledge["knowledge_acc"][st]
        means = {"task_acc": float(np.mean(t)), **{m: float(np.mean(knowledge[m][st])) for m in knowledge}}
        stages[st] = {**means, "knowledge_chance": 0.25, "ci": {m: [x, x] for m, x in means.items()}}
        df = pd.DataFrame({"item_id": [f"q{i}" for i in range(len(t))], "task_correct": np.asarray(t, bool),
                           "knowledge_correct": np.asarray(k) >= 0.5})
        if not old_predictions:
            for m in knowledge:
                df[m] = knowledge[m][st]
        path = folder / "predictions" / f"{st}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path, index=False)
    summary = {"suite": "capitals", "model": "tiny-llama", "stages": stages, "verdict": verdict}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(f"seed: {seed}\n")
    return summary


def test_compare_reports_n_a_where_the_verdict_does(tmp_path):
    """A ratio whose denominator is <= 0 (a task that rose from aligned to perturbed, an
    aligned knowledge below chance) is undefined in the verdict, and so in compare: no
    value, no difference, no significance; the retention of every knowledge measure is
    compared, each as the verdict computes it."""
    n = 20
    aligned = np.r_[np.ones(10), np.zeros(10)]

    def task(extra: int, rec: int) -> dict:  # perturbed = aligned plus `extra` more right: drop < 0
        pert = aligned.copy()
        pert[10:10 + extra] = 1
        recd = pert.copy()
        recd[10 + extra:10 + extra + rec] = 1
        return {"base": aligned, "aligned": aligned, "perturbed": pert, "recovered/in_task/2": recd}

    def know(acc_aligned: float) -> dict:  # knowledge_acc of the aligned model below chance 0.25
        acc = {"base": acc_aligned, "aligned": acc_aligned, "perturbed": 0.1, "recovered/in_task/2": 0.15}
        mrr = {"base": 0.9, "aligned": 0.9, "perturbed": 0.8, "recovered/in_task/2": 0.85}
        return {"knowledge_acc": {st: np.full(n, v) for st, v in acc.items()},
                "knowledge_mrr": {st: np.full(n, v) for st, v in mrr.items()}}

    sa = _fake_audit(tmp_path / "a", 0, task(2, 3), know(0.2))
    sb = _fake_audit(tmp_path / "b", 1, task(3, 3), know(0.15))
    for v in (sa["verdict"], sb["verdict"]):  # the verdict's own n/a
        assert v["task_drop"] < 0 and v["recovery_ratio"]["in_task/2"] is None
        assert v["recovery_ratio_ci"]["in_task/2"] == [None, None]
        assert v["knowledge_retention"] is None and v["retention"]["knowledge_acc"]["value"] is None
        assert v["retention"]["knowledge_mrr"]["value"] == pytest.approx((0.8 - 0.3) / (0.9 - 0.3))

    c = trail.compare(str(tmp_path / "a"), str(tmp_path / "b"))
    assert c.paired
    rows = {(r["stage"], r["metric"]): r for r in c.rows}
    for key in (("recovered/in_task/2", "recovery_ratio"), ("verdict", "knowledge_retention"),
                ("verdict", "retention:knowledge_acc")):
        r = rows[key]
        assert r["rule"] == "paired bootstrap", key
        assert (r["a"], r["b"], r["diff"], r["diff_ci"], r["significant"]) == (None, None, None, None, None), key
    # the defined quantities: every knowledge measure's retention, equal to the verdict's
    mrr = rows[("verdict", "retention:knowledge_mrr")]
    assert mrr["a"] == pytest.approx(sa["verdict"]["retention"]["knowledge_mrr"]["value"])
    assert mrr["diff"] == pytest.approx(0.0) and mrr["diff_ci"] == [0.0, 0.0] and mrr["significant"] is False
    drop = rows[("verdict", "task_drop")]
    assert drop["diff"] == pytest.approx(sb["verdict"]["task_drop"] - sa["verdict"]["task_drop"])
    assert drop["diff"] == pytest.approx(-0.05)
    assert ("verdict", "tune_change") in rows and rows[("perturbed", "knowledge_mrr")]["rule"] == "paired bootstrap"

    # predictions from before the knowledge measures still load: knowledge_correct read as knowledge_acc
    _fake_audit(tmp_path / "old", 2, task(2, 3), know(0.6), old_predictions=True)
    old = trail._load_folder(tmp_path / "old", "old")
    arr, m = trail._arrays(old, ["aligned", "perturbed"], None)
    assert m == n and "aligned/knowledge_mrr" not in arr
    np.testing.assert_array_equal(arr["aligned/knowledge_acc"], np.ones(n))
    c = trail.compare(str(tmp_path / "a"), str(tmp_path / "old"))
    rows = {(r["stage"], r["metric"]): r for r in c.rows}
    assert rows[("aligned", "knowledge_acc")]["rule"] == "paired bootstrap"
    # no per-item values in the old one: p from the two CIs
    assert rows[("verdict", "retention:knowledge_mrr")]["rule"] == "normal approx. of the CIs"


def test_bootstrap_of_the_difference_pairs_items():
    rng = np.random.default_rng(0)
    n = 60
    base = rng.normal(0, 1.0, n)  # large between-item variance
    a, b = {"x": base}, {"x": base + 0.1 + rng.normal(0, 0.02, n)}  # small, consistent shift
    mean = lambda arr, ix: arr["x"][ix].mean(-1)  # noqa: E731
    paired = bootstrap_diff(mean, a, b, n, n, paired=True, n_boot=1000)
    unpaired = bootstrap_diff(mean, a, b, n, n, paired=False, n_boot=1000)
    assert paired["diff"] == pytest.approx(unpaired["diff"]) == pytest.approx(float(b["x"].mean() - a["x"].mean()))
    assert paired["significant"] and paired["ci_low"] > 0.05
    assert not unpaired["significant"] and unpaired["ci_low"] < 0 < unpaired["ci_high"]
    same = bootstrap_diff(mean, a, a, n, n, paired=True, n_boot=200)
    assert same["ci_low"] == same["ci_high"] == 0.0 and same["significant"] is False
    with pytest.raises(ValueError):
        bootstrap_diff(mean, a, {"x": base[:10]}, n, 10, paired=True)


@pytest.mark.parametrize("args, expected", [
    (["run", "--config", str(TINY), "--register", "bad/name"],
     "error: --register 'bad/name': expected a registered-model name without '/' or ':'"),
    (["verify", "not-a-run"], "error: not-a-run: neither a run folder nor an MLflow run id (32 hex digits)"),
])
def test_trail_mistakes_exit_2_with_one_line(args, expected, tmp_path):
    r = cli(*args, home=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), r.stderr
