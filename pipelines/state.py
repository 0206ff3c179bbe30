"""The audit's state in its run folder (``.cl-audit-state.json``): which MLflow runs a
resumed audit continues, and the tracking URI ``cl-audit sync`` sends a journal to.

A run folder belongs to the run that made it (:func:`claim_folder`): an audit or sweep of
another config is refused before anything is written, unless the user forces it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from components.artifacts import atomic_write
from components.errors import UserError

STATE = ".cl-audit-state.json"
SWEEP_STATE = "sweep_state.json"

# Where a folder records the run it holds: (file, digest field, kind of run), most
# telling first. A finished audit has summary.json, an interrupted one only its state.
HOLDERS = (("summary.json", "config_digest", "audit"), (STATE, "config_digest", "audit"),
           ("sweep_summary.json", "sweep_digest", "sweep"), (SWEEP_STATE, "sweep_digest", "sweep"))
# What a run writes into its folder (DESIGN.md, "Contract"), removed by --force; other
# files (a user's own, the MLflow journal of records not yet sent) are left alone.
RUN_FILES = {
    "audit": ("summary.json", "metrics.parquet", "predictions", "config.yaml", "data_manifest.json", "data",
              "plots", "report.html", "manifest.json", STATE),
    "sweep": ("sweep_summary.json", "sweep.parquet", "recovery_heatmap.png", "config.yaml", "tune", "plots",
              "report.html", SWEEP_STATE),
}


def read_state(run_dir: Path) -> dict | None:
    """The run folder's ``.cl-audit-state.json`` (None if absent or unreadable)."""
    try:
        return json.loads((Path(run_dir) / STATE).read_text())
    except (OSError, ValueError):
        return None


def write_state(run_dir: Path, state: dict) -> None:
    atomic_write(Path(run_dir) / STATE, json.dumps(state, indent=1))


def held_run(run_dir: Path) -> tuple[str, str, str] | None:
    """The run a folder holds, finished or interrupted: ``(kind, digest, file)`` with kind
    ``audit`` (digest: the config digest) or ``sweep`` (the sweep digest) and the file
    that says so; None for a folder that holds no run (absent, empty, unreadable records)."""
    for name, field, kind in HOLDERS:
        try:
            digest = json.loads((Path(run_dir) / name).read_text()).get(field)
        except (OSError, ValueError, AttributeError):
            continue
        if digest:
            return kind, str(digest), name
    return None


def claim_folder(run_dir: Path, kind: str, digest: str, force: bool = False) -> str | None:
    """Make sure ``run_dir`` (``--out``) may hold this run: absent, empty or holding a
    run of the same kind and digest (which resumes or is redone as before). Reads only;
    call it before anything is written.

    Args:
        kind: ``audit`` or ``sweep``.
        digest: this run's config digest (audit) or sweep digest (sweep).
        force: allow a folder holding a run of another config.

    Returns:
        The kind of the other config's run that ``force`` lets this run replace: pass it
        to :func:`remove_run` once this run's own checks passed. None otherwise.

    Raises:
        UserError: the folder holds a run of another config or kind and ``force`` is
            False; one line naming both digests and the file that records the old one.
    """
    held = held_run(run_dir)
    if held is None or held[:2] == (kind, digest):
        return None
    old_kind, old_digest, name = held
    if not force:
        what = "an audit" if old_kind == "audit" else "a sweep"
        raise UserError(f"--out {run_dir}: holds {what} of another config (digest {old_digest} in {name}, "
                        f"this {'run' if kind == 'audit' else 'sweep'} {digest}); choose another --out, "
                        "or add --force to replace it")
    return old_kind


def remove_run(run_dir: Path, kind: str) -> None:
    """Remove the files a run of ``kind`` (``audit``, ``sweep``) wrote into ``run_dir``
    (:data:`RUN_FILES`); the folder's other files are kept."""
    for name in RUN_FILES[kind]:
        p = Path(run_dir) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
