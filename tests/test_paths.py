"""Every path or URI a user gives (config, command line, environment) means the same
place in every process and working folder that uses it: a Tune trial runs in its own
working folder, and a relative tracking URI there named another store."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, TINY

SWEEP = ("sweep.kl_penalty=[0.0]", "sweep.sizes=[2,4]", "sweep.arms=[in_task]")


def cli_in(cwd: Path, *args: str, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    """``cl-audit ARGS`` run from ``cwd`` with ``env`` over this process's environment."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    full.pop("RAY_ADDRESS", None)
    for k in [k for k, v in env.items() if v is None]:
        full.pop(k)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _runs(db: Path) -> dict[str, dict[str, str]]:
    """run id -> its tags, of every run in the sqlite store ``db``."""
    with sqlite3.connect(db) as con:
        ids = [r[0] for r in con.execute("select run_uuid from runs")]
        tags = con.execute("select run_uuid, key, value from tags").fetchall()
    return {rid: {k: v for r, k, v in tags if r == rid} for rid in ids}


@pytest.fixture(scope="module")
def workdir(home, tmp_path_factory) -> Path:
    """A user's working folder holding ``tests/configs/tiny.yaml`` and a run folder
    ``home/`` that shares the session's model cache."""
    cwd = tmp_path_factory.mktemp("userdir")
    (cwd / "tests" / "configs").mkdir(parents=True)
    shutil.copy(TINY, cwd / "tests" / "configs" / "tiny.yaml")
    (home / "cache").mkdir(exist_ok=True)
    (cwd / "home").mkdir()
    (cwd / "home" / "cache").symlink_to(home / "cache", target_is_directory=True)
    return cwd


def _check_sweep_in_rel_db(cwd: Path, out: Path) -> None:
    """The sweep's parent run and both trial runs are in ``cwd/rel.db``, and
    ``sweep.parquet`` names those trial runs."""
    db = cwd / "rel.db"
    summary = json.loads((out / "sweep_summary.json").read_text())
    runs = _runs(db)
    parent = summary["mlflow"]["run_id"]
    assert runs[parent]["cl_audit.kind"] == "sweep"
    table = pd.read_parquet(out / "sweep.parquet")
    assert list(table.status) == ["TERMINATED", "TERMINATED"]
    children = {rid for rid, t in runs.items() if t.get("mlflow.parentRunId") == parent}
    assert sorted(table.mlflow_run_id) == sorted(children) and len(children) == 2
    assert set(runs) == {parent} | children
    assert {runs[r]["cl_audit.trial_id"] for r in children} == set(table.trial_id)
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{db}"
    assert sorted(cwd.rglob("rel.db")) == [db]


def test_relative_tracking_uri_holds_the_sweep_and_every_trial(workdir):
    """The issue's command, from the user's folder, with a relative ``--tracking-uri``,
    a relative ``--out`` and a relative ``CL_AUDIT_HOME``."""
    r = cli_in(workdir, "sweep", "--config", "tests/configs/tiny.yaml", *[a for o in SWEEP for a in ("--set", o)],
               "--tracking-uri", "sqlite:///rel.db", "--out", "out", env={"CL_AUDIT_HOME": "home",
                                                                        "MLFLOW_TRACKING_URI": None})
    assert r.returncode == 0, r.stderr[-3000:]
    _check_sweep_in_rel_db(workdir, workdir / "out")
    assert (workdir / "home" / "store").is_dir()  # the stage store of CL_AUDIT_HOME=home, not of a trial's folder


def test_relative_mlflow_tracking_uri_from_the_environment(workdir, tmp_path):
    """The same sweep with ``MLFLOW_TRACKING_URI=sqlite:///rel.db`` in another folder
    (its stages come from the first test's store)."""
    cwd = tmp_path / "other"
    cwd.mkdir()
    r = cli_in(cwd, "sweep", "--config", str(workdir / "tests" / "configs" / "tiny.yaml"),
               *[a for o in SWEEP for a in ("--set", o)], "--out", "out",
               env={"CL_AUDIT_HOME": str(workdir / "home"), "MLFLOW_TRACKING_URI": "sqlite:///rel.db"})
    assert r.returncode == 0, r.stderr[-3000:]
    _check_sweep_in_rel_db(cwd, cwd / "out")


@pytest.mark.parametrize("given, expected", [
    ("sqlite:///rel.db", "sqlite:///{cwd}/rel.db"),
    ("sqlite:///sub/../rel.db?timeout=5", "sqlite:///{cwd}/rel.db?timeout=5"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("file:mlruns", "file://{cwd}/mlruns"),
    ("file:./mlruns", "file://{cwd}/mlruns"),
    ("file:///abs/mlruns", "file:///abs/mlruns"),
    ("./mlruns", "{cwd}/mlruns"),
    ("mlruns", "{cwd}/mlruns"),
    ("/abs/mlruns", "/abs/mlruns"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("https://user:pw@host/x", "https://user:pw@host/x"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("databricks", "databricks"),
    ("", ""),
])
def test_absolute_uri(tmp_path, given, expected):
    from pipelines.mlflow_env import absolute_uri

    assert absolute_uri(given, tmp_path) == expected.format(cwd=tmp_path)


def test_environment_paths_become_absolute(tmp_path, monkeypatch):
    from pipelines.mlflow_env import absolute_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    monkeypatch.setenv("CL_AUDIT_HOME", "runs/../myruns")
    absolute_env(tmp_path)
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/rel.db"
    assert os.environ["CL_AUDIT_HOME"] == str(tmp_path / "myruns")


def test_config_paths_become_absolute(tmp_path):
    """``data.files`` and a local ``model.id`` (folder or .gguf) are absolute after
    :func:`absolute_paths`; built-in ids, hub ids and missing paths are kept as given."""
    from components.registry import absolute_paths, load_config

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "items.jsonl").write_text("")
    (tmp_path / "my-model").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    cfg = load_config("custom", None, ["data.files=[data/items.jsonl, ~/x.csv, /abs/y.parquet]",
                                       "model.id=my-model"])
    got = absolute_paths(cfg, tmp_path)
    assert got.data.files == [str(tmp_path / "data" / "items.jsonl"), str(Path("~/x.csv").expanduser()),
                              "/abs/y.parquet"]
    assert got.model.id == str(tmp_path / "my-model")
    assert absolute_paths(cfg.model_copy(update={"model": cfg.model.model_copy(update={"id": "m.gguf"})}),
                          tmp_path).model.id == str(tmp_path / "m.gguf")
    for kept in ("tiny-llama", "smollm2-135m-instruct", "someorg/some-model", "no/such-dir"):
        c = cfg.model_copy(update={"model": cfg.model.model_copy(update={"id": kept})})
        assert absolute_paths(c, tmp_path).model.id == kept
    assert absolute_paths(got, tmp_path) is got  # already absolute: the same config
