"""MLflow records of an audit: a parent run, a nested run per checkpoint, their lineage.

Everything is logged through ``MlflowClient`` with explicit run ids (no global active
run), from the driver, after the stage's results are already stored locally.

Lineage (what an auditor needs months later): every data set a run used is an MLflow
dataset input (name, digest, source, context ``training`` / ``evaluation``); tags give
the git commit, package versions, seed, machine and the model's source and digest; each
checkpoint's run names the run whose checkpoint it started from (``cl_audit.upstream.*``)
and the runs whose outputs its metrics use (``cl_audit.kl_reference.run_ids``).

Writes the tracking server could not take wait in the run folder's journal
(:mod:`pipelines.journal`); the run folder's state file is :mod:`pipelines.state`.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.data.dataset_source import DatasetSource

from components.artifacts import flatten, safe_params
from components.errors import UserError
from pipelines.journal import Journal, unreachable
from pipelines.mlflow_env import (absolute_uri, ensure_sqlite_store, quiet_mlflow, redact_uri, sqlite_path, store_client,
                                  store_lock)
# re-exported: pipelines.audit takes the run folder's file names and state from here
from pipelines.journal import JOURNAL as JOURNAL
from pipelines.state import read_state as read_state, write_state as write_state

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODELS_DIR = ".mlflow-models"  # in a run folder: logged models that wait for the tracking server


def resolve_tracking_uri(cli_uri: str | None, home: Path) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<home>/mlflow.db``.

    A relative local path in the URI (``sqlite:///rel.db``, ``file:mlruns``, ``./mlruns``)
    is made absolute against the current folder (:func:`absolute_uri`): the store it
    names is the same in every process and working folder (a Tune trial runs in its own).
    """
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return absolute_uri(uri)
    return f"sqlite:///{(Path(home).resolve() / 'mlflow.db')}"


def run_name(kind: str, cfg, when: float | None = None) -> str:
    """A readable parent-run name: ``audit-capitals-smollm2-135m-instruct-1a2b3c4d-s0-1201-0153``
    (kind, suite, the model's short name, the config digest's first 8 hex digits, the
    seed, the start as month-day-hour-minute-second in UTC); :meth:`AuditTracker.unique_name`
    adds a counter when another run of the experiment has it."""
    model = Path(str(cfg.model.id)).name
    model = model.removesuffix(".gguf").removesuffix(".GGUF")
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-")[:40] or "model"
    stamp = time.strftime("%m%d-%H%M%S", time.gmtime(time.time() if when is None else when))
    return f"{kind}-{cfg.suite}-{model}-{cfg.digest()[:8]}-s{cfg.seed}-{stamp}"


def applicable_params(cfg, kind: str) -> dict[str, Any]:
    """The resolved config as a parent run's params, without the fields that do not
    apply: ``model.tiny_*`` unless the model is ``tiny-llama``, ``biography.*`` unless
    the suite is ``biography``, ``sweep.*`` unless ``kind`` is ``sweep``, ``data.files``
    unless the suite is ``custom``.

    Args:
        cfg: an :class:`components.config.AuditConfig`.
        kind: ``audit`` or ``sweep``.
    """
    from components.models import TINY_ID

    tree = cfg.model_dump(mode="json")
    if cfg.model.id != TINY_ID:
        tree["model"] = {k: v for k, v in tree["model"].items() if not k.startswith("tiny_")}
    if cfg.suite != "biography":
        tree.pop("biography", None)
    if kind != "sweep":
        tree.pop("sweep", None)
    if cfg.suite != "custom":
        tree["data"].pop("files", None)
    return tree


