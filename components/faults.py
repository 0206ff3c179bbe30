"""Failpoints: named places where a test can stop or kill the audit on purpose.

The fault tests (tests/test_faults.py) prove that a crash at any of these places loses
nothing and that the same command afterwards finishes with the same result. A failpoint
is inert unless the environment variable ``CL_AUDIT_FAILPOINTS`` names it::

    CL_AUDIT_FAILPOINTS="train_step:perturbed:2=pause,atomic_write:summary.json=kill"

Each entry is ``PATTERN=ACTION`` (``fnmatch`` pattern over the failpoint's name):

- ``kill``: the process kills itself with SIGKILL (no handler, no cleanup runs).
- ``kill-once``: as ``kill`` the first time only (a marker file remembers it), so a
  retried Ray task or a restarted worker goes on.
- ``raise``: raises ``RuntimeError`` (a failing task or Tune trial).
- ``pause``: writes a marker file and sleeps, so the test can kill the whole audit
  from outside at a known point.
- ``hold``: writes a marker file and waits until the test deletes it, so the test can
  act (e.g. stop a server) at a known point and let the audit go on.

Marker files (a line per hit) are written to ``CL_AUDIT_FAILPOINT_DIR`` (default: the system temp
folder), named after the failpoint with ``/`` replaced by ``_``. Ray workers of a local
cluster inherit the driver's environment, so failpoints work inside stage tasks too.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import tempfile
import time
from pathlib import Path

ENV = "CL_AUDIT_FAILPOINTS"


def _marker(name: str) -> Path:
    folder = Path(os.environ.get("CL_AUDIT_FAILPOINT_DIR") or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name.replace("/", "_")


def failpoint(name: str) -> None:
    """Act on ``name`` if ``CL_AUDIT_FAILPOINTS`` names it (see the module docstring);
    a no-op otherwise (one environment lookup)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for entry in spec.split(","):
        pattern, _, action = entry.strip().rpartition("=")
        if not pattern or not fnmatch.fnmatchcase(name, pattern):
            continue
        marker = _marker(name)
        if action == "kill-once" and marker.exists():
            continue
        with open(marker, "a") as f:  # one line per hit: the test can count them
            f.write(f"{os.getpid()}\n")
        if action in ("kill", "kill-once"):
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "raise":
            raise RuntimeError(f"failpoint {name}")
        elif action == "hold":
            while marker.exists():
                time.sleep(0.2)
        elif action == "pause":
            while True:
                time.sleep(3600)
