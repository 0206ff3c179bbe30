"""MLflow records of an audit: a parent run, a nested run per checkpoint.

Everything is logged through ``MlflowClient`` with explicit run ids (no global active
run), from the driver, after the stage's results are already stored locally.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from components.artifacts import flatten, safe_params
from components.errors import UserError


def resolve_tracking_uri(cli_uri: str | None, home: Path) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<home>/mlflow.db`` (absolute)."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(home).resolve() / 'mlflow.db')}"


class AuditTracker:
    """One audit's MLflow records.

    Args:
        tracking_uri: any MLflow tracking URI (``sqlite:///...``, ``http://...``).
        experiment: experiment name (created when missing; for a sqlite store its
            artifacts live in ``mlartifacts/`` beside the database).

    Raises:
        UserError: the tracking store cannot be reached.
    """

    def __init__(self, tracking_uri: str, experiment: str):
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # no schema-migration chatter on the console
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                loc = None
                if tracking_uri.startswith("sqlite:///"):
                    db = Path(tracking_uri.removeprefix("sqlite:///"))
                    loc = (db.parent / "mlartifacts").resolve().as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=loc)
            else:
                self.experiment_id = exp.experiment_id
        except Exception as e:  # noqa: BLE001 - any failure here means "store unreachable"
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(f"--tracking-uri {tracking_uri}: MLflow tracking store not reachable ({msg})") from None
        self.parent_id: str | None = None
        self.children: dict[str, str] = {}

    def start(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Create the parent run with the flattened config as params."""
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.parent_id = run.info.run_id
        self._params(self.parent_id, params)
        return self.parent_id

    def attach(self, run_id: str, status: str | None = None) -> None:
        """Continue an existing parent run (a resumed sweep, or a sweep trial that logs
        its nested run under the sweep's parent); ``status`` (e.g. ``RUNNING``) is set
        on it when given."""
        self.parent_id = run_id
        if status:
            self.client.update_run(run_id, status=status)

    def find_child(self, tag: str, value: str) -> str | None:
        """The id of a nested run of the parent whose tag ``tag`` equals ``value``, if any."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`{tag}` = '{value}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = safe_params(flatten(params))
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for s in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[s:s + 100])

    def stage(
        self,
        name: str,
        params: dict[str, Any],
        history: list[dict],
        metrics: dict[str, float],
        artifacts: dict[str, Path],
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
    ) -> str:
        """A nested run for one checkpoint (or one sweep trial): stage params, per-step
        training curves (``train/loss``, ``train/ce``, ``train/kl`` by step), probe
        metrics, artifacts (``{artifact_path: local file or dir}``).

        ``run_id`` logs into that existing nested run instead of creating one (a trial
        that is restarted after an interruption keeps a single run).
        """
        from mlflow.entities import Metric

        if run_id is None:
            run = self.client.create_run(
                self.experiment_id, run_name=name,
                tags={"mlflow.parentRunId": self.parent_id, "cl_audit.stage": name, **(tags or {})},
            )
            rid = run.info.run_id
        else:
            rid = run_id
            self.client.update_run(rid, status="RUNNING")
        self.children[name] = rid
        self._params(rid, params)
        now = int(time.time() * 1000)
        ms = []
        for rec in history:
            for k in ("loss", "ce", "kl"):
                ms.append(Metric(f"train/{k}", float(rec[k]), now, int(rec["step"])))
        ms += [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
        for s in range(0, len(ms), 500):
            self.client.log_batch(rid, metrics=ms[s:s + 500])
        for apath, local in artifacts.items():
            local = Path(local)
            if local.is_dir():
                self.client.log_artifacts(rid, str(local), apath)
            elif local.exists():
                self.client.log_artifact(rid, str(local), apath or None)
        self.client.set_terminated(rid)
        return rid

    def finish(self, metrics: dict[str, float], artifacts: list[Path], tags: dict[str, str]) -> None:
        """Verdict metrics, output files and final tags on the parent run; mark it finished."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.parent_id, metrics=ms, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for p in artifacts:
            p = Path(p)
            if p.is_dir():
                self.client.log_artifacts(self.parent_id, str(p), p.name)
            elif p.exists():
                self.client.log_artifact(self.parent_id, str(p))
        self.client.set_terminated(self.parent_id)
