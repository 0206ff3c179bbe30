"""`cl-audit submit` against a real Ray cluster started by the test on 127.0.0.1,
with token authentication, stopped at the end."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, TINY

BIN = Path(sys.executable).parent
PORT_FLAGS = [
    "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
    "object-manager-port",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Processes of the session the test's `ray start` leads (its own processes only)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:
            continue
        pid = int(stat.parent.name)
        if int(fields[3]) == sid and pid != sid:  # state, ppid, pgrp, session
            pids.append(pid)
    return pids


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster of the test's own: token auth on, every port free and on
    127.0.0.1, its own temp dir. Stopped at the end even when the test fails, by
    signalling only the processes it started (`ray stop` would stop every Ray instance
    of this machine's user, other people's included)."""
    tmp = Path(tempfile.mkdtemp(prefix="cla-", dir="/tmp"))  # short: Ray's socket paths
    token = secrets.token_hex(24)
    ports = {flag: free_port() for flag in PORT_FLAGS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
        # loopback only: on Linux Ray otherwise advertises the machine's address
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
        RAY_USAGE_STATS_ENABLED="0",
    )
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={tmp}", "--disable-usage-stats",
           *[f"--{flag}={port}" for flag, port in ports.items()]]
    log = open(tmp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(tmp / 'ray-start.log').read_text()[-3000:]}")
            try:
                req = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(req, timeout=5)
                break
            except (urllib.error.URLError, OSError):
                if time.time() > deadline:
                    raise RuntimeError("the Ray dashboard did not come up in 240 s") from None
                time.sleep(1)
        yield {"address": address, "token": token, "tmp": tmp}
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        time.sleep(2)
        for pid in _session_pids(proc.pid):  # stragglers: workers, the job driver
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def submit_cli(*args: str, token: str | None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if token:
        env["RAY_AUTH_TOKEN"] = token
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "submit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_runs_an_audit_on_the_cluster(ray_cluster, tiny_run, home, tmp_path):
    """A tiny audit through `cl-audit submit`: the checkout is uploaded, the job runs on
    the cluster's workers (which have no PYTHONPATH to the code), logs stream back, the
    exit code is the job's, the summary lands in the run folder. The run folder is the
    session's, as a cluster's shared volume would be, so the stages computed by the
    local audit are reused and the numbers are the same."""
    _, _, local = tiny_run
    out = tmp_path / "submitted"
    r = submit_cli("--address", ray_cluster["address"], "--env", f"CL_AUDIT_HOME={home}",
                   "--", "run", "--config", str(TINY.relative_to(ROOT)), "--out", str(out),
                   token=ray_cluster["token"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    job_id = r.stdout.split("submitted ", 1)[1].split()[0]
    assert job_id.startswith("raysubmit_")
    assert f"job {job_id} SUCCEEDED" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert f"VERDICT: {summary['verdict']['label']}" in r.stdout  # the driver's output, streamed
    assert summary["stages"] == local["stages"] and summary["verdict"] == local["verdict"]
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{home / 'mlflow.db'}"
    assert ray_cluster["token"] not in r.stdout + r.stderr

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_cluster["address"], headers={"Authorization": f"Bearer {ray_cluster['token']}"})
    info = client.get_job_info(job_id)
    assert str(info.status.value) == "SUCCEEDED"
    assert info.entrypoint.startswith("python -m pipelines.cli run --config tests/configs/tiny.yaml")
    assert "working_dir" in info.runtime_env and info.runtime_env["env_vars"] == {"CL_AUDIT_HOME": str(home)}


def test_a_failing_job_exits_with_its_code(ray_cluster, tmp_path):
    r = submit_cli("--address", ray_cluster["address"], "--", "run", "nosuchsuite", "--out", str(tmp_path / "x"),
                   token=ray_cluster["token"], timeout=600)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert "error: suite 'nosuchsuite': unknown" in r.stdout
    assert " FAILED" in r.stdout


def test_without_the_token_the_cluster_refuses_in_one_line(ray_cluster):
    r = submit_cli("--address", ray_cluster["address"], "--", "run", "capitals", token=None, timeout=300)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "requires a token" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_raw_ray_job_submit_needs_auth_mode_token_as_the_docs_say(ray_cluster, tmp_path):
    """The raw route of docs/cluster.md and infra/README.md (`ray job submit`, Ray's own
    CLI) on a token-auth cluster: with RAY_AUTH_TOKEN alone it is refused, with
    RAY_AUTH_MODE=token beside it (what the docs export) the job runs."""
    work = tmp_path / "wd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN"] = ray_cluster["token"]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster["address"], "--working-dir", str(work),
           "--", "python", "-c", "print('raw-route-ok')"]
    alone = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert alone.returncode != 0 and "raw-route-ok" not in alone.stdout
    both = subprocess.run(cmd, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=300,
                          check=False)
    assert both.returncode == 0, (both.stdout + both.stderr)[-3000:]
    assert "raw-route-ok" in both.stdout
    for doc in ("docs/cluster.md", "infra/README.md"):
        text = (ROOT / doc).read_text()
        assert "ray job submit" in text and "RAY_AUTH_MODE=token" in text, doc


def test_submit_refuses_bad_input_before_contacting_a_cluster(tmp_path, monkeypatch):
    from components.errors import UserError
    from pipelines.submit import parse_env, ray_auth_token, submit

    with pytest.raises(UserError, match="--env HF_HUB_OFFLINE: set by cl-audit for every task"):
        parse_env(["HF_HUB_OFFLINE=0"])
    with pytest.raises(UserError, match="--env NOVALUE: expected KEY=VALUE"):
        parse_env(["NOVALUE"])
    assert parse_env(["CL_AUDIT_HOME=/data/runs", "A=b=c"]) == {"CL_AUDIT_HOME": "/data/runs", "A": "b=c"}
    with pytest.raises(UserError, match="not a cl-audit checkout"):
        submit("http://127.0.0.1:9", ["run"], working_dir=tmp_path)
    with pytest.raises(UserError, match="no command given"):
        submit("http://127.0.0.1:9", [])
    with pytest.raises(UserError, match="Ray Jobs API not reachable"):
        submit("http://127.0.0.1:9", ["run"], working_dir=ROOT)
    # the token: RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, none when auth is disabled
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t1")
    assert ray_auth_token() == "t1"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "tok").write_text("t2\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert ray_auth_token() == "t2"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH .*cannot read the token file"):
        ray_auth_token()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_auth_token() is None
