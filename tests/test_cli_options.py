"""The global options and the read-only commands of the command line, driven as a user
runs them (a subprocess, its exit code, its output): ``--version``, ``-v``/``--quiet``,
``cl-audit config``, ``run --dry-run``, and the provenance an audit records when it runs
from a copy of the code without ``.git`` (a ``git archive``, the image, ``submit``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import yaml

from conftest import ROOT

SOURCE_LOCATION = re.compile(r"\b\w+\.py:\d+\b")  # rich's log_path: `cli.py:220`


def cli(*args: str, home: Path, cwd: Path = ROOT, env: dict | None = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "CL_AUDIT_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env or {})}
    e.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=e, capture_output=True, check=False,
                          text=True, timeout=timeout)


def test_version_is_the_package_metadata_version(tmp_path):
    r = cli("--version", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"cl-audit {metadata.version('cl-audit')}"
    assert r.stderr == ""


def test_verbose_logs_without_source_location_and_default_is_silent(tmp_path):
    loud = cli("-v", "suites", home=tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert loud.stdout.startswith("capitals")
    assert f"cl-audit {metadata.version('cl-audit')}" in loud.stderr
    assert f"home {tmp_path}" in loud.stderr
    assert not SOURCE_LOCATION.search(loud.stderr), loud.stderr
    plain = cli("suites", home=tmp_path)
    assert plain.returncode == 0 and plain.stderr == "" and plain.stdout == loud.stdout


def test_verbose_and_quiet_together_is_a_usage_error(tmp_path):
    r = cli("-v", "--quiet", "suites", home=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: -v/--verbose and -q/--quiet: choose one"
    assert r.stdout == ""


def test_config_prints_the_resolved_config_and_runs_nothing(tmp_path):
    r = cli("config", "capitals", "--quick", "--set", "seed=3", "--set", "perturb.kl_penalty=0.25", home=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["suite"] == "capitals" and cfg["seed"] == 3 and cfg["perturb"]["kl_penalty"] == 0.25
    digest = re.search(r"^# config digest ([0-9a-f]{16})$", r.stdout, re.MULTILINE).group(1)
    # the printed YAML is a config file that resolves to the same config
    saved = tmp_path / "resolved.yaml"
    saved.write_text(r.stdout)
    again = cli("config", "--config", str(saved), home=tmp_path)
    assert again.returncode == 0, again.stderr
    assert re.search(r"^# config digest ([0-9a-f]{16})$", again.stdout, re.MULTILINE).group(1) == digest
    assert list(tmp_path.iterdir()) == [saved]  # nothing written to CL_AUDIT_HOME


def test_config_with_a_bad_field_is_one_line_and_exit_2(tmp_path):
    r = cli("config", "capitals", "--set", "perturb.kl_penalty=-1", home=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "perturb.kl_penalty" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_run_dry_run_prints_the_config_and_the_folder_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    r = cli("run", "capitals", "--quick", "--set", "seed=3", "--out", str(out), "--dry-run", home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    shown = cli("config", "capitals", "--quick", "--set", "seed=3", home=tmp_path / "home")
    assert yaml.safe_load(r.stdout) == yaml.safe_load(shown.stdout)
    assert f"# run folder {out}\n" in r.stdout
    assert not out.exists() and not (tmp_path / "home").exists()


def _archive(dest: Path) -> Path:
    """The committed tree of this checkout as `git archive` gives it (no .git)."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"], capture_output=True,
                         check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    return dest


def _source_digest(root: Path) -> str:
    """sha256 over the package's own .py/.yaml/.j2 files in sorted order (path, NUL, bytes, NUL)."""
    h = hashlib.sha256()
    files = sorted(p for pkg in ("components", "pipelines") for p in (root / pkg).rglob("*")
                   if p.suffix in (".py", ".yaml", ".j2") and "__pycache__" not in p.parts)
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def test_audit_from_a_git_archive_records_version_source_and_image_digest(tmp_path):
    """Run from a `git archive` copy (no .git, as in the image or through submit): the
    summary and the MLflow run name the cl-audit version, the source digest and the image
    digest (CL_AUDIT_IMAGE_DIGEST) instead of only `git_commit=unknown`; --quiet prints
    the results and no log lines."""
    from mlflow import MlflowClient

    src = _archive(tmp_path / "src")
    assert not (src / ".git").exists()
    out, home = tmp_path / "run", tmp_path / "home"
    image = "sha256:" + "ab" * 32
    r = cli("--quiet", "run", "--config", "tests/configs/tiny.yaml", "--out", str(out), home=home, cwd=src,
            env={"PYTHONPATH": str(src), "CL_AUDIT_IMAGE_DIGEST": image})
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    version = metadata.version("cl-audit")
    assert s["cl_audit_version"] == version and s["versions"]["cl-audit"] == version
    assert s["git_commit"] == "unknown"
    assert s["source_digest"] == _source_digest(src)
    assert s["image_digest"] == image
    tags = MlflowClient(s["mlflow"]["tracking_uri"]).get_run(s["mlflow"]["run_id"]).data.tags
    assert tags["cl_audit.version"] == version and tags["version.cl-audit"] == version
    assert tags["cl_audit.source_digest"] == s["source_digest"]
    assert tags["cl_audit.image_digest"] == image
    # --quiet: the tables and the verdict, no progress or log lines
    assert f"VERDICT: {s['verdict']['label']}" in r.stdout
    assert "model ready" not in r.stdout + r.stderr
    assert not SOURCE_LOCATION.search(r.stdout + r.stderr)
