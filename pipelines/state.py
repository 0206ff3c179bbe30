"""The audit's state in its run folder (``.cl-audit-state.json``): which MLflow runs a
resumed audit continues, and the tracking URI ``cl-audit sync`` sends a journal to."""

from __future__ import annotations

import json
from pathlib import Path

from components.artifacts import atomic_write

STATE = ".cl-audit-state.json"


def read_state(run_dir: Path) -> dict | None:
    """The run folder's ``.cl-audit-state.json`` (None if absent or unreadable)."""
    try:
        return json.loads((Path(run_dir) / STATE).read_text())
    except (OSError, ValueError):
        return None


def write_state(run_dir: Path, state: dict) -> None:
    atomic_write(Path(run_dir) / STATE, json.dumps(state, indent=1))
