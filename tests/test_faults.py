"""Faults injected on purpose: kill -9 of the audit at known points, a Ray stage task
that dies, a Tune trial that keeps failing, the MLflow server killed mid-audit.

Each audit here is the `cl-audit` command in its own process group (its local Ray
included), stopped at a failpoint (components/faults.py) and killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipelines.journal import JOURNAL
from pipelines.state import STATE

from conftest import ROOT, TINY, MlflowServer

# what a resumed audit must reproduce exactly (run ids, times and the machine differ)
SAME = ("suite", "model", "config_digest", "model_digest", "data_digest", "seed", "stages", "verdict", "data")


def _env(home: Path, marks: Path, failpoints: str = "") -> dict:
    env = {**os.environ, "CL_AUDIT_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "CL_AUDIT_FAILPOINT_DIR": str(marks)}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CL_AUDIT_FAILPOINTS"):
        env.pop(k, None)
    if failpoints:
        env["CL_AUDIT_FAILPOINTS"] = failpoints
    return env


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    try:
        return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()


def _wait_for(marker: Path, proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the audit exited ({proc.returncode}) before {marker.name}: {log.read_text()[-3000:]}")
        if time.time() > deadline:
            _kill(proc)
            pytest.fail(f"no {marker.name} within {timeout} s: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def _kill(proc: subprocess.Popen) -> None:
    """kill -9 of the audit's whole process group (driver, Ray, its workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _visible(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts)]


def _assert_nothing_partial(home: Path, out: Path) -> None:
    """Every published stage is complete; no file of the output contract is half-written."""
    store = home / "store"
    for d in store.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            assert (d / "result.json").exists(), f"incomplete stage output visible: {d}"
            json.loads((d / "result.json").read_text())
    for p in _visible(out):
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".parquet":
            pd.read_parquet(p)


@pytest.fixture()
def fault_home(home, tmp_path) -> Path:
    """A fresh store and MLflow store; the tiny model built by the session is shared."""
    h = tmp_path / "home"
    h.mkdir()
    (home / "cache").mkdir(exist_ok=True)
    (h / "cache").symlink_to(home / "cache", target_is_directory=True)
    return h


