"""Several processes on one fresh sqlite tracking store at the same moment (two
``cl-audit run``, or a run and a sweep, started together on a fresh ``runs/``): real
processes released together by a barrier, real MLflow, a real sqlite file."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import traceback
from pathlib import Path

EXPERIMENT = "cl-audit"


def _use_store(uri: str, barrier, results, i: int, n_metrics: int) -> None:
    """One process: wait for the others, then open the store (and log ``n_metrics``)."""
    try:
        from pipelines.tracking import AuditTracker

        barrier.wait(timeout=120)
        tracker = AuditTracker(uri, EXPERIMENT)
        rid = None
        if n_metrics:
            tracker.start(f"proc-{i}", {"i": i}, {"cl_audit.kind": "test"})
            rid = tracker.stage(f"stage-{i}", {}, [], {f"m{k}": float(k + i) for k in range(n_metrics)}, {})
        results.put((i, "ok", tracker.experiment_id, rid))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((i, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))


def _together(uri: str, n: int, n_metrics: int) -> list[tuple]:
    """Start ``n`` processes that construct an ``AuditTracker`` on ``uri`` at the same moment."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_use_store, args=(uri, barrier, results, i, n_metrics)) for i in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=120)
    return sorted(out)


def _experiments(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("select experiment_id, name from experiments where name = ?", (EXPERIMENT,)).fetchall()


def test_two_processes_on_a_fresh_sqlite_store_both_succeed_with_one_experiment(tmp_path):
    db = tmp_path / "fresh" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    got = _together(uri, 2, 0)
    errors = [g for g in got if g[1] != "ok"]
    assert not errors, errors
    [(exp_id, _)] = _experiments(db)
    assert [g[2] for g in got] == [str(exp_id), str(exp_id)]
    # the store stays usable by a later single process
    [again] = _together(uri, 1, 3)
    assert again[:3] == (0, "ok", str(exp_id))


def test_eight_processes_fifty_metrics_each_give_400_rows(tmp_path):
    db = tmp_path / "mlflow.db"
    got = _together(f"sqlite:///{db}", 8, 50)
    errors = [g for g in got if g[1] != "ok"]
    assert not errors, errors
    [(exp_id, _)] = _experiments(db)
    assert {g[2] for g in got} == {str(exp_id)}
    run_ids = [g[3] for g in got]
    with sqlite3.connect(db) as con:
        rows = con.execute("select run_uuid, key, value from metrics").fetchall()
        latest = con.execute("select count(*) from latest_metrics").fetchone()[0]
    assert len(rows) == 400 and latest == 400
    assert {r[0] for r in rows} == set(run_ids) and len(set(run_ids)) == 8
    for i, rid in enumerate(run_ids):
        assert sorted(v for r, _, v in rows if r == rid) == [float(k + i) for k in range(50)]


def test_an_unusable_sqlite_store_is_one_line_not_a_traceback(tmp_path):
    """Building the client opens (creates) the store: its failure is the one-line store error."""
    import pytest

    from components.errors import UserError
    from pipelines.tracking import AuditTracker

    (tmp_path / "a-file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    with pytest.raises(UserError) as e:
        AuditTracker(uri, EXPERIMENT)
    assert str(e.value).startswith(f"--tracking-uri {uri}: MLflow tracking store not reachable (")
    assert "\n" not in str(e.value)


def test_a_process_killed_while_it_creates_the_store_leaves_it_usable(tmp_path):
    """kill -9 of the process that builds a fresh store's schema (MLflow runs every
    migration in turn, seconds): before, the half-migrated file failed every later
    process ("table ... already exists", "out-of-date database schema"); now the schema
    is built in a hidden temporary file renamed into place, so the next process creates
    the store whole."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    script = ("import sys; sys.path.insert(0, sys.argv[2]); from pipelines.tracking import AuditTracker; "
              f"AuditTracker(sys.argv[1], {EXPERIMENT!r})")
    p = subprocess.Popen([sys.executable, "-c", script, uri, str(ROOT)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(t.stat().st_size > 0 for t in tmp_path.glob(".mlflow.db.tmp-*") if t.is_file()):
        assert p.poll() is None and time.time() < deadline, "the store was not being created"
        time.sleep(0.05)
    time.sleep(0.5)  # in the middle of the migrations
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert not db.exists()  # nothing half-built at the store's name
    results = _together(uri, 2, 3)
    assert [r[1] for r in results] == ["ok", "ok"], results
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from experiments where name = ?", (EXPERIMENT,)).fetchone() == (1,)
    assert list(tmp_path.glob(".mlflow.db.tmp-*")) == []  # the killed creator's file is gone
