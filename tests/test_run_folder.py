"""The run folder a user can trust (issue 19): it belongs to the run that made it, every
output lies under one root (``--home``) that ``--help`` names, ``compile`` writes only
where it is told, and the files are readable as the user's umask says."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, TINY, tiny_config


def cli_in(cwd: Path, *args: str, home: Path | None, umask: int | None = None, env: dict | None = None,
           timeout: int = 900) -> subprocess.CompletedProcess:
    """``cl-audit ARGS`` as a user runs it from ``cwd``: ``CL_AUDIT_HOME=home`` (unset when
    None), under ``umask`` if given; the process group is killed afterwards (a killed
    audit leaves no local Ray behind)."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CL_AUDIT_HOME", "CL_AUDIT_FAILPOINTS"):
        full.pop(k, None)
    full.update(env or {})
    if home is not None:
        full["CL_AUDIT_HOME"] = str(home)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    argv = [sys.executable, "-m", "pipelines.cli", *args]
    if umask is not None:  # the shell sets the umask, then becomes cl-audit
        argv = ["sh", "-c", f'umask {umask:03o} && exec "$0" "$@"', *argv]
    proc = subprocess.Popen(argv, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return sorted(r[0] for r in con.execute("select run_uuid from runs"))


def _home_with_cache(home: Path, tmp: Path) -> Path:
    """A fresh root under ``tmp`` sharing the session's model cache (the tiny model is built once)."""
    h = tmp / "home"
    h.mkdir()
    (home / "cache").mkdir(exist_ok=True)
    (h / "cache").symlink_to(home / "cache", target_is_directory=True)
    return h


def test_a_folder_holding_another_configs_run_is_refused_before_anything_is_written(home, tmp_path):
    """The issue's scenario: an audit in R, then by mistake the same command with
    ``--set seed=3`` on R. Interrupted or finished, R is refused in one line naming both
    digests, byte for byte unchanged, no MLflow run made; the same config resumes; a
    sweep is refused too; ``--force`` replaces it."""
    from pipelines.sweep import sweep_digest

    h = _home_with_cache(home, tmp_path)
    out = tmp_path / "R"
    run = ("run", "--config", str(TINY), "--out", str(out))
    old, new = tiny_config().digest(), tiny_config("seed=3").digest()
    # an interrupted audit: killed just before its summary.json
    killed = cli_in(tmp_path, *run, home=h, env={"CL_AUDIT_FAILPOINTS": "atomic_write:summary.json=kill",
                                                "CL_AUDIT_FAILPOINT_DIR": str(tmp_path / "marks")})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = json.loads((out / ".cl-audit-state.json").read_text())
    assert state["config_digest"] == old and not state["finished"] and not (out / "summary.json").exists()
    db = h / "mlflow.db"

    def refused(*extra: str, kind: str = "run", where: str) -> None:
        before, runs = _files(out), _run_ids(db)
        args = (*run, "--set", "seed=3", *extra) if kind == "run" else (
            "sweep", "--config", str(TINY), "--out", str(out), *extra)
        r = cli_in(tmp_path, *args, home=h)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        this = f"this run {new}" if kind == "run" else f"this sweep {sweep_digest(tiny_config())}"
        assert lines[0] == (f"error: --out {out}: holds an audit of another config (digest {old} in {where}, "
                            f"{this}); choose another --out, or add --force to replace it")
        assert _files(out) == before  # nothing written: no data/*.parquet, no state file
        assert _run_ids(db) == runs  # no MLflow run

    refused(where=".cl-audit-state.json")
    # the same config resumes the interrupted audit (its MLflow run continued)
    resumed = cli_in(tmp_path, *run, home=h)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config_digest"] == old and summary["mlflow"]["run_id"] == state["parent_run_id"]
    refused(where="summary.json")
    refused(kind="sweep", where="summary.json")
    # --force: the folder now holds the audit of seed 3, and only it
    forced = cli_in(tmp_path, *run, "--set", "seed=3", "--force", home=h)
    assert forced.returncode == 0, forced.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config_digest"] == new and summary["seed"] == 3
    assert json.loads((out / ".cl-audit-state.json").read_text())["config_digest"] == new
    ok = cli_in(tmp_path, "verify", str(out), home=h)
    assert ok.returncode == 0 and re.search(r"^OK: \d+ files", ok.stdout, re.MULTILINE), ok.stdout + ok.stderr


def test_home_option_holds_cache_store_and_mlflow_and_help_names_it(home, tmp_path):
    """``--home H`` (no CL_AUDIT_HOME set): the model cache, the stage store and the
    MLflow store are under H, nothing under the current folder's ``runs``; history and
    verify read the same root; ``--help`` of every such command names the option, its
    variable and its default."""
    h = _home_with_cache(home, tmp_path)
    cwd = tmp_path / "work"
    cwd.mkdir()
    for command in ("run", "sweep", "verify", "history", "compare"):
        r = cli_in(cwd, command, "--help", home=None)
        assert r.returncode == 0, r.stderr
        assert "--home" in r.stdout and "CL_AUDIT_HOME" in r.stdout and "./runs" in r.stdout, (command, r.stdout)
    out = tmp_path / "R"
    r = cli_in(cwd, "run", "--config", str(TINY), "--out", str(out), "--home", str(h), home=None)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{h / 'mlflow.db'}"
    assert [p for p in (h / "store").iterdir() if p.name.startswith("tune-")]
    assert list(cwd.iterdir()) == []  # no ./runs
    hist = cli_in(cwd, "history", "--home", str(h), home=None)
    assert hist.returncode == 0 and summary["mlflow"]["run_id"][:8] in hist.stdout, hist.stdout + hist.stderr
    ok = cli_in(cwd, "verify", str(out), "--home", str(h), home=None)
    assert ok.returncode == 0 and re.search(r"^OK: \d+ files", ok.stdout, re.MULTILINE), ok.stdout + ok.stderr
    assert list(cwd.iterdir()) == []


def _modes(folder: Path) -> tuple[set[str], set[str]]:
    files = {oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.rglob("*") if p.is_file()}
    dirs = {oct(stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")] if p.is_dir()}
    return files, dirs


def test_files_follow_the_users_umask(home, tmp_path):
    """Under umask 022 every file of a run folder and of its stage folders is 0644 and
    every folder 0755 (a teammate can read the report); under 077, 0600 and 0700."""
    h = _home_with_cache(home, tmp_path)
    for umask, file_mode, dir_mode in ((0o022, "0o644", "0o755"), (0o077, "0o600", "0o700")):
        out = tmp_path / f"R{umask:o}"
        r = cli_in(tmp_path, "run", "--config", str(TINY), "--out", str(out), home=h, umask=umask)
        assert r.returncode == 0, r.stderr[-2000:]
        assert _modes(out) == ({file_mode}, {dir_mode}), umask
        if umask == 0o022:  # the stages were computed under this umask
            for stage in (p for p in (h / "store").iterdir() if p.is_dir() and not p.name.startswith(".")):
                assert _modes(stage) == ({file_mode}, {dir_mode}), stage


def test_compile_without_out_writes_to_stdout_and_nothing_else(tmp_path):
    r = cli_in(tmp_path, "compile", "capitals", home=tmp_path / "home")
    assert r.returncode == 0, r.stderr[-2000:]
    spec = yaml.safe_load(r.stdout)
    assert spec["pipelineInfo"]["name"] == "cl-audit"
    assert list(tmp_path.iterdir()) == []  # no infra/kubeflow/audit-pipeline.yaml of the current folder


def test_compile_is_deterministic_with_integer_defaults(tmp_path):
    paths = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    for p in paths:
        r = cli_in(tmp_path, "compile", "capitals", "--out", str(p), home=tmp_path / "home")
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"Wrote {p}" in r.stdout
    text = paths[0].read_text()
    assert paths[1].read_text() == text
    header = next(line for line in text.splitlines() if line.startswith("#    config: dict"))
    assert "'tune': {" in header and "'epochs': 3," in header and "3.0" not in header
    config = yaml.safe_load(text)["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert config["tune"]["epochs"] == 3 and type(config["tune"]["epochs"]) is int
    assert config["tune"]["lr"] == 0.001 and config["seed"] == 0 and type(config["seed"]) is int