def test_kill_9_anywhere_then_the_same_command_finishes_identically(tiny_run, fault_home, tmp_path):
    """kill -9 right after the MLflow parent run is created, during a training step,
    during a probe and while summary.json is being written (a probe task also dies once
    and Ray retries it); after each, the same
    command goes on from the finished stages and the last one ends with the summary of
    an uninterrupted run, one MLflow parent run and no metric step logged twice."""
    _, _, ref = tiny_run
    out, marks = tmp_path / "run", tmp_path / "marks"
    args = ["run", "--config", str(TINY), "--out", str(out)]
    store = fault_home / "store"

    # 0. killed right after its MLflow parent run was created, before the run folder
    #    recorded it: the next attempt finds that run by its tags and continues it
    log = tmp_path / "0.log"
    p = _start(args, _env(fault_home, marks, "parent_run_created=pause"), log)
    _wait_for(marks / "parent_run_created", p, log)
    _kill(p)
    assert not (out / STATE).exists()

    # 1. killed in the middle of the perturbing fine-tune (step 2 of 16)
    log = tmp_path / "1.log"
    p = _start(args, _env(fault_home, marks, "train_step:perturbed:2=pause"), log)
    _wait_for(marks / "train_step:perturbed:2", p, log)
    _kill(p)
    assert "continuing MLflow run " in log.read_text()  # the orphaned parent run of attempt 0
    _assert_nothing_partial(fault_home, out)
    kinds = Counter(k.split("-")[0] for k in (store / "executions.log").read_text().split()[1::2])
    assert kinds["tune"] == 1 and kinds["perturb"] == 0 and not (out / "summary.json").exists()
    state = json.loads((out / STATE).read_text())
    parent = state["parent_run_id"]

    # 2. killed while probing a recovered checkpoint
    log = tmp_path / "2.log"
    p = _start(args, _env(fault_home, marks, "probe:recovered/in_task/4=pause"), log)
    _wait_for(marks / "probe:recovered_in_task_4", p, log)
    _kill(p)
    _assert_nothing_partial(fault_home, out)
    assert "continuing MLflow run " + parent in log.read_text()

    # 3. the Ray worker of every probe still to do dies once (Ray retries the task), then
    #    the driver dies while writing summary.json
    log, marks3 = tmp_path / "3.log", tmp_path / "marks3"
    p = _start(args, _env(fault_home, marks3, "probe:*=kill-once,atomic_write:summary.json=kill"), log)
    _wait_for(marks3 / "atomic_write:summary.json", p, log)
    _kill(p)
    assert (marks3 / "probe:recovered_in_task_4").read_text().count("\n") == 1  # killed once, then retried
    _assert_nothing_partial(fault_home, out)
    assert not (out / "summary.json").exists()
    assert (out / "metrics.parquet").exists()  # written before the kill, complete

    # 4. the same command, no fault: finishes
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=_env(fault_home, marks),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads((out / "summary.json").read_text())
    for k in SAME:
        assert got[k] == ref[k], k
    # each stage computed once over the four attempts (a killed stage never published)
    keys = (store / "executions.log").read_text().split()[1::2]
    assert len(keys) == len(set(keys))
    assert Counter(k.split("-")[0] for k in keys) == Counter(
        {"filter": 1, "candidates": 1, "tune": 1, "perturb": 1, "recover": 2, "probe": 5, "drift": 1})

    # MLflow: the interrupted parent run was continued, not duplicated
    client = MlflowClient(f"sqlite:///{fault_home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cl-audit").experiment_id
    parents = client.search_runs([exp], "tags.cl_audit.kind = 'audit'")
    assert [r.info.run_id for r in parents] == [parent] == [got["mlflow"]["run_id"]]
    assert parents[0].info.status == "FINISHED"
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["cl_audit.stage"] for r in children) == sorted(ref["stages"])
    for child in children:
        assert child.info.status == "FINISHED"
        for key in child.data.metrics:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert len(steps) == len(set(steps)), (child.data.tags["cl_audit.stage"], key, steps)
    assert json.loads((out / STATE).read_text())["finished"] is True


