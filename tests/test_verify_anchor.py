"""``cl-audit verify`` cannot be bypassed: a manifest rewritten to match edited files
fails whether its anchor (the sha256 tag on the audit's MLflow run) is checked, missing
or unreachable, unless ``--allow-unanchored``; no path outside the run folder or the
stage store is read, whatever the manifest says.

A run folder in the audit's format (``manifest.json`` as :func:`pipelines.audit.build_manifest`
writes it: run-folder files, stage files with their ``local`` path in the stage store)
on a real sqlite MLflow store whose parent run carries the manifest's digest."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

from components.artifacts import file_record
from pipelines.tracking import AuditTracker


def verify(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CL_AUDIT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "verify", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def sign(client: MlflowClient, run_id: str, manifest: dict, folder: Path) -> None:
    """Write ``manifest.json`` and record its sha256 on the run, as the audit does."""
    text = json.dumps(manifest, indent=1)
    (folder / "manifest.json").write_text(text)
    client.set_tag(run_id, "cl_audit.manifest_sha256", hashlib.sha256(text.encode()).hexdigest())


@pytest.fixture
def audit(tmp_path):
    """(run folder, home, tracking URI, parent run id, manifest) of a signed audit."""
    home, run = tmp_path / "home", tmp_path / "run"
    adapter = home / "store" / "tune-0123456789abcdef" / "adapter" / "adapter_model.safetensors"
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"weights" * 100)
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"verdict": {"label": "spurious"}}))
    (run / "metrics.parquet").write_bytes(b"PAR1" + bytes(range(200)))
    uri = f"sqlite:///{home / 'mlflow.db'}"  # the store of CL_AUDIT_HOME: the one verify trusts by default
    tracker = AuditTracker(uri, "cl-audit")
    parent = tracker.start("audit", {}, {"cl_audit.kind": "audit"})
    child = tracker.stage("aligned", {}, [], {}, {})
    files = [{"path": p, **file_record(run / p), "run_id": parent, "artifact_path": p}
             for p in ("metrics.parquet", "summary.json")]
    files.append({"path": "stages/aligned/adapter/adapter_model.safetensors", **file_record(adapter),
                  "run_id": child, "artifact_path": "adapter/adapter_model.safetensors", "local": str(adapter)})
    manifest = {"format": "cl-audit-manifest/1", "audit_run_id": parent, "tracking_uri": uri,
                "experiment_id": tracker.experiment_id, "created": "2025-01-01T00:00:00Z", "algorithm": "sha256",
                "files": files}
    sign(tracker.client, parent, manifest, run)
    return run, home, uri, parent, manifest


def rewrite(run: Path, manifest: dict, **top) -> dict:
    """Change summary.json and rewrite the manifest to match it (digest and size), plus
    ``top`` (other top-level fields); the anchor tag is left as it was."""
    (run / "summary.json").write_text(json.dumps({"verdict": {"label": "knowledge_loss"}}))
    m = json.loads(json.dumps(manifest))
    for f in m["files"]:
        if f["path"] == "summary.json":
            f.update(file_record(run / "summary.json"))
    m.update(top)
    (run / "manifest.json").write_text(json.dumps(m, indent=1))
    return m


def test_untouched_audit_verifies(audit):
    run, home, _, parent, _ = audit
    r = verify(str(run), home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"note: manifest.json matches the sha256 recorded on MLflow run {parent}" in r.stdout
    assert f"OK: 3 files of run folder {run} match the manifest (sha256 and size)" in r.stdout


def test_rewritten_manifest_fails_with_its_anchor_checked(audit):
    run, home, _, parent, manifest = audit
    rewrite(run, manifest)
    r = verify(str(run), home=home)
    assert r.returncode == 1, r.stdout + r.stderr
    [bad] = [x for x in r.stdout.splitlines() if x.startswith("MISMATCH")]
    assert bad.startswith("MISMATCH manifest.json: sha256 ") and bad.endswith(f"recorded on MLflow run {parent}")


@pytest.mark.parametrize("how", ["store unreachable", "run id removed", "anchor tag missing"])
def test_rewritten_manifest_fails_when_its_anchor_cannot_be_checked(audit, tmp_path, how):
    run, home, uri, parent, manifest = audit
    extra: list[str] = []
    if how == "store unreachable":  # the store trusted here is not there
        gone = f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}"
        rewrite(run, manifest)
        extra = ["--tracking-uri", gone]
        why = f"tracking store {gone}: not found (no audits recorded there yet?)"
    elif how == "run id removed":
        rewrite(run, manifest, audit_run_id=None)
        why = "it names no MLflow run"
    else:
        rewrite(run, manifest)
        MlflowClient(uri).delete_tag(parent, "cl_audit.manifest_sha256")
        why = f"no digest recorded on MLflow run {parent}"
    r = verify(str(run), *extra, home=home)
    assert r.returncode == 1, r.stdout + r.stderr
    bad = [x for x in r.stdout.splitlines() if x.startswith("MISMATCH")]
    assert bad == [(f"MISMATCH manifest.json: not anchored ({why}); the files cannot be trusted to be the "
                    "audit's; --allow-unanchored checks them against this manifest alone")], r.stdout
    assert (f"FAILED: 0 of 3 files of run folder {run} do not match; manifest.json itself is not the audit's "
            "(see above)") in r.stdout

    # the user may accept an unanchored manifest: the files match the (rewritten) manifest
    r = verify(str(run), *extra, "--allow-unanchored", home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"note: manifest.json not anchored ({why}); checked against itself only (--allow-unanchored)" in r.stdout
    assert f"OK: 3 files of run folder {run} match the manifest" in r.stdout


def test_a_manifest_anchored_in_a_store_of_its_own_fails(audit, tmp_path):
    """A forger rewrites summary.json and the manifest, and names a store of his own
    holding a run tagged with the forged manifest's digest: verify anchors in the store
    it trusts, never in the one the manifest names (and does not open it), so the check
    fails, also with --allow-unanchored."""
    run, home, uri, parent, manifest = audit
    forged_uri = f"sqlite:///{tmp_path / 'forged.db'}"
    forger = AuditTracker(forged_uri, "cl-audit")
    fake = forger.start("audit", {}, {"cl_audit.kind": "audit"})
    m = rewrite(run, manifest, tracking_uri=forged_uri, audit_run_id=fake)
    sign(forger.client, fake, m, run)
    victim = tmp_path / "victim.db"
    victim.write_bytes(b"")
    for flags in ([], ["--allow-unanchored"]):
        r = verify(str(run), *flags, home=home)
        assert r.returncode == 1, r.stdout + r.stderr
        bad = [x for x in r.stdout.splitlines() if x.startswith("MISMATCH")]
        assert bad == [f"MISMATCH manifest.json: run {fake}: no such MLflow run in {uri}; the manifest is not "
                       "anchored in the store trusted here (if the audit was recorded elsewhere, pass that store's "
                       "--tracking-uri)"], r.stdout
        assert f"note: the manifest names the tracking store {forged_uri}; anchored against {uri}" in r.stdout
    # a store the manifest names is never opened (nor created, nor migrated)
    m = rewrite(run, manifest, tracking_uri=f"sqlite:///{victim}")
    r = verify(str(run), home=home)
    assert r.returncode == 1 and victim.stat().st_size == 0, r.stdout
    assert not Path(f"{victim}.lock").exists()


def test_a_folder_verified_with_another_home_is_one_line(audit, tmp_path):
    """Stage artifacts all in another home's store: one line naming both stores, exit 2,
    not a mismatch per file read as tampering."""
    run, home, uri, parent, manifest = audit
    other = tmp_path / "other-home"
    other.mkdir()
    r = verify(str(run), "--tracking-uri", uri, home=other)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == (
        f"error: {run / 'manifest.json'}: the audit's stage artifacts are in the stage store {home / 'store'}, not "
        f"in {other / 'store'} (CL_AUDIT_HOME); run verify with CL_AUDIT_HOME={home}, or verify the audit's MLflow "
        "run id")


@pytest.mark.parametrize("anchored", [True, False])
def test_no_path_outside_the_run_folder_or_the_store_is_read(audit, tmp_path, anchored):
    """A manifest whose ``local`` names a file outside the stage store, and a run-folder
    entry that is a link to a file outside the folder, both with the right digest: each
    is a mismatch, not read; even when the manifest is anchored."""
    run, home, uri, parent, manifest = audit
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not the audit's")
    (run / "linked.txt").symlink_to(secret)
    m = json.loads(json.dumps(manifest))
    stage = m["files"][2]
    stage.update({"local": str(secret), **file_record(secret)})
    m["files"].append({"path": "linked.txt", **file_record(secret), "run_id": parent, "artifact_path": "linked.txt"})
    if anchored:
        sign(MlflowClient(uri), parent, m, run)
    else:  # names no run: not anchored, accepted with --allow-unanchored
        m["audit_run_id"] = None
        (run / "manifest.json").write_text(json.dumps(m, indent=1))
    r = verify(str(run), *([] if anchored else ["--allow-unanchored"]), home=home)
    assert r.returncode == 1, r.stdout + r.stderr
    bad = sorted(x for x in r.stdout.splitlines() if x.startswith("MISMATCH"))
    store = home / "store"
    assert bad == [
        f"MISMATCH linked.txt: {run / 'linked.txt'} leads outside the run folder {run}; not read",
        (f"MISMATCH stages/aligned/adapter/adapter_model.safetensors: {secret} is outside the run folder "
         f"and the stage store {store}; not read"),
    ], r.stdout
    assert f"FAILED: 2 of 4 files of run folder {run} do not match" in r.stdout


def test_unanchored_run_id_fails_unless_allowed(audit):
    """The MLflow-run route: a run without the manifest's digest fails unless allowed."""
    run, home, uri, parent, _ = audit
    client = MlflowClient(uri)
    client.log_artifact(parent, str(run / "manifest.json"))
    for p in ("summary.json", "metrics.parquet"):
        client.log_artifact(parent, str(run / p))
    client.delete_tag(parent, "cl_audit.manifest_sha256")
    r = verify(parent, "--tracking-uri", uri, home=home)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"MISMATCH manifest.json: not anchored (no digest recorded on MLflow run {parent}); the files cannot "
            "be trusted to be the audit's; --allow-unanchored checks them against this manifest alone") in r.stdout
    r = verify(parent, "--tracking-uri", uri, "--allow-unanchored", home=home)
    assert "MISMATCH manifest.json" not in r.stdout
    assert (f"note: manifest.json not anchored (no digest recorded on MLflow run {parent}); checked against itself "
            "only (--allow-unanchored)") in r.stdout
