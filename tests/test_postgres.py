"""The MLflow deployment of ``infra/mlflow/`` for real: a tracking server on PostgreSQL
(Debian's package, a cluster of the test's own on 127.0.0.1) with artifacts proxied to
a local folder. A quick tiny audit with ``--register`` (the server killed while it runs:
the journal replays once) and a two-trial sweep with concurrent trials (the server
killed before they log: their journals are sent once by ``cl-audit sync``) log to it;
the run tree, metric histories, artifacts, logged models and registered versions are
read back through the REST client."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipelines.journal import JOURNAL

from conftest import ROOT, TINY, MlflowServer, PostgresCluster
from test_faults import _env, _kill, _start, _wait_for

pytestmark = pytest.mark.postgres

REGISTERED = "tiny-pg"
STAGES = {"base", "aligned", "perturbed", "recovered/in_task/4", "recovered/irrelevant/4"}


@pytest.fixture(scope="module")
def pg_home(home, tmp_path_factory):
    """A fresh store (every stage computed, so the audit's probe failpoints are reached);
    the tiny model built by the session is shared."""
    h = tmp_path_factory.mktemp("pghome")
    (home / "cache").mkdir(exist_ok=True)
    (h / "cache").symlink_to(home / "cache", target_is_directory=True)
    return h


def test_audit_and_sweep_on_a_postgres_tracking_server(pg_home, tmp_path, monkeypatch):
    t0 = time.time()
    pg = PostgresCluster().start()
    srv = MlflowServer(tmp_path / "server", backend=pg.uri)
    audit = sweep = None
    try:
        srv.start()
        marks = tmp_path / "marks"
        out = tmp_path / "audit"
        log = tmp_path / "audit.log"
        audit = _start(["run", "--config", str(TINY), "--out", str(out), "--tracking-uri", srv.uri,
                        "--register", REGISTERED],
                       _env(pg_home, marks, "probe:aligned=hold,probe:recovered/*=hold"), log)
        _wait_for(marks / "probe:aligned", audit, log)
        srv.stop(signal.SIGKILL)  # the tracking server dies while the audit runs
        (marks / "probe:aligned").unlink()
        deadline = time.time() + 400
        while not any(m.name.startswith("probe:recovered") for m in marks.iterdir()):
            assert audit.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert (out / JOURNAL).exists()  # what could not be sent waits, the aligned logged model among it
        assert (out / ".mlflow-models" / "aligned" / "MLmodel").exists()
        srv.start()  # back, on the same database
        deadline = time.time() + 400
        while audit.poll() is None:
            for m in marks.glob("probe:recovered*"):
                m.unlink()
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert audit.returncode == 0, log.read_text()[-3000:]
        assert not (out / JOURNAL).exists() and not any((out / ".mlflow-models").iterdir())
        s = json.loads((out / "summary.json").read_text())

        # two trials at once on the same server (recover n = 2 and 4 after the audit's perturb);
        # both hold before they log, the server dies, they finish into their journals
        sweep_out = tmp_path / "sweep"
        slog = tmp_path / "sweep.log"
        sweep = _start(["sweep", "--config", str(TINY), "--out", str(sweep_out), "--tracking-uri", srv.uri,
                        "--max-concurrent", "2", "--set", "sweep.kl_penalty=[0.0]", "--set", "sweep.sizes=[2,4]",
                        "--set", "sweep.arms=[in_task]"], _env(pg_home, marks, "sweep_log:*=hold"), slog)
        deadline = time.time() + 400
        while len(list(marks.glob("sweep_log:*"))) < 2:  # both trials at once
            assert sweep.poll() is None and time.time() < deadline, slog.read_text()[-3000:]
            time.sleep(0.2)
        srv.stop(signal.SIGKILL)
        for m in marks.glob("sweep_log:*"):
            m.unlink()
        sweep.wait(timeout=400)
        text = slog.read_text()
        assert sweep.returncode == 0, text[-3000:]
        assert "not answering" in text and f"cl-audit sync {sweep_out}" in text, text[-2000:]
        assert len(list((sweep_out / ".mlflow-journals").glob("*.jsonl"))) == 2 and (sweep_out / JOURNAL).exists()
        ss = json.loads((sweep_out / "sweep_summary.json").read_text())
        srv.start()
        sync = [sys.executable, "-m", "pipelines.cli", "sync", str(sweep_out), "--tracking-uri", srv.uri]
        r = subprocess.run(sync, cwd=ROOT, env=_env(pg_home, marks), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "sent" in r.stdout, r.stdout + r.stderr
        r = subprocess.run(sync, cwd=ROOT, env=_env(pg_home, marks), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "nothing to send" in r.stdout, r.stdout + r.stderr  # replayed once

        client = MlflowClient(srv.uri)  # REST
        # the audit's run tree, every metric history once per step, the artifacts
        parent = client.get_run(s["mlflow"]["run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["verdict"] == s["verdict"]["label"]
        assert not any(k.startswith(("sweep.", "biography.")) for k in parent.data.params)
        assert {"summary.json", "manifest.json", "metrics.parquet", "report.html"} <= {
            f.path for f in client.list_artifacts(parent.info.run_id)}
        kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert {k.info.run_name for k in kids} == STAGES
        for kid in kids:
            name, rid = kid.info.run_name, kid.info.run_id
            assert kid.info.status == "FINISHED", name
            assert kid.data.metrics["task_acc"] == pytest.approx(s["stages"][name]["task_acc"])
            for key in kid.data.metrics:
                steps = [m.step for m in client.get_metric_history(rid, key)]
                assert len(steps) == len(set(steps)), (name, key, steps)
            assert "model/MLmodel" in {f.path for f in client.list_artifacts(rid, "model")}
        perturbed = s["mlflow"]["stage_run_ids"]["perturbed"]
        assert len(client.get_metric_history(perturbed, "train/loss")) == 16  # 8 epochs x 2 batches, each once
        assert "adapter/adapter_model.safetensors" in {f.path for f in client.list_artifacts(perturbed, "adapter")}
        # one READY logged model per checkpoint (aligned's sent from the journal)
        models = [m for m in client.search_logged_models([parent.info.experiment_id])
                  if m.source_run_id in s["mlflow"]["stage_run_ids"].values()]
        assert sorted(m.tags["cl_audit.stage"] for m in models) == sorted(STAGES)
        assert all(str(m.status).endswith("READY") for m in models)

        # the registry: four versions, roles as aliases, loadable through the proxied artifacts
        versions = {v.tags["cl_audit.stage"]: v for v in client.search_model_versions(f"name='{REGISTERED}'")}
        assert set(versions) == STAGES - {"base"}
        assert s["registered_model"]["versions"] == {k: v.version for k, v in versions.items()}
        aliases = client.get_registered_model(REGISTERED).aliases
        assert {aliases[a] for a in ("aligned", "perturbed", "recovered-in_task-4", "recovered-irrelevant-4")} == {
            v.version for v in versions.values()}
        assert aliases["perturbed"] == versions["perturbed"].version and "best-recovery" in aliases
        for v in versions.values():
            assert v.tags["cl_audit.audit_run_id"] == parent.info.run_id and v.source.startswith("models:/m-")
        import mlflow.pyfunc

        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)  # models:/ URIs are resolved in the global store
        pred = pd.read_parquet(out / "predictions" / "perturbed.parquet")
        got = mlflow.pyfunc.load_model(f"models:/{REGISTERED}@perturbed").predict(pred["question"].tolist())
        assert got == pred["response"].tolist()

        # the sweep: its parent, one finished nested run per trial with its curve
        sp = client.get_run(ss["mlflow"]["run_id"])
        assert sp.info.status == "FINISHED" and sp.data.params["sweep.sizes"] == "[2, 4]"
        trials = client.search_runs([sp.info.experiment_id], f"tags.mlflow.parentRunId = '{sp.info.run_id}'")
        assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
        for t in trials:
            for key in t.data.metrics:
                steps = [m.step for m in client.get_metric_history(t.info.run_id, key)]
                assert len(steps) == len(set(steps)), (key, steps)
            assert "predictions.parquet" in {f.path for f in client.list_artifacts(t.info.run_id)}

        # `cl-audit sync` has nothing left to send
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", "sync", str(out)], cwd=ROOT,
                           env=_env(pg_home, marks), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "nothing to send" in r.stdout, r.stderr
    finally:
        for p in (audit, sweep):
            if p is not None and p.poll() is None:
                _kill(p)
        srv.stop()
        pg.stop()
    print(f"\n{pg.version()}: audit + sweep on PostgreSQL in {time.time() - t0:.0f} s")