def source_tags(command: str) -> dict[str, str]:
    """MLflow's standard source tags for a run started by ``cl-audit <command>``:
    ``mlflow.source.name`` (``cl-audit run``), ``mlflow.source.type`` (``LOCAL``) and
    ``mlflow.user`` (the login name of the process; ``unknown`` when there is none),
    and ``mlflow.source.git.commit`` when the commit is known."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    from components.artifacts import git_commit

    commit = git_commit()
    return {"mlflow.source.name": f"cl-audit {command}", "mlflow.source.type": "LOCAL", "mlflow.user": user,
            **({"mlflow.source.git.commit": commit} if commit != "unknown" else {})}


class AuditTracker:
    """One audit's MLflow records.

    Args:
        tracking_uri: any MLflow tracking URI (``sqlite:///...``, ``http://...``); a
            relative local path in it is made absolute (:func:`absolute_uri`).
        experiment: experiment name (created when missing; for a sqlite store its
            artifacts live in ``mlartifacts/`` beside the database).
        journal: the file of the offline journal (:mod:`pipelines.journal`); None: writes
            go straight to the store.
        experiment_id: the experiment's id when the caller knows it (a sweep trial): the
            tracker is then made without a call to the store.

    Processes that open one sqlite store at the same moment take turns (a file lock
    ``<db>.lock`` beside it) to create or migrate it and to create the experiment.

    Raises:
        UserError: the tracking store cannot be reached (one line).
    """

    def __init__(self, tracking_uri: str, experiment: str, journal: Path | None = None,
                 experiment_id: str | None = None):
        from mlflow.tracking import MlflowClient

        quiet_mlflow()
        if tracking_uri.startswith(("http://", "https://")):
            # a few quick retries, not MLflow's minutes-long default: an unreachable
            # server sends the records to the journal instead of stalling the audit
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        tracking_uri = absolute_uri(tracking_uri)
        self.uri = tracking_uri
        self.journal = Journal(journal) if journal is not None else None
        try:
            # One process at a time creates (migrates) a sqlite store and its experiment:
            # processes started together on a fresh store would break its schema for good.
            with store_lock(tracking_uri):
                ensure_sqlite_store(tracking_uri)  # whole or not at all, even if this process is killed
                self.client = MlflowClient(tracking_uri=tracking_uri)
                # known (a sweep trial): nothing is asked of the store here
                self.experiment_id = experiment_id or self._experiment(experiment)
        except Exception as e:  # noqa: BLE001 - any failure here means "store unreachable"
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(f"--tracking-uri {redact_uri(tracking_uri)}: MLflow tracking store not reachable ({msg})"
                            ) from None
        self.parent_id: str | None = None
        self.children: dict[str, str] = {}
        self._done: set[str] = set()
        self._start: dict[str, int] = {}  # run id -> start time (ms): the timestamp of its metrics
        self.models: dict[str, str] = {}  # checkpoint name -> the id of its MLflow logged model

    def _experiment(self, name: str) -> str:
        """The id of experiment ``name``, created when missing (for a sqlite store with
        its artifacts in ``mlartifacts/`` beside the database). Another process (on a
        server) that creates it first wins; its experiment is used."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        loc = None
        db = sqlite_path(self.uri)
        if db is not None:
            loc = (db.parent / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=loc)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    # -- writes: straight to the store, or to the journal while the store is unreachable --

    def _send(self, method: str, *args, **kwargs) -> None:
        """Call ``MlflowClient.<method>(*args, **kwargs)``; with a journal, a call that
        fails because the tracking server is unreachable is kept in the journal (in
        order, after anything already waiting there) and sent later by :meth:`flush`.

        Raises:
            MlflowException: the store refused the record (not a connection failure),
                or it is unreachable and there is no journal.
        """
        if self.journal is None:
            getattr(self.client, method)(*args, **kwargs)
            return
        if self.journal.pending() and not self.flush(quiet=True):
            self.journal.append(method, args, kwargs)
            return
        try:
            getattr(self.client, method)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - sorted by unreachable()
            if not unreachable(e):
                raise
            self.journal.append(method, args, kwargs)
            self.journal.failed()

    def flush(self, quiet: bool = False) -> bool:
        """Send the journal's records in order; True when none is left.

        With ``quiet``, nothing is tried within :attr:`Journal.retry_s` of the last
        failure (so an unreachable server costs one timeout per interval, not per record).
        """
        if self.journal is None or not self.journal.pending():
            return True
        if quiet and not self.journal.due():
            return False
        return self.journal.replay(self.client)

    def _stamp(self, run_id: str) -> int:
        """The timestamp (ms) of every metric logged to ``run_id``: the run's start time.

        Fixed per run, so a record sent twice (a replayed journal, a resumed audit) is
        the same record, which MLflow keeps once, instead of a second point at a new time."""
        if run_id not in self._start:
            try:
                self._start[run_id] = int(self.client.get_run(run_id).info.start_time)
            except Exception:  # noqa: BLE001 - unreachable: the journal keeps this time
                self._start[run_id] = int(time.time() * 1000)
        return self._start[run_id]

    def start(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Create the parent run with the flattened config as params."""
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.parent_id = run.info.run_id
        self._start[self.parent_id] = int(run.info.start_time)
        self._params(self.parent_id, params)
        return self.parent_id

    def unique_name(self, name: str) -> str:
        """``name``, or ``name-2``, ``name-3`` ... when a run of the experiment already
        has it (two audits started within the same second)."""
        taken = {r.info.run_name for r in self.client.search_runs(
            [self.experiment_id], f"attributes.run_name LIKE '{_quote(name)}%'", max_results=200)}
        k, out = 1, name
        while out in taken:
            k += 1
            out = f"{name}-{k}"
        return out

    def attach(self, run_id: str, status: str | None = None) -> None:
        """Continue an existing parent run (a resumed sweep, or a sweep trial that logs
        its nested run under the sweep's parent); ``status`` (e.g. ``RUNNING``) is set
        on it when given."""
        self.parent_id = run_id
        if status:
            self._send("update_run", run_id, status=status)

    def child_run(self, name: str, tag: str, value: str, tags: dict[str, str]) -> str:
        """The nested run of the parent whose tag ``tag`` is ``value`` (a restarted sweep
        trial keeps its run), created RUNNING with ``tags`` when there is none; its start
        time is the timestamp of its metrics.

        Raises:
            MlflowException: the store is unreachable (a run id cannot wait in the journal).
        """
        rid = self.find_child(tag, value)
        if rid is None:
            run = self.client.create_run(
                self.experiment_id, run_name=name,
                tags={"mlflow.parentRunId": self.parent_id, "cl_audit.stage": name, tag: value, **tags})
            rid = run.info.run_id
            self._start[rid] = int(run.info.start_time)
        else:
            self._stamp(rid)
            self._send("update_run", rid, status="RUNNING")  # a retried trial's run, FAILED by its last try
        return rid

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
            self._send("log_batch", run_id, params=items[s:s + 100])

    def stage(
        self,
        name: str,
        params: dict[str, Any],
        history: list[dict],
        metrics: dict[str, float],
        artifacts: dict[str, Path],
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        model: dict | None = None,
    ) -> str:
        """A nested run for one checkpoint (or one sweep trial): stage params, per-step
        training curves (``train/loss``, ``train/ce``, ``train/kl`` by step), probe
        metrics, artifacts (``{artifact_path: local file or dir}``).

        ``model`` (``{"checkpoint": Checkpoint dict, "settings": {...}}``, see
        :meth:`log_model`): the checkpoint is also logged as an MLflow logged model of
        this run, and the run's metrics are linked to it (``model_id``).

        ``run_id`` logs into that existing nested run instead of creating one (a trial
        that is restarted after an interruption keeps a single run); a run created up
        front by :meth:`plan` is used likewise.
        """
        from mlflow.entities import Metric, RunTag

        if run_id is not None:
            rid = run_id
            self._send("update_run", rid, status="RUNNING")
            if tags:
                self._send("log_batch", rid, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        elif name in self.children:  # created by plan()
            rid = self.children[name]
            if tags:
                self._send("log_batch", rid, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=name,
                tags={"mlflow.parentRunId": self.parent_id, "cl_audit.stage": name, **(tags or {})},
            )
            rid = run.info.run_id
            self._start[rid] = int(run.info.start_time)
        self.children[name] = rid
        self._params(rid, params)
        mid = self.log_model(rid, name, **model) if model is not None else None
        now = self._stamp(rid)
        ms = []
        for rec in history:
            for k in ("loss", "ce", "kl"):
                ms.append(Metric(f"train/{k}", float(rec[k]), now, int(rec["step"]), model_id=mid))
        ms += [Metric(k, float(v), now, 0, model_id=mid) for k, v in metrics.items() if v is not None]
        for s in range(0, len(ms), 500):
            self._send("log_batch", rid, metrics=ms[s:s + 500])
        for apath, local in artifacts.items():
            local = Path(local)
            if local.is_dir():
                self._send("log_artifacts", rid, str(local), apath)
            elif local.exists():
                self._send("log_artifact", rid, str(local), apath or None)
        self._send("set_terminated", rid)
        self._done.add(name)
        return rid

    def log_model(self, run_id: str, name: str, checkpoint: dict, settings: dict,
                  tags: dict[str, str] | None = None) -> str | None:
        """Log checkpoint ``name`` as an MLflow logged model (``python_function`` flavor,
        :mod:`pipelines.checkpoint_model`) produced by the nested run ``run_id``: the
        model's artifacts (``MLmodel``, the adapters in safetensors, ...) go to the
        logged model, the run lists it among its outputs, and its artifact path
        ``model`` is a copy, so ``runs:/<run>/model`` loads as well.

        A run that already has one (a resumed audit) keeps it. While the tracking server
        does not answer, the model folder waits in ``<run folder>/.mlflow-models/`` and
        the journal logs it when the server is back (its metrics then stay unlinked).

        Args:
            checkpoint: the stage's :class:`components.models.Checkpoint` as a dict.
            settings: ``model_id``, ``model_digest``, ``batch_size``, ``max_new_tokens``,
                ``precision`` (see :func:`pipelines.checkpoint_model.save_checkpoint_model`).

        Returns:
            The logged model's id (``m-...``), or None when it waits in the journal.

        Raises:
            MlflowException: the store refused a record.
        """
        import shutil
        import tempfile

        from mlflow.models import Model

        from pipelines.checkpoint_model import LOG_MODEL, save_checkpoint_model, upload_model

        with tempfile.TemporaryDirectory(prefix="cl-audit-model-") as tmp:
            local = Path(tmp) / "model"
            save_checkpoint_model(local, Model(run_id=run_id), checkpoint, settings, Path(tmp) / "work")
            args = (run_id, name, str(local), {k: str(v) for k, v in settings.items()}, dict(tags or {}))
            if self.journal is None or not self.journal.pending() or self.flush(quiet=True):
                try:
                    mid = upload_model(self.client, *args)
                except Exception as e:  # noqa: BLE001 - sorted by unreachable()
                    if not unreachable(e) or self.journal is None:
                        raise
                    self.journal.failed()
                else:
                    self.models[name] = mid
                    return mid
            # the server does not answer: the model folder waits beside the journal
            keep = self.journal.path.parent / MODELS_DIR / _model_name(name)
            part = keep.with_name(keep.name + ".part")
            shutil.rmtree(part, ignore_errors=True)
            shutil.copytree(local, part)
            shutil.rmtree(keep, ignore_errors=True)
            part.rename(keep)
            self.journal.append(LOG_MODEL, (*args[:2], str(keep), *args[3:]), {})
            return None

    def _logged_model_of(self, run_id: str) -> str | None:
        """The id of the READY logged model that nested run ``run_id`` produced, if any."""
        found = self.client.search_logged_models(
            [self.experiment_id], f"tags.`cl_audit.stage_run_id` = '{run_id}'", max_results=10)
        ready = [m for m in found if str(m.status).endswith("READY")]
        return ready[0].model_id if ready else None

    def plan(self, names: list[str], upstream: dict[str, str], tags: dict[str, str]) -> None:
        """Create the nested run of every checkpoint up front (status RUNNING), so each
        run can name the run of the checkpoint it starts from before either finishes.

        Args:
            names: checkpoint names in DAG order.
            upstream: checkpoint name -> the checkpoint it was trained from.
            tags: tags for every nested run (git commit, versions, seed, ...).
        """
        from mlflow.entities import RunTag

        for name in names:
            if name not in self.children:
                run = self.client.create_run(
                    self.experiment_id, run_name=name,
                    tags={"mlflow.parentRunId": self.parent_id, "cl_audit.stage": name, **tags},
                )
                self.children[name] = run.info.run_id
                self._start[run.info.run_id] = int(run.info.start_time)
        for name, up in upstream.items():
            if name in self.children and up in self.children:
                self._send("log_batch", self.children[name], tags=[
                    RunTag("cl_audit.upstream.stage", up), RunTag("cl_audit.upstream.run_id", self.children[up]),
                ])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set tags on a run (also after it finished)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for s in range(0, len(items), 100):
            self._send("log_batch", run_id, tags=items[s:s + 100])

    def log_datasets(self, run_id: str, datasets: list["DatasetRecord"]) -> None:
        """Log data sets as MLflow dataset inputs of a run (``mlflow.data.from_pandas``).

        Each input carries the context (``training`` / ``evaluation``) and the full
        sha256 as input tags; the dataset digest is the sha256's first 32 hex digits
        (MLflow stores at most 36 characters).
        """
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for d in datasets:
            ds = mlflow.data.from_pandas(
                d.frame, source=RunArtifactSource(d.uri, d.origin), name=d.name, digest=d.sha256[:32]
            )
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[
                InputTag("mlflow.data.context", d.context), InputTag("sha256", d.sha256),
                InputTag("n_items", str(len(d.frame))),
            ]))
        if inputs:
            self._send("log_inputs", run_id, datasets=inputs)

    def fail(self) -> None:
        """Mark the parent and every unfinished nested run FAILED (the DAG raised)."""
        for name, rid in self.children.items():
            if name not in self._done:
                self._send("set_terminated", rid, status="FAILED")
        if self.parent_id is not None:
            self._send("set_terminated", self.parent_id, status="FAILED")

    def extra_metrics(self, name: str, scalars: dict[str, float], per_layer: dict[str, dict],
                      ci: dict[str, Any] | None = None) -> None:
        """Metrics of a checkpoint known only after the DAG, at step 0: scalars, and
        per-layer values (``{metric: {layer: value}}``) under :func:`layer_key` names
        (``probe_acc/layer_07``); ``ci`` (``{metric: [low, high]}``, per layer
        ``{metric: {layer: [low, high]}}``) adds ``<name>_ci_low`` / ``<name>_ci_high``
        beside each. Linked to the checkpoint's logged model when it has one."""
        from mlflow.entities import Metric

        ci = ci or {}
        rid = self.children[name]
        mid = self.models.get(name)
        if mid is None and name != "base":  # logged before an interruption
            try:
                mid = self._logged_model_of(rid)
            except Exception:  # noqa: BLE001 - unreachable: the metrics go unlinked to the journal
                mid = None
        now = self._stamp(rid)
        vals = {k: v for k, v in scalars.items() if v is not None}
        vals.update(ci_metrics({k: ci[k] for k in scalars if k in ci}))
        for k, by_layer in per_layer.items():
            for lay, v in by_layer.items():
                if v is None:
                    continue
                vals[layer_key(k, lay)] = v
                bounds = (ci.get(k) or {}).get(str(lay)) if isinstance(ci.get(k), dict) else None
                if bounds is not None:
                    vals.update(ci_metrics({layer_key(k, lay): bounds}))
        ms = [Metric(k, float(v), now, 0, model_id=mid) for k, v in vals.items() if v is not None]
        for s in range(0, len(ms), 500):
            self._send("log_batch", rid, metrics=ms[s:s + 500])

    def finish(self, metrics: dict[str, float], artifacts: list[Path], tags: dict[str, str]) -> None:
        """Verdict metrics, output files and final tags on the parent run; mark it finished.

        ``artifacts``: files and folders, each logged at the artifact root under its name."""
        from mlflow.entities import Metric, RunTag

        now = self._stamp(self.parent_id)
        ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
        self._send("log_batch", self.parent_id, metrics=ms, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for p in artifacts:
            p = Path(p)
            if p.is_dir():
                self._send("log_artifacts", self.parent_id, str(p), p.name)
            elif p.exists():
                self._send("log_artifact", self.parent_id, str(p))
        self._send("set_terminated", self.parent_id)

    def register(self, name: str, stages: list[str], tags: dict[str, str], adapters: dict[str, list[str]],
                 stage_tags: dict[str, dict[str, str]] | None = None, aliases: dict[str, str] | None = None) -> list:
        """Register checkpoints as versions of the MLflow registered model ``name``, and
        name their roles with aliases.

        Each version's source is the checkpoint's logged model (``models:/<model id>``,
        :meth:`log_model`; without one, its logged update ``runs:/<stage run>/adapter``
        or ``/weights``); it is tagged ``cl_audit.stage``, ``cl_audit.audit_run_id``,
        ``cl_audit.stage_run_id`` plus ``tags`` (verdict, knowledge retention and its
        CI, model source and digest) and ``stage_tags[stage]``, and
        ``cl_audit.adapters``: the JSON list of the adapter sources to merge, in order,
        onto the base model to rebuild the checkpoint.

        Registering the same audit again adds no version: a checkpoint whose stage run
        already has a version of ``name`` keeps it (its tags and the aliases are set
        again).

        Args:
            stages: checkpoint names, e.g. ``["aligned", "perturbed", "recovered/in_task/10"]``.
            adapters: checkpoint name -> its adapter sources in merge order.
            aliases: alias -> checkpoint name (``aligned``, ``perturbed``,
                ``recovered-in_task-10``, ``best-recovery``); an alias moves to this
                audit's version.

        Returns:
            The ``ModelVersion`` objects, in the order of ``stages``.

        Raises:
            UserError: an invalid registered-model name.
        """
        from mlflow.exceptions import MlflowException

        check_model_name(name)
        try:
            self.client.create_registered_model(
                name, description="Checkpoints of cl-audit audits (aligned, perturbed, recovered); "
                                  "aliases name the roles of the latest audit registered")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        out = []
        for stage in stages:
            rid = self.children[stage]
            vtags = {"cl_audit.stage": stage, "cl_audit.audit_run_id": self.parent_id, "cl_audit.stage_run_id": rid,
                     "cl_audit.adapters": json.dumps(adapters.get(stage, [])), **tags,
                     **(stage_tags or {}).get(stage, {})}
            have = [v for v in self.client.search_model_versions(f"name = '{_quote(name)}' and run_id = '{rid}'")
                    if v.tags.get("cl_audit.stage") == stage]
            if have:
                mv = min(have, key=lambda v: int(v.version))
                for k, v in vtags.items():
                    self.client.set_model_version_tag(name, mv.version, k, str(v))
            else:
                mid = self.models.get(stage) or self._logged_model_of(rid)
                if mid is not None:
                    source = f"models:/{mid}"
                else:
                    top = {f.path for f in self.client.list_artifacts(rid)}
                    source = f"runs:/{rid}/{'adapter' if 'adapter' in top else 'weights'}"
                mv = self.client.create_model_version(
                    name, source, run_id=rid, model_id=mid, tags={k: str(v) for k, v in vtags.items()},
                    description=f"{stage} checkpoint of audit run {self.parent_id}",
                )
            out.append(mv)
        by_stage = {s: mv for s, mv in zip(stages, out)}
        for alias, stage in (aliases or {}).items():
            if stage in by_stage:
                self.client.set_registered_model_alias(name, alias, by_stage[stage].version)
        return out


def layer_key(metric: str, layer: int | str) -> str:
    """The MLflow metric name of a per-layer value: ``probe_acc/layer_07`` (two digits,
    so names sort by layer; layer 0 is the embeddings' output)."""
    return f"{metric}/layer_{int(layer):02d}"


def ci_metrics(ci: dict[str, Any]) -> dict[str, float]:
    """``{metric: [low, high]}`` -> ``{<metric>_ci_low: low, <metric>_ci_high: high}``
    (an interval with a missing bound is left out)."""
    out = {}
    for k, bounds in ci.items():
        if isinstance(bounds, (list, tuple)) and len(bounds) == 2 and None not in bounds:
            out[f"{k}_ci_low"], out[f"{k}_ci_high"] = float(bounds[0]), float(bounds[1])
    return out


def _model_name(stage: str) -> str:
    """A logged model's name for checkpoint ``stage``: ``recovered/in_task/10`` ->
    ``recovered-in_task-10`` (MLflow names may not hold ``/``)."""
    return stage.replace("/", "-")


@dataclass
class DatasetRecord:
    """One data set a run used, as logged by :meth:`AuditTracker.log_datasets`.

    Attributes:
        name: e.g. ``align``, ``eval``, ``recover.in_task.10``.
        frame: its items, one row each (id, question, answer, candidates, ...).
        sha256: hex digest of the items (:func:`components.data.items_sha256`).
        uri: where the items are stored, ``runs:/<audit run>/data/<name>.parquet``.
        origin: where the items came from (suite and its source, split seed).
        context: ``training`` or ``evaluation``.
    """

    name: str
    frame: Any
    sha256: str
    uri: str
    origin: str
    context: str


class RunArtifactSource(DatasetSource):
    """MLflow dataset source: a data file logged as an artifact of an MLflow run.

    ``to_dict()`` -> ``{"uri": "runs:/<run_id>/<path>", "origin": "..."}``; ``load()``
    downloads the file and returns its local path.
    """

    def __init__(self, uri: str, origin: str = ""):
        self.uri = uri
        self.origin = origin

    @staticmethod
    def _get_source_type() -> str:
        return "cl_audit_run_artifact"

    def load(self, dst_path=None) -> str:
        from mlflow.artifacts import download_artifacts

        return download_artifacts(artifact_uri=self.uri, dst_path=dst_path)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> "RunArtifactSource":
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "origin": self.origin}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> "RunArtifactSource":
        return cls(source_dict["uri"], source_dict.get("origin", ""))


def check_model_name(name: str) -> None:
    """Raise UserError unless ``name`` is a valid MLflow registered-model name
    (not empty, no ``/`` or ``:``)."""
    if not name or not name.strip() or "/" in name or ":" in name:
        raise UserError(f"--register {name!r}: expected a registered-model name without '/' or ':'")


def open_store(uri: str):
    """An ``MlflowClient`` on an existing tracking store, for reading.

    A sqlite store must already exist (it is never created here); an ``http://`` server
    gets a few quick retries instead of MLflow's minutes-long default. A relative local
    path in ``uri`` is made absolute (:func:`absolute_uri`).

    Raises:
        UserError: no such store, or it cannot be reached.
    """
    quiet_mlflow()
    uri = absolute_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise UserError(f"tracking store {uri}: not found (no audits recorded there yet?)")
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        client = store_client(uri)  # an old sqlite schema is migrated here, one process at a time
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means "store unreachable"
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"tracking store {redact_uri(uri)}: not reachable ({msg})") from None
    return client


def get_audit_run(client, run_id: str):
    """The parent run of an audit by id.

    Raises:
        UserError: no such run, or it is not an audit's parent run.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"run {run_id}: no such MLflow run in {client.tracking_uri}") from None
    if run.data.tags.get("cl_audit.kind") != "audit":
        parent = run.data.tags.get("mlflow.parentRunId")
        hint = f"; its audit is run {parent}" if parent else ""
        raise UserError(f"run {run_id}: not the parent run of a cl-audit audit{hint}")
    return run


def find_audits(client, suite: str | None = None, model: str | None = None, limit: int = 50,
                kind: str = "audit") -> list:
    """Finished audits (parent runs tagged ``cl_audit.kind=audit``; ``kind="sweep"``:
    finished sweeps) in every experiment, newest first, optionally only one suite
    and/or model id."""
    from mlflow.entities import ViewType

    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not exps:
        return []
    flt = [f"tags.cl_audit.kind = '{_quote(kind)}'", "attributes.status = 'FINISHED'"]
    if suite:
        flt.append(f"tags.cl_audit.suite = '{_quote(suite)}'")
    if model:
        flt.append(f"params.`model.id` = '{_quote(model)}'")
    return client.search_runs(exps, " and ".join(flt), order_by=["attributes.start_time DESC"], max_results=limit)


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def download(client, run_id: str, artifact_path: str, dst: Path) -> Path | None:
    """Download one artifact (file or folder) of a run into ``dst``; None if absent."""
    from mlflow.exceptions import MlflowException

    try:
        return Path(client.download_artifacts(run_id, artifact_path, str(dst)))
    except (MlflowException, OSError):
        return None


def fetch_given(cfg, cache_dir: Path, uri: str) -> None:
    """Download every MLflow model URI given as a stage (``--aligned`` / ``--perturbed``
    ``runs:/<id>/<path>``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``) from
    the audit's tracking store (``uri``, also the registry) into
    :func:`components.given.mlflow_dir`, replacing an earlier download (an alias may have
    moved). Written to a temporary folder and renamed, so a stage task never reads half a
    download.

    Raises:
        UserError: one line naming the flag and the URI: no such run, artifact, model,
            version or alias, or the store cannot be reached.
    """
    import shutil
    import uuid

    from mlflow.artifacts import download_artifacts

    from components.given import FLAGS, mlflow_dir, ref_kind

    quiet_mlflow()
    for stage, ref in cfg.stages.given().items():
        if ref_kind(ref) != "mlflow":
            continue
        dest = mlflow_dir(cache_dir, ref)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            download_artifacts(artifact_uri=_registry_source(ref, uri), dst_path=str(tmp), tracking_uri=uri)
        except Exception as e:  # noqa: BLE001 - MlflowException, OSError, a bad URI: all "cannot get it"
            shutil.rmtree(tmp, ignore_errors=True)
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(f"{FLAGS[stage]} {ref}: cannot download it from the tracking store "
                            f"{redact_uri(uri)} ({msg})") from None
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)


def check_given_stages(cfg, home: Path, uri: str) -> None:
    """Before any work of an audit or a sweep: download the stages given as MLflow model
    URIs (:func:`fetch_given`) and check every given checkpoint against the base model
    (:func:`components.runner.check_given`); nothing when no stage is given.

    Raises:
        UserError: one line naming the flag, the checkpoint and what does not fit.
    """
    if not cfg.stages.given():
        return
    from components.runner import check_given

    fetch_given(cfg, Path(home) / "cache", uri)
    check_given(cfg, home)


def _registry_source(ref: str, uri: str) -> str:
    """``ref`` with a ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` prefix
    replaced by that version's artifact location, read from the registry of ``uri``
    (mlflow's own ``models:/`` resolution reads the process's default registry, not the
    one passed to it); ``runs:/`` URIs are returned as they are.

    Raises:
        MlflowException: no such model, version or alias.
    """
    if not ref.startswith("models:/"):
        return ref
    from mlflow import MlflowClient

    name_ver, _, sub = ref[len("models:/"):].partition("/") if "@" in ref.split("/")[1] else (None, None, None)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if name_ver is not None:  # models:/<name>@<alias>[/path]
        name, alias = name_ver.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:  # models:/<name>/<version>[/path]
        parts = ref[len("models:/"):].split("/", 2)
        if len(parts) < 2 or not parts[1]:
            raise UserError(f"{ref}: expected models:/<name>/<version> or models:/<name>@<alias>")
        name, version, sub = parts[0], parts[1], parts[2] if len(parts) > 2 else ""
    base = client.get_model_version_download_uri(name, str(version)).rstrip("/")
    return f"{base}/{sub}" if sub else base
