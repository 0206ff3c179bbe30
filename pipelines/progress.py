"""Live progress of the stage tasks: training steps and scored items, reported from Ray.

Stage tasks run in Ray workers, so their progress cannot reach the driver's terminal
directly. A :class:`ProgressHub` actor (no CPUs) holds the latest count of each task;
a task reports to it through a :class:`TaskProgress` (fire-and-forget calls, at most a
few per second); the driver polls :meth:`ProgressHub.snapshot` while it waits for
results. A lost report only delays the bar: the driver marks a task finished itself
when its result arrives, so progress never affects the audit's results.
"""

from __future__ import annotations

import time

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressHub:
    """Latest ``(done, total, unit, status)`` of each stage task or step, keyed
    ``"<kind> <name>"`` (a stage task), ``"step <name>"`` (a preparation step) or
    ``"trial <trial id> <kind> <name>"`` (a stage of a sweep trial)."""

    def __init__(self) -> None:
        self.state: dict[str, dict] = {}

    def report(self, key: str, done: int, total: int | None, unit: str, status: str = "running") -> None:
        self.state[key] = {"done": done, "total": total, "unit": unit, "status": status}

    def snapshot(self) -> dict[str, dict]:
        return dict(self.state)


class TaskProgress:
    """What a stage task calls to report progress; a no-op without a hub.

    Args:
        hub: the :class:`ProgressHub` actor handle, or ``None``.
        key: ``"<kind> <stage name>"``, e.g. ``"train aligned"``.
        unit: ``steps`` (optimiser steps) or ``items`` (scored evaluation items).
        min_interval: seconds between two reports (the last one is always sent).
    """

    def __init__(self, hub, key: str, unit: str, min_interval: float = 0.3):
        self.hub, self.key, self.unit, self.min_interval = hub, key, unit, min_interval
        self._last = 0.0
        self.last: tuple[int, int | None] = (0, None)

    def __call__(self, done: int, total: int | None, force: bool = False) -> None:
        self.last = (int(done), total)
        if self.hub is None:
            return
        now = time.monotonic()
        if not force and total is not None and done < total and now - self._last < self.min_interval:
            return
        self._last = now
        try:
            self.hub.report.remote(self.key, int(done), None if total is None else int(total), self.unit)
        except Exception:  # noqa: BLE001 - progress must never fail a stage
            pass

    def finish(self, done: int, total: int | None) -> None:
        """The final count, delivered before the task returns (a blocking call), so the
        driver sees it with the task's result."""
        if self.hub is None:
            return
        try:
            ray.get(self.hub.report.remote(self.key, int(done), None if total is None else int(total), self.unit),
                    timeout=10)
        except Exception:  # noqa: BLE001 - progress must never fail a stage
            pass

    def status(self, status: str, done: int = 0, total: int | None = None) -> None:
        """A change of status (``running`` at the start; ``done`` or ``reused`` at the
        end), always sent (fire-and-forget; the hub keeps one caller's reports in order)."""
        self.last = (int(done), total)
        if self.hub is None:
            return
        try:
            self.hub.report.remote(self.key, int(done), None if total is None else int(total), self.unit, status)
        except Exception:  # noqa: BLE001, S110 - progress must never fail a stage
            pass

    def on_step(self, rec: dict) -> None:
        """``on_step`` hook of :func:`components.training.train`: one report per optimiser step."""
        self(rec["step"] + 1, rec.get("total_steps"))


class StepProgress:
    """The preparation steps' reports: ``step(name, status, done, total, unit)``, the
    ``on_step`` of :func:`components.runner.prepare`, sent to ``hub`` as
    ``"step <name>"`` (counts at most a few per second, every change of status at once).
    A no-op without a hub."""

    def __init__(self, hub, min_interval: float = 0.3):
        self.hub, self.min_interval = hub, min_interval
        self.tasks: dict[str, TaskProgress] = {}

    def __call__(self, name: str, status: str, done: int = 0, total: int | None = None, unit: str = "items") -> None:
        tp = self.tasks.setdefault(name, TaskProgress(self.hub, f"step {name}", unit, self.min_interval))
        tp.unit = unit
        if status == "running" and done:
            tp(done, total)
        else:
            tp.status(status, done, total)

    def flush(self) -> None:
        """Wait until the hub holds every report sent so far (before the task returns)."""
        if self.hub is None:
            return
        try:
            ray.get(self.hub.snapshot.remote(), timeout=10)
        except Exception:  # noqa: BLE001, S110 - progress must never fail a stage
            pass


def find_hub(name: str | None):
    """The named :class:`ProgressHub` of a sweep (``ray.get_actor``), or ``None`` when
    there is none (no name, or the driver that made it is gone)."""
    if not name:
        return None
    try:
        return ray.get_actor(name)
    except Exception:  # noqa: BLE001 - progress must never fail a trial
        return None
