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


# click's own wording differs by version: "No such option: --x" (the click bundled in
# typer >= 0.27), "No such option '--x'." (click 8.5 beside typer 0.16, make test-oldest)
@pytest.mark.parametrize("args, says", [
    (["--no-such-flag"], r"No such option:? '?--no-such-flag"),
    (["runn"], r"No such command 'runn'"),
    (["run", "--bogus"], r"No such option:? '?--bogus"),
])
def test_usage_mistake_is_a_short_message_and_exit_2(args, says, tmp_path):
    r = cli(*args, home=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and re.search(says, r.stderr), r.stderr
    assert len(r.stderr.strip().splitlines()) <= 5


def test_short_help_flag(tmp_path):
    r = cli("-h", home=tmp_path)
    assert r.returncode == 0 and "Usage:" in r.stdout and "Commands" in r.stdout
