"""``cl-audit submit``: run a cl-audit command on a Ray cluster through the Ray Jobs API.

The working directory (a cl-audit checkout) is packaged by Ray as the job's
``working_dir`` (without ``.venv``, ``runs``, ``.git`` and caches), the command runs there
as ``python -m pipelines.cli <args>`` (so the checkout's code is what runs, on every
node), its logs are streamed back, and the exit code is the job's: 0 when it
succeeded, else the driver's exit code (2 for a user mistake), or 1.

Token authentication (Ray >= 2.52; on by default for local clusters since 2.59): the
token is taken the way Ray takes it (``RAY_AUTH_TOKEN``, then the file named by
``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``; none when ``RAY_AUTH_MODE=disabled``)
and sent as a bearer token. It is never printed or logged.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from components.errors import UserError

# Never uploaded: environments, run folders, VCS data, caches, build outputs.
WORKING_DIR_EXCLUDES = [
    ".venv", "venv", "runs", ".git", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", "build",
    "dist", ".cache", "test-artifacts", "mlruns", "mlartifacts", "*.db",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def ray_auth_token() -> str | None:
    """The Ray auth token, found where Ray looks for it (see the module docstring).

    Raises:
        UserError: ``RAY_AUTH_TOKEN_PATH`` names a file that cannot be read.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip() or None
        except OSError as e:
            raise UserError(f"RAY_AUTH_TOKEN_PATH {path}: cannot read the token file ({e.strerror})") from None
    default = Path.home() / ".ray" / "auth_token"
    try:
        return default.read_text().strip() or None
    except OSError:
        return None


def parse_env(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings of ``--env`` as a dict.

    Raises:
        UserError: an item without ``=``, or a variable that every cl-audit task sets
            itself (Ray refuses to merge two values of one variable).
    """
    from components.runner import TASK_ENV

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--env {item.split('=')[0]}: expected KEY=VALUE, e.g. --env CL_AUDIT_HOME=/data/runs")
        key = key.strip()
        if key in TASK_ENV:
            raise UserError(f"--env {key}: set by cl-audit for every task already ({key}={TASK_ENV[key]})")
        out[key] = value
    return out


def check_working_dir(path: Path) -> Path:
    """The absolute path of a cl-audit checkout to package.

    Raises:
        UserError: not a directory, or no ``pipelines/cli.py`` in it.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"--working-dir {path}: not a directory")
    if not (path / "pipelines" / "cli.py").exists():
        raise UserError(
            f"--working-dir {path}: not a cl-audit checkout (no pipelines/cli.py); run from the repository root"
        )
    return path


def entrypoint(args: list[str]) -> str:
    """The job's shell command: ``python -m pipelines.cli <args>``, each argument quoted."""
    return " ".join(shlex.quote(a) for a in ["python", "-m", "pipelines.cli", *args])


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    token = ray_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # noqa: BLE001 - connection refused, bad address, auth, ...
        raise UserError(f"--address {address}: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    """One line for a failed request to the Ray dashboard; never includes the token."""
    text = str(e)
    if "401" in text or "Authentication required" in text:
        return ("the Ray cluster requires a token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                "(`ray get-auth-token` on the head node prints it)")
    if "403" in text or "Authentication failed" in text:
        return "the Ray cluster rejected the token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"Ray Jobs API not reachable ({first[:200]})"


async def _tail(client, job_id: str, write: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        write(chunk)


def submit(
    address: str,
    args: list[str],
    working_dir: Path = Path("."),
    env: dict[str, str] | None = None,
    write: Callable[[str], None] | None = None,
    poll_s: float = 1.0,
) -> tuple[str, str, int]:
    """Submit ``cl-audit <args>`` as a Ray job, stream its logs, wait for the end.

    Args:
        address: the Ray dashboard, e.g. ``http://127.0.0.1:8265``.
        args: the cl-audit command line, e.g. ``["run", "capitals", "--quick"]``.
        working_dir: the checkout uploaded as the job's ``working_dir``.
        env: environment variables of the job (driver and every task).
        write: where log text goes (default: stdout).

    Returns:
        ``(job_id, status, exit_code)``; ``exit_code`` is 0 for ``SUCCEEDED``, the
        driver's exit code for a failed job (1 when unknown), 130 for ``STOPPED``.

    Raises:
        UserError: no command, a bad working directory, an unreachable cluster or a
            refused token.
    """
    if not args:
        raise UserError("submit: no command given; e.g. cl-audit submit --address http://HOST:8265 -- run capitals")
    wd = check_working_dir(working_dir)
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    client = _client(address)
    runtime_env = {"working_dir": str(wd), "excludes": WORKING_DIR_EXCLUDES}
    if env:
        runtime_env["env_vars"] = dict(env)
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint(args), runtime_env=runtime_env, metadata={"cl_audit.command": " ".join(args)[:500]},
        )
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--address {address}: job not submitted: {_reason(e)}") from None
    write(f"submitted {job_id} to {address}: cl-audit {' '.join(args)}\n")
    try:
        try:
            asyncio.run(_tail(client, job_id, write))
        except Exception as e:  # noqa: BLE001 - log stream lost; the status still tells the end
            write(f"(log stream ended early: {type(e).__name__}; waiting for the job)\n")
        while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
            time.sleep(poll_s)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        write(f"\nstopped {job_id}\n")
        return job_id, "STOPPED", 130
    info = client.get_job_info(job_id)
    if status == "SUCCEEDED":
        code = 0
    elif status == "STOPPED":
        code = 130
    else:
        code = getattr(info, "driver_exit_code", None) or 1
    write(f"job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else "") + "\n")
    return job_id, status, code
