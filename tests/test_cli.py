"""The command line as a user runs it: a subprocess, its exit code, its output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY


def cli(*args: str, home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "CL_AUDIT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "nosuchsuite"], "error: suite 'nosuchsuite': unknown; expected one of capitals"),
        (["run", "--set", "perturb.kl_penalty=-0.5"],
         "error: pipelines/configs/capitals.yaml + --set: perturb.kl_penalty: Input should be greater than or equal to 0"),
        (["run", "--set", "tune.nonsense=3"], "tune.nonsense: unknown key"),
        (["run", "--config", "does/not/exist.yaml"], "error: does/not/exist.yaml: config file not found"),
        (["run", "--set", "model.id=/no/such/model"],
         "error: model.id: '/no/such/model' is neither smollm2-135m-instruct, tiny-llama nor an existing local directory"),
        (["show", "/no/such/run"], "error: /no/such/run/summary.json: not found"),
        (["report", "/no/such/run"], "error: /no/such/run: not a folder; expected the folder of a finished run"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, expected, tmp_path):
    r = cli(*args, "--out", str(tmp_path / "out"), home=tmp_path) if args[0] == "run" else cli(*args, home=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert expected.replace("pipelines/configs/capitals.yaml", str(ROOT / "pipelines/configs/capitals.yaml")) in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "out" / "summary.json").exists()


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("run", "--config", str(TINY), "--out", str(blocker / "sub"), home=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().startswith(f"error: --out {blocker / 'sub'}: output folder not writable")


def test_run_prints_table_and_verdict_then_show_repeats_it(tmp_path):
    out = tmp_path / "run"
    r = cli("run", "--config", str(TINY), "--out", str(out), home=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert f"VERDICT: {summary['verdict']['label']}" in r.stdout
    for stage in summary["stages"]:
        assert stage in r.stdout
    assert summary["mlflow"]["run_id"] in r.stdout
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert f"Report: {out / 'report.html'}" in r.stdout
    assert (out / "report.html").stat().st_size > 10_000
    shown = cli("show", str(out), home=tmp_path)
    assert shown.returncode == 0
    assert f"VERDICT: {summary['verdict']['label']}" in shown.stdout
    assert f"Report: {out / 'report.html'}" in shown.stdout


def test_suites_lists_capitals(tmp_path):
    r = cli("suites", home=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("capitals")


@pytest.mark.parametrize("command, example", [
    ("run", "Example: cl-audit run capitals --quick"),
    ("show", "Example: cl-audit show runs/audits/"),
    ("report", "Example: cl-audit report runs/audits/"),
    ("suites", "Example: cl-audit suites"),
    ("compile", "Example: cl-audit compile capitals --image"),
    ("submit", "Example: cl-audit submit --address http://127.0.0.1:8265 -- run capitals"),
])
def test_help_has_examples(command, example, tmp_path):
    r = cli(command, "--help", home=tmp_path)
    assert r.returncode == 0
    assert example in r.stdout


def test_top_level_help_names_the_commands(tmp_path):
    r = cli("--help", home=tmp_path)
    assert r.returncode == 0
    for command in ("run", "show", "report", "suites"):
        assert re.search(rf"\b{command}\b", r.stdout)
    assert "Example: cl-audit run capitals --quick" in r.stdout