def _assert_store_complete(home: Path) -> int:
    """Every published stage folder of the store matches its ``files.json`` (sizes,
    sha256) and its safetensors open; nothing else is visible. Returns the count."""
    from components.artifacts import Store

    store = Store(home / "store")
    keys = [d.name for d in store.root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    for key in keys:
        assert store.done(key), f"incomplete stage output visible: {key}"
        assert store.check(key) == [], key
    return len(keys)


def test_kill_9_at_ten_random_moments_then_the_same_command_finishes_identically(fault_home, tmp_path):
    """kill -9 of the whole audit (driver, local Ray, its workers) at 10 moments drawn
    (seed 23) uniformly over an uninterrupted audit's wall time; after each kill every
    published store folder is complete (digests of every file, safetensors open) and no
    output file is half-written; the same command is run again. An attempt that ends
    before its kill moment is checked and the moment is tried again from an empty store
    and run folder (moved earlier, x 0.7, when even a whole audit ended before it). Each finished audit has the uninterrupted
    audit's summary."""
    import random

    marks = tmp_path / "marks"
    light = ["--set", "recover.arms=[in_task]", "--set", "probe.n_bootstrap=50", "--set", "tune.epochs=2",
             "--set", "perturb.epochs=4", "--set", "recover.epochs=2"]  # fewer stages: a shorter audit to kill
    ref_home, ref_out = tmp_path / "ref-home", tmp_path / "ref"
    ref_home.mkdir()
    (ref_home / "cache").symlink_to(fault_home / "cache", target_is_directory=True)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(TINY), "--out", str(ref_out),
                        *light], cwd=ROOT, env=_env(ref_home, marks), capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = json.loads((ref_out / "summary.json").read_text())

    rng = random.Random(23)
    moments = [round(rng.uniform(0.0, wall), 1) for _ in range(10)]
    drawn = list(moments)
    attempt, fresh, kills, finished = 0, 0, [], 0

    def home_out() -> tuple[Path, Path]:
        h = tmp_path / f"home{fresh}"
        if not h.exists():
            h.mkdir()
            (h / "cache").symlink_to(fault_home / "cache", target_is_directory=True)
        return h, tmp_path / f"run{fresh}"

    def finish(h: Path, out: Path) -> None:
        got = json.loads((out / "summary.json").read_text())
        for k in SAME:
            assert got[k] == ref[k], k
        keys = (h / "store" / "executions.log").read_text().split()[1::2]
        assert len(keys) == len(set(keys))  # each stage published once over all attempts
        _assert_store_complete(h)
        # MLflow: an interrupted audit's runs are continued, never left behind: every run
        # finished; the parent runs of this folder follow one another (a rerun after a
        # kill that came once the audit had finished records the audit again), the last
        # is the summary's, with a nested run per checkpoint
        client = MlflowClient(f"sqlite:///{h / 'mlflow.db'}")
        exp = client.get_experiment_by_name("cl-audit").experiment_id
        runs = client.search_runs([exp], "", max_results=1000)
        assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
        parents = sorted((r for r in runs if r.data.tags.get("cl_audit.kind") == "audit"),
                         key=lambda r: r.info.start_time)
        for a, b in zip(parents, parents[1:]):
            assert a.info.end_time <= b.info.start_time, "two records of one audit overlap"
        assert parents[-1].info.run_id == got["mlflow"]["run_id"]
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == got["mlflow"]["run_id"]]
        assert sorted(k.data.tags["cl_audit.stage"] for k in kids) == sorted(got["stages"])

    for i, moment in enumerate(moments):
        while True:
            h, out = home_out()
            from_scratch = not out.exists()
            args = ["run", "--config", str(TINY), "--out", str(out), *light]
            log = tmp_path / f"attempt{attempt}.log"
            attempt += 1
            p = _start(args, _env(h, marks), log)
            try:
                p.wait(timeout=moment)
            except subprocess.TimeoutExpired:
                _kill(p)
                kills.append(moment)
                _assert_nothing_partial(h, out)
                _assert_store_complete(h)
                break
            assert p.returncode == 0, log.read_text()[-3000:]  # ended before its kill moment
            finish(h, out)
            finished += 1
            fresh += 1
            if from_scratch:  # the moment lies past a whole audit: earlier, on a fresh store
                moment = moments[i] = round(moment * 0.7, 1)
    h, out = home_out()
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(TINY), "--out", str(out),
                        *light], cwd=ROOT, env=_env(h, marks), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finish(h, out)
    assert kills == moments and len(kills) == 10
    print(f"uninterrupted {wall:.1f} s; kill moments drawn {drawn}, killed at {kills}; {attempt + 1} attempts, "
          f"{finished + 1} finished audits")


def test_replacing_a_stage_output_is_atomic(tmp_path):
    """``Store.produce(reuse=False)`` over a published key: a reader polling the key
    always sees a complete output, the old one or the new one, never none."""
    import threading

    from components.artifacts import Store

    store = Store(tmp_path / "store")

    def fn(version: int):
        def write(tmp: Path) -> dict:
            (tmp / "w.bin").write_bytes(bytes([version]) * 4096)
            return {"version": version}
        return write

    store.produce("stage-1", fn(0))
    seen, gaps, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            if not store.done("stage-1"):
                gaps.append("absent")
                continue
            try:
                seen.add(store.load("stage-1")["version"])
            except (FileNotFoundError, json.JSONDecodeError) as e:
                gaps.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in range(1, 40):
            result, reused = store.produce("stage-1", fn(v), reuse=False)
            assert result == {"version": v} and not reused
    finally:
        stop.set()
        t.join()
    assert gaps == []
    assert store.load("stage-1") == {"version": 39} and store.check("stage-1") == []
    assert len(seen) > 1
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".stage-1")] == []  # old copies removed


