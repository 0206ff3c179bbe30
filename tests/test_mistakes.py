"""User mistakes, one row each: exit code 2, one line on stderr that names the file, line
or field and what was expected, no traceback, nothing written to the run folder or to
MLflow. The command is run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY

CAPITALS = ROOT / "pipelines" / "configs" / "capitals.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(tmp: Path) -> dict[str, str]:
    """Input files the mistakes need, written into ``tmp``; name -> path."""
    (tmp / "bad.yaml").write_text("tune:\n  lr: 0.1\n  epochs: [1,\n")
    (tmp / "list.yaml").write_text("- tune\n- perturb\n")
    (tmp / "latin1.yaml").write_bytes("tune:\n  lr: 0.1  # d\xe9j\xe0 vu\n".encode("latin-1"))
    (tmp / "blocker").write_text("a file, not a folder")
    (tmp / "empty_run").mkdir()
    return {k.replace(".", "_"): str(tmp / k) for k in ("bad.yaml", "list.yaml", "latin1.yaml", "blocker", "empty_run")}


# (id, command line with {placeholders}, expected text of the one line)
MISTAKES = [
    ("unknown suite", "run nosuchsuite", "error: suite 'nosuchsuite': unknown; expected one of capitals"),
    ("unknown config key", "run --set tune.nonsense=3", "tune.nonsense: unknown key"),
    ("unknown section", "run --set nosection.lr=3", "nosection: unknown key"),
    ("negative kl_penalty", "run --set perturb.kl_penalty=-0.5",
     "{capitals} + --set: perturb.kl_penalty: Input should be greater than or equal to 0"),
    ("wrong type", "run --set tune.lr=fast", "tune.lr: Input should be a valid number"),
    ("ci level out of range", "run --set probe.ci_level=1.5", "probe.ci_level: Input should be less than 1"),
    ("recovery size larger than the pool", "run --config {tiny} --set recover.sizes=[50]",
     "recover.sizes: 50 is larger than the in-task recovery pool data.n_recover_pool=6"),
    ("--set without =", "run --set tune.lr", "error: --set tune.lr: expected key=value, e.g. perturb.kl_penalty=0.1"),
    ("config file not found", "run --config does/not/exist.yaml", "error: does/not/exist.yaml: config file not found"),
    ("config file invalid YAML", "run --config {bad_yaml}", "error: {bad_yaml}: line 4: invalid YAML (expected the node content"),
    ("config file not a mapping", "run --config {list_yaml}",
     "error: {list_yaml}: expected a mapping of config sections, got list"),
    ("config file not UTF-8", "run --config {latin1_yaml}", "error: {latin1_yaml}: not UTF-8 text (byte 20)"),
    ("model path does not exist", "run --set model.id=/no/such/model",
     "error: model.id: '/no/such/model' is neither smollm2-135m-instruct, tiny-llama nor an existing local directory"),
    ("output folder not writable", "run --config {tiny} --out {blocker}/sub",
     "error: --out {blocker}/sub: output folder not writable"),
    ("tracking server down at start", "run --config {tiny} --tracking-uri http://127.0.0.1:{port}",
     "error: --tracking-uri http://127.0.0.1:{port}: MLflow tracking store not reachable"),
    ("registered-model name with a slash", "run --config {tiny} --register a/b",
     "error: --register 'a/b': expected a registered-model name without '/' or ':'"),
    ("show: no such run", "show /no/such/run", "error: /no/such/run/summary.json: not found"),
    ("report: no such run", "report /no/such/run",
     "error: /no/such/run: not a folder; expected the folder of a finished run"),
    ("verify: a folder without a manifest", "verify {empty_run}", "{empty_run}/manifest.json"),
    ("sync: no such folder", "sync /no/such/run",
     "error: /no/such/run: not a folder; expected the folder of an audit run"),
    ("sweep: unknown search", "sweep --config {tiny} --set sweep.search=bogus", "sweep.search: Input should be"),
    ("sweep: empty grid", "sweep --config {tiny} --set sweep.kl_penalty=[]", "sweep.kl_penalty"),
    ("compile: unknown suite", "compile nosuchsuite", "error: suite 'nosuchsuite': unknown"),
]


@pytest.mark.parametrize("args, expected", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_user_mistake_exits_2_with_one_line_and_writes_nothing(args, expected, tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    values = {**_files(tmp_path), "tiny": str(TINY), "capitals": str(CAPITALS), "port": str(_free_port())}
    argv = args.format(**values).split()
    if argv[0] in ("run", "sweep") and "--out" not in argv:
        argv += ["--out", str(out)]
    env = {**os.environ, "CL_AUDIT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CL_AUDIT_FAILPOINTS"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert expected.format(**values) in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    # nothing written: no file in the run folder, no run in the tracking store
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
    db = home / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            assert con.execute("select count(*) from runs").fetchone() == (0,)


def test_diverged_training_stops_the_stage_and_keeps_the_earlier_artifacts(home, tmp_path):
    """A loss that becomes NaN: one line naming the stage and the step, exit 2; the stage
    publishes nothing, the stages before it stay in the store, no summary is written."""
    h, out = tmp_path / "home", tmp_path / "out"
    h.mkdir()
    (home / "cache").mkdir(exist_ok=True)
    (h / "cache").symlink_to(home / "cache", target_is_directory=True)
    env = {**os.environ, "CL_AUDIT_HOME": str(h), "HF_HUB_OFFLINE": "1"}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CL_AUDIT_FAILPOINTS"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(TINY), "--out", str(out),
                        "--set", "perturb.lr=1e30"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert lines[0].startswith("error: perturbed: loss became nan at step ")
    assert lines[0].endswith("(lr=1e+30); stage stopped, earlier artifacts kept")
    kinds = sorted(p.name.split("-")[0] for p in (h / "store").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert "tune" in kinds and "perturb" not in kinds
    assert not (out / "summary.json").exists()
