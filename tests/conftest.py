"""Shared fixtures: an isolated run folder, the tiny model config, one local Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
SCHEMA = ROOT / "tests" / "data" / "summary.schema.json"


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """A run folder (store, cache, mlflow.db) shared by the tests of one session.

    With ``CL_AUDIT_TEST_CACHE`` set, its ``cache/`` (the built tiny model, the converted
    SmolLM2) is that folder, kept between sessions; the store and MLflow stay fresh."""
    h = tmp_path_factory.mktemp("clhome")
    cache = os.environ.get("CL_AUDIT_TEST_CACHE")  # reuse built models between sessions if given
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        (h / "cache").symlink_to(Path(cache).resolve())
    os.environ["CL_AUDIT_HOME"] = str(h)
    return h


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (2 CPUs), shut down at the end."""
    import ray

    from pipelines.dag import init_ray

    init_ray()
    yield ray
    ray.shutdown()


def tiny_config(*overrides: str):
    from components.registry import load_config

    return load_config(config_file=TINY, overrides=list(overrides))


@pytest.fixture(scope="session")
def tiny_run(home, ray_local, tmp_path_factory):
    """One complete audit of the tiny model through Ray and a sqlite MLflow store."""
    from pipelines.audit import run_audit

    cfg = tiny_config()
    out = tmp_path_factory.mktemp("tinyrun")
    summary = run_audit(cfg, out, home)
    return cfg, out, summary


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, served artifacts) that a
    test can kill and start again on the same port and store."""

    def __init__(self, root: Path):
        import socket

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = self.root / "artifacts"
        self.proc = None

    def start(self, timeout: float = 180) -> "MlflowServer":
        import subprocess
        import sys
        import time
        import urllib.request

        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return self
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"mlflow server did not answer /health within {timeout} s")
                time.sleep(0.5)

    def stop(self, sig: int | None = None) -> None:
        """Stop the server and its workers (SIGTERM, or ``sig``, e.g. SIGKILL)."""
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig or signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