def test_killed_at_the_store_publish_failpoint_then_published_whole(tmp_path):
    """A producer killed at ``store_publish`` (every file written and fsynced, the
    folder not yet renamed), first over a new key, then while replacing a published
    one: the key reads as not computed, resp. keeps its old output; the next producer
    removes the dead one's temporary folder and publishes a complete output."""
    from components.artifacts import Store

    store = Store(tmp_path / "store")
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from components.artifacts import Store
s = Store(Path({str(store.root)!r}))
s.produce(sys.argv[1], lambda tmp: (tmp / "w.bin").write_bytes(b"new") and {{"v": "new"}}, reuse=False)
"""
    env = {**_env(tmp_path, tmp_path / "marks", "store_publish:*=kill")}
    for key, before in (("fresh-1", None), ("old-1", {"v": "old"})):
        if before:
            store.produce(key, lambda tmp: (tmp / "w.bin").write_bytes(b"old") and {"v": "old"})
        r = subprocess.run([sys.executable, "-c", script, key], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert (tmp_path / "marks" / f"store_publish:{key}").exists()
        assert [p.name for p in store.root.glob(f".{key}.tmp-*")] != []  # the dead producer's folder, hidden
        if before is None:
            assert not store.done(key) and not store.path(key).exists()
        else:
            assert store.load(key) == before and store.check(key) == []
        result, reused = store.produce(key, lambda tmp: (tmp / "w.bin").write_bytes(b"new") and {"v": "new"},
                                       reuse=False)
        assert result == {"v": "new"} and not reused
        assert store.check(key) == [] and (store.path(key) / "w.bin").read_bytes() == b"new"
        assert list(store.root.glob(f".{key}.*")) == []  # the stale temporary folder is gone


def test_failing_sweep_trial_is_retried_then_reported_while_the_others_finish(fault_home, tmp_path):
    """A trial that raises every time is retried `sweep.max_failures` times, ends as
    ERROR in the table; the other trial finishes."""
    out, marks = tmp_path / "sweep", tmp_path / "marks"
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "sweep", "--config", str(TINY), "--out", str(out),
         "--set", "sweep.kl_penalty=[0.0]", "--set", "sweep.sizes=[2,4]", "--set", "sweep.max_failures=1",
         "--max-concurrent", "1"],
        cwd=ROOT, env=_env(fault_home, marks, "sweep_trial/kl=0/in_task/n=4=raise"), capture_output=True,
        text=True, timeout=600)
    assert (out / "sweep.parquet").exists(), r.stdout[-3000:] + r.stderr[-3000:]
    table = pd.read_parquet(out / "sweep.parquet")
    summary = json.loads((out / "sweep_summary.json").read_text())
    status = dict(zip(table["n"], table.status))
    assert status == {2: "TERMINATED", 4: "ERROR"}, r.stdout[-3000:] + r.stderr[-3000:]
    assert summary["trials"]["by_status"] == {"TERMINATED": 1, "ERROR": 1}
    # the failing trial ran 1 + max_failures times
    assert (marks / "sweep_trial_kl=0_in_task_n=4").read_text().count("\n") == 2
    assert table.loc[table["n"] == 2, "recovery_ratio"].notna().all()
    # its nested MLflow run (made when the trial started) ends FAILED, the other's FINISHED: none left RUNNING
    client = MlflowClient(f"sqlite:///{fault_home / 'mlflow.db'}")
    runs = client.search_runs([summary["mlflow"]["experiment_id"]],
                              f"tags.mlflow.parentRunId = '{summary['mlflow']['run_id']}'")
    assert sorted((r.data.tags["cl_audit.stage"], r.info.status) for r in runs) == [
        ("trial/kl=0/in_task/n=2", "FINISHED"), ("trial/kl=0/in_task/n=4", "FAILED")]


def test_mlflow_server_killed_mid_audit(fault_home, tmp_path):
    """The server dies while the audit runs and comes back before it ends: the audit
    finishes, sends what waited in its journal, and the records are complete and
    logged once."""
    marks = tmp_path / "marks"
    srv = MlflowServer(tmp_path / "server").start()
    try:
        out = tmp_path / "run"
        args = ["run", "--config", str(TINY), "--out", str(out), "--tracking-uri", srv.uri]
        log = tmp_path / "audit.log"
        p = _start(args, _env(fault_home, marks, "probe:aligned=hold,probe:recovered/*=hold"), log)
        _wait_for(marks / "probe:aligned", p, log)
        srv.stop(signal.SIGKILL)  # killed while the audit runs
        (marks / "probe:aligned").unlink()
        # the audit goes on without the server until the recovered checkpoints are probed
        deadline = time.time() + 400
        while not any(m.name.startswith("probe:recovered") for m in marks.iterdir()):
            assert p.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert (out / JOURNAL).exists()  # what could not be sent is kept
        srv.start()
        for m in marks.glob("probe:recovered*"):
            m.unlink()
        deadline = time.time() + 400
        while p.poll() is None:
            for m in marks.glob("probe:recovered*"):
                m.unlink()
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        text = log.read_text()
        assert p.returncode == 0, text[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert not (out / JOURNAL).exists(), text[-2000:]  # everything sent once the server answered

        client = MlflowClient(srv.uri)
        parent = client.get_run(summary["mlflow"]["run_id"])
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["verdict"] == summary["verdict"]["label"]
        assert parent.data.metrics["task_drop"] == pytest.approx(summary["verdict"]["task_drop"])
        assert {"report.html", "summary.json", "manifest.json"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}
        for name, rid in summary["mlflow"]["stage_run_ids"].items():
            run = client.get_run(rid)
            assert run.info.status == "FINISHED", name
            assert run.data.metrics["task_acc"] == pytest.approx(summary["stages"][name]["task_acc"]), name
            for key in run.data.metrics:
                steps = [m.step for m in client.get_metric_history(rid, key)]
                assert len(steps) == len(set(steps)), (name, key, steps)
        n_loss = len(client.get_metric_history(summary["mlflow"]["stage_run_ids"]["perturbed"], "train/loss"))
        assert n_loss == 16  # 8 epochs x 2 batches, each once

        # a second `sync` has nothing left to send
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", "sync", str(out)], cwd=ROOT,
                           env=_env(fault_home, marks), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "nothing to send" in r.stdout, r.stderr
    finally:
        srv.stop()


def test_journal_kept_while_the_server_is_down_and_sync_sends_it_once(tmp_path):
    """The tracker against a real server that stops: records go to the journal, in order;
    `cl-audit sync` sends them when it is back; a second sync sends nothing."""
    from pipelines.state import write_state
    from pipelines.tracking import AuditTracker

    srv = MlflowServer(tmp_path / "server").start()
    try:
        out = tmp_path / "run"
        out.mkdir()
        t = AuditTracker(srv.uri, "journal-test", journal=out / JOURNAL)
        parent = t.start("audit-x", {"seed": 0}, {"cl_audit.kind": "audit"})
        t.plan(["base", "aligned"], {"aligned": "base"}, {})
        write_state(out, {"tracking_uri": srv.uri, "parent_run_id": parent})
        srv.stop(signal.SIGKILL)
        (out / "predictions.parquet").write_bytes(b"PAR1")
        history = [{"step": s, "loss": 1.0 / (s + 1), "ce": 1.0, "kl": 0.0} for s in range(5)]
        t.stage("aligned", {"lr": 0.01}, history, {"task_acc": 0.5}, {"": out / "predictions.parquet"})
        t.finish({"task_drop": 0.25}, [], {"verdict": "spurious"})
        # the stage's params, metrics, artifact, end; the parent's metrics and tags, end
        assert t.journal.pending() == 6
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", "sync", str(out)], cwd=ROOT,
                           env=_env(tmp_path, tmp_path), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "still not answering; 0 of 6 records sent, 6 kept in" in r.stderr
        srv.start()
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", "sync", str(out)], cwd=ROOT,
                           env=_env(tmp_path, tmp_path), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "sent 6 records" in r.stdout, r.stdout + r.stderr
        client = MlflowClient(srv.uri)
        run = client.get_run(t.children["aligned"])
        assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.01"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2, 3, 4]
        assert client.get_run(parent).data.tags["verdict"] == "spurious"
        assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["predictions.parquet"]
        assert not (out / JOURNAL).exists()
    finally:
        srv.stop()
