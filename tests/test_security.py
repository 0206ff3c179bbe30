"""Security defaults and resource faults: secrets never recorded, the same metrics from the
same config and seed, artifact names that cannot leave the run folder, a local Ray
without a dashboard, a full disk that leaves the previous state intact."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.artifacts import Store, atomic_write, inside
from components.registry import load_config
from components.errors import UserError

from conftest import ROOT, TINY, MlflowServer

SECRETS = {"HF_TOKEN": "hf_S3cretHubToken", "MLFLOW_TRACKING_PASSWORD": "S3cretMlflowPw",
           "AWS_SECRET_ACCESS_KEY": "S3cretAwsKey", "DATABASE_PASSWORD": "S3cretDbPw"}
URI_PASSWORD = "S3cretInTheUri"


def _grep(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [f"{p}: {n}" for n in needles if n.encode() in data]
    return hits


def test_secrets_never_recorded_and_same_config_same_metrics(tiny_run, home, tmp_path):
    """An audit with credentials in the environment and a password in the tracking URI:
    none of them in the output, the run folder, the stage store, MLflow's params, tags
    and artifacts or the server's database. Its metrics equal the earlier in-process run
    of the same config and seed; the seed and library versions are tags of the run."""
    _, _, ref = tiny_run
    h = tmp_path / "home"
    h.mkdir()
    (home / "cache").mkdir(exist_ok=True)
    (h / "cache").symlink_to(home / "cache", target_is_directory=True)
    srv = MlflowServer(tmp_path / "server").start()
    try:
        uri = f"http://auditor:{URI_PASSWORD}@127.0.0.1:{srv.port}"
        out = tmp_path / "run"
        env = {**os.environ, **SECRETS, "CL_AUDIT_HOME": str(h), "HF_HUB_OFFLINE": "1"}
        for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CL_AUDIT_FAILPOINTS"):
            env.pop(k, None)
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(TINY), "--out", str(out),
                            "--tracking-uri", uri], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        needles = [*SECRETS.values(), URI_PASSWORD]
        assert [line for line in (r.stdout + r.stderr).splitlines() if any(n in line for n in needles)] == []
        assert _grep(out, needles) == []
        assert _grep(h / "store", needles) == []
        assert _grep(srv.root, needles) == []  # the server's database (params, tags) and artifacts
        summary = json.loads((out / "summary.json").read_text())
        assert summary["mlflow"]["tracking_uri"] == f"http://auditor:***@127.0.0.1:{srv.port}"
        client = MlflowClient(srv.uri)
        run = client.get_run(summary["mlflow"]["run_id"])
        recorded = json.dumps([run.data.params, run.data.tags])
        assert [n for n in needles if n in recorded] == []

        # determinism: another process, the same machine, the same config and seed
        for k in ("config_digest", "model_digest", "data_digest", "seed", "stages", "verdict"):
            assert summary[k] == ref[k], k
        assert run.data.tags["cl_audit.seed"] == "0"
        assert run.data.tags["version.torch"] == metadata.version("torch")
        assert run.data.tags["version.transformers"] == metadata.version("transformers")
    finally:
        srv.stop()


def test_artifact_names_cannot_escape_the_run_folder(tmp_path):
    assert inside(tmp_path, "recovered/in_task/4.parquet") == tmp_path.resolve() / "recovered" / "in_task" / "4.parquet"
    for bad in ("../x.parquet", "a/../../x", "/etc/passwd"):
        with pytest.raises(UserError, match="escapes its folder"):
            inside(tmp_path, bad)
    # stage names come from validated config only: a recovery arm named like a path is refused
    with pytest.raises(UserError, match=r"recover\.arms\.0: Input should be 'in_task', 'irrelevant' or 'in_context'"):
        load_config(config_file=TINY, overrides=["recover.arms=[../../evil]"])


def test_verify_refuses_a_manifest_that_points_outside_the_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"files": [
        {"path": "summary.json", "sha256": "0" * 64, "size": 2},
        {"path": "../../etc/passwd", "sha256": "0" * 64, "size": 1}]}))
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "verify", str(run)], cwd=ROOT,
                       env={**os.environ, "CL_AUDIT_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {run / 'manifest.json'}: manifest.json: files[1].path: '../../etc/passwd' "
                                "escapes the run folder; expected a relative path without '..'")


def test_defaults_are_safe():
    cfg = load_config(config_file=TINY)
    assert cfg.model.trust_remote_code is False


def test_local_ray_serves_no_dashboard(ray_local):
    """The local Ray the audit starts has no dashboard (no HTTP server for job control)."""
    import ray

    ctx = ray.get_runtime_context()
    assert not ray._private.worker.global_worker.node.address_info.get("webui_url")
    assert ctx.get_node_id()


def _fsize_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    return apply


def test_disk_full_while_saving_keeps_the_previous_state(tiny_run, tmp_path):
    """Writes that fail part-way (the file-size limit of the process stands in for a full
    disk: the same failing write() call) leave the previous files and stage outputs as
    they were and no half-written file: for `cl-audit report` and for the stage store."""
    _, out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = {p: p.read_bytes() for p in [run / "report.html", *sorted((run / "plots").glob("*.png"))]}
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "report", str(run)], cwd=ROOT,
                       env={**os.environ, "CL_AUDIT_HOME": str(tmp_path)}, capture_output=True, text=True,
                       timeout=300, preexec_fn=_fsize_limit(16 * 1024))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"error: {run}/") and lines[0].endswith(
        ": File too large; nothing half-written, earlier results kept")
    assert {p: p.read_bytes() for p in before} == before
    assert [p for p in run.rglob(".*tmp*")] == []

    # the stage store: a stage whose output does not fit is not published; the earlier one stays
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from components.artifacts import Store
s = Store(Path({str(tmp_path / 'store')!r}))
try:
    s.produce("big-1", lambda tmp: (tmp / "weights.bin").write_bytes(b"x" * 65536) and {{}})
except OSError as e:
    print("OSError", e.errno)
"""
    store = Store(tmp_path / "store")
    store.produce("small-1", lambda tmp: (tmp / "w.bin").write_bytes(b"y" * 100) and {"n": 1})
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       preexec_fn=_fsize_limit(16 * 1024))
    assert r.stdout.strip() == "OSError 27", r.stdout + r.stderr  # EFBIG
    assert not store.done("big-1")
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".")) == ["executions.log", "small-1"]
    assert [p.name for p in store.root.iterdir() if ".tmp-" in p.name] == []
    assert store.load("small-1") == {"n": 1} and (store.path("small-1") / "w.bin").read_bytes() == b"y" * 100


def test_atomic_write_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write(target, "old")
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from components.artifacts import atomic_write
try:
    atomic_write({str(target)!r}, "x" * 100000)
except OSError as e:
    print(e.errno, e.filename)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       preexec_fn=_fsize_limit(4096))
    assert r.stdout.strip() == f"27 {target}"
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
