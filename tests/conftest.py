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


def wait_until_ready(proc, log: Path, what: str, ready, not_yet, timeout: float, every: float) -> None:
    """Poll ``ready()`` until it returns without raising ``not_yet``; fail with the last of
    ``log`` when ``proc`` exits first, or when ``timeout`` seconds pass."""
    import time

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited: {log.read_text()[-2000:]}")
        try:
            ready()
            return
        except not_yet:
            if time.time() > deadline:
                pytest.fail(f"{what} did not answer within {timeout} s")
            time.sleep(every)


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, served artifacts) that a
    test can kill and start again on the same port and store."""

    def __init__(self, root: Path, backend: str | None = None):
        import socket

        self.backend = backend  # default: sqlite:///<root>/mlflow.db
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
        import urllib.request

        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", self.backend or f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        wait_until_ready(self.proc, self.root / "server.log", "mlflow server",
                         lambda: urllib.request.urlopen(f"{self.uri}/health", timeout=2), OSError, timeout, 0.5)
        return self

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


class PostgresCluster:
    """A throwaway PostgreSQL cluster from Debian's ``postgresql`` package: ``initdb`` in
    a fresh folder under the system temp folder, ``postgres`` listening on a free port of
    127.0.0.1 only (no Unix socket outside its folder), trust authentication, one
    database ``mlflow``. As root (initdb refuses root) the server runs as the ``postgres``
    user of the package, else as ``nobody``. :meth:`stop` ends the server and removes
    the folder.

    Raises (``start``):
        pytest.skip.Exception: no PostgreSQL binaries (``make test`` installs them).
    """

    def __init__(self):
        import socket
        import tempfile

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root = Path(tempfile.mkdtemp(prefix="cl-audit-pg-"))
        self.data = self.root / "data"
        self.proc = None
        self.bin = self._bin_dir()
        self.user, self.uid, self.gid = self._run_as()
        self.uri = f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/mlflow"

    @staticmethod
    def _bin_dir() -> Path | None:
        import glob
        import shutil

        found = shutil.which("initdb")
        if found:
            return Path(found).resolve().parent
        dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
        return Path(dirs[-1]) if dirs else None

    @staticmethod
    def _run_as() -> tuple[str, int | None, int | None]:
        import getpass
        import pwd

        if os.geteuid() != 0:
            return getpass.getuser(), None, None
        for name in ("postgres", "nobody"):
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                continue
            return name, pw.pw_uid, pw.pw_gid
        pytest.fail("running as root and neither the postgres nor the nobody user exists")

    def _run(self, *args: str) -> None:
        import subprocess

        r = subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
                           user=self.uid, group=self.gid, extra_groups=[] if self.uid is not None else None,
                           cwd=self.root)
        if r.returncode != 0:
            pytest.fail(f"{args[0]} failed: {r.stdout[-1000:]}{r.stderr[-1000:]}")

    def version(self) -> str:
        import subprocess

        return subprocess.run([str(self.bin / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()

    def start(self, timeout: float = 60) -> "PostgresCluster":
        import subprocess

        if self.bin is None:
            # `make test` installs it (the postgresql target): its absence is a failure, never a skip
            pytest.fail("PostgreSQL is not installed (Debian: apt-get install postgresql; `make test` does it)")
        if self.uid is not None:
            os.chown(self.root, self.uid, self.gid)
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "--no-sync", "-E", "UTF8",
                  "--locale=C")
        log = open(self.root / "postgres.log", "a")
        if self.uid is not None:
            os.chown(self.root / "postgres.log", self.uid, self.gid)
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={self.data}", "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, user=self.uid, group=self.gid,
            extra_groups=[] if self.uid is not None else None, cwd=self.root)
        log.close()
        wait_until_ready(self.proc, self.root / "postgres.log", "postgres",
                         lambda: self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-q"),
                         pytest.fail.Exception, timeout, 0.3)
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "mlflow")
        return self

    def stop(self) -> None:
        import shutil
        import signal
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # smart shutdown of the postmaster and its backends
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
