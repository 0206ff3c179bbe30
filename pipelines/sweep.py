"""The sweep: Ray Tune over ``perturb.kl_penalty`` x ``recover.size`` (x arm, x freeze).

The questions (DESIGN.md): how strong must the KL penalty of the perturbing fine-tune be
to keep the task alignment, and what does it cost in learning the new task? How many
recovery examples, in-task or irrelevant, bring the task back?

One Tune trial is one cell ``(kl_penalty, n[, arm, freeze_layers])``. The trainable
(:func:`sweep_trial`) calls the stage runner in its own process
(:func:`components.runner.train` without a Ray Train ``fit``, :func:`components.runner.probe`),
which keys every output by a hash of the stage config and its inputs
(``components.artifacts.Store``): the same keys as the audit's DAG. So across a grid of K penalties x S
sizes, tune runs once, perturb once per penalty, and recover + probe per cell;
concurrent trials that need the same output wait on the store's file lock for a single
producer. Each trial reports twice through ``ray.tune.report`` (Ray Train V2 rules):
after perturb (``training_iteration`` 1: task_drop, knowledge_retention, perturb_acc,
kl_to_aligned; an ASHA scheduler may stop the trial here) and after recover (2: every
metric, including recovery_ratio and knowledge_after_recovery).

The table of trials, their ranking ("best" never ranks cells by a recovery metric
alone), the smallest recovery set, the Pareto set and the heatmap are
:mod:`pipelines.sweep_analysis`; this module holds the search space, the trainable and
the driver.

Records: one MLflow parent run per sweep (created by the driver), one nested run per
trial created inside the trainable with the parent's id (``MLflowLoggerCallback`` does
not work with Train V2); the table, summary and heatmap as artifacts on the parent.

Outputs in the sweep folder: ``sweep.parquet`` (a row per trial with its status),
``sweep_summary.json``, ``recovery_heatmap.png``, ``config.yaml`` and Tune's experiment
under ``tune/sweep`` (absolute ``storage_path``), from which a killed sweep resumes with
``Tuner.restore`` without redoing its finished trials.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from components.artifacts import atomic_write
from components.config import AuditConfig, dump_yaml, stable_hash
from components.errors import UserError
from pipelines.state import SWEEP_STATE, claim_folder, remove_run
from pipelines.sweep_analysis import (METRIC_COLUMNS, _num, best_rule, best_trial, pareto_front, ranking,
                                      recovery_heatmap, smallest_n, sweep_table)

EXPERIMENT_NAME = "sweep"
HEATMAP = "recovery_heatmap.png"
# Progress lines of the driver go to these callables (set by run_sweep); the Tune
# callback that calls them is pickled into the experiment, so it holds no reference.
_SINK: list[Callable[[str], None]] = []
# The live progress of the driver (set by run_sweep, like _SINK): the on_progress
# callables, the name of the ProgressHub actor the trials report to, the number of
# trials, and the task state passed to on_progress (see pipelines.console.AuditProgress).
_BOARD: list[Callable[[dict], None]] = []
_LIVE: dict = {"hub": None, "total": 0, "state": {}, "polled": 0.0}


def sweep_digest(cfg: AuditConfig) -> str:
    """Identity of a sweep: the audit config and the search space, without the fields
    that only say how it runs (``max_concurrent``, ``max_failures``, ``cpus_per_trial``,
    ``ray``), so a resumed sweep may run with other resources."""
    space = cfg.sweep.model_dump(mode="json", exclude={"max_concurrent", "max_failures", "cpus_per_trial"})
    return stable_hash({"audit": cfg.model_dump(mode="json", exclude={"sweep", "ray"}), "space": space})


def sweep_sizes(cfg: AuditConfig) -> list[int]:
    """The recovery-set sizes the sweep tries: ``sweep.sizes`` or ``recover.sizes``."""
    return cfg.sweep.sizes or cfg.recover.sizes


def param_space(cfg: AuditConfig) -> dict:
    """The Tune search space of ``cfg.sweep``.

    Under ``grid`` every list is ``tune.grid_search``; under ``random`` every list is
    ``tune.choice``; ``{loguniform: [low, high]}`` is ``tune.loguniform``. An axis with
    a single value is a constant (still a column of the table).
    """
    from ray import tune

    sw = cfg.sweep

    def axis(values: list) -> Any:
        if len(values) == 1:
            return values[0]
        return tune.grid_search(values) if sw.search == "grid" else tune.choice(values)

    grid = sw.kl_grid
    return {
        "kl_penalty": axis(grid) if grid is not None else tune.loguniform(*sw.kl_penalty["loguniform"]),
        "n": axis(sweep_sizes(cfg)),
        "arm": axis(sw.arms),
        "freeze_layers": axis(sw.freeze_layers if sw.freeze_layers is not None else [cfg.perturb.freeze_layers]),
    }


def expected_trials(cfg: AuditConfig) -> int:
    """How many trials the sweep has when complete: the product of the grid axes times
    ``num_samples`` under ``grid``; ``num_samples`` under ``random``."""
    sw = cfg.sweep
    if sw.search == "random":
        return sw.num_samples
    axes = [sw.kl_grid or [None], sweep_sizes(cfg), sw.arms, sw.freeze_layers or [None]]
    return math.prod(len(a) for a in axes) * sw.num_samples


def cell_config(cfg: AuditConfig, cell: dict) -> AuditConfig:
    """The audit config of one trial: the sweep's config with the cell's penalty,
    frozen layers, recovery arm and size (the same store keys ``cl-audit run`` uses).

    Raises:
        UserError: the cell makes an invalid config.
    """
    tree = cfg.model_dump(mode="json")
    tree["perturb"]["kl_penalty"] = float(cell["kl_penalty"])
    tree["perturb"]["freeze_layers"] = int(cell["freeze_layers"])
    tree["recover"]["arms"] = [cell["arm"]]
    tree["recover"]["sizes"] = [int(cell["n"])]
    try:
        return AuditConfig.model_validate(tree)
    except Exception as e:  # noqa: BLE001 - report as one line
        raise UserError(f"sweep cell {cell}: {str(e).splitlines()[0]}") from None


def cell_name(cell: dict) -> str:
    """``trial/kl=0.1/in_task/n=4`` (``/freeze=k`` appended when layers are frozen)."""
    name = f"trial/kl={float(cell['kl_penalty']):.4g}/{cell['arm']}/n={int(cell['n'])}"
    return name + (f"/freeze={int(cell['freeze_layers'])}" if int(cell["freeze_layers"]) else "")


def sweep_trial(cell: dict, cfg: AuditConfig, prep: dict, home: str, out_dir: str, mlflow_ctx: dict,
                hub_name: str | None = None) -> None:
    """The Tune trainable: one cell of the sweep, its stages through the store.

    Args:
        cell: the trial's config from Tune (``kl_penalty``, ``n``, ``arm``,
            ``freeze_layers``).
        cfg: the sweep's resolved config.
        prep: :func:`components.runner.prepare`'s result (model, split data), computed
            once by the driver.
        home: run folder whose ``store/`` holds the stage outputs (absolute).
        out_dir: the sweep folder; with ``sweep.reuse`` false each trial computes
            every stage in a private store under ``out_dir/naive/<trial_id>``.
        mlflow_ctx: ``tracking_uri``, ``experiment`` and ``parent_run_id``.
        hub_name: the named :class:`pipelines.progress.ProgressHub` of the driver: each
            stage reports its start, counts and end as ``"trial <trial id> <kind> <name>"``
            (None, or no such actor: nothing is reported).

    Reports (``ray.tune.report``) twice: after perturb, then after recover (see the
    module docstring); the final report holds the cell, :data:`METRIC_COLUMNS`,
    ``drop_significant`` (bool: the lower bound of the task drop's CI is above 0, the
    verdict's ``task_drop_significant``), ``label`` (the cell's verdict),
    ``stages_computed`` and ``mlflow_run_id``.
    """
    from ray import tune

    from components.faults import failpoint
    from components.runner import probe as run_probe
    from components.runner import train as run_train
    from components.summary import assess
    from pipelines.progress import TaskProgress, find_hub
    from pipelines.journal import TRIAL_JOURNALS
    from pipelines.tracking import AuditTracker

    c = cell_config(cfg, cell)
    trial_id = tune.get_context().get_trial_id()
    reuse = c.sweep.reuse
    where = home if reuse else str(Path(out_dir) / "naive" / trial_id)
    data = prep["data"]
    arm, n = c.recover.arms[0], c.recover.sizes[0]
    rec_name = f"recovered/{arm}/{n}"
    boot = (c.verdict, c.probe.n_bootstrap, c.probe.ci_level, c.seed)
    computed: list[str] = []

    hub = find_hub(hub_name)

    def note(result: dict) -> dict:
        if not result["reused"]:
            computed.append(result["key"].split("-")[0])
        return result

    def train_stage(kind: str, cfg_: AuditConfig, where_: str, parent: dict, data_, arm_=None, n_=None,
                    reuse: bool = True) -> dict:
        name = {"tune": "aligned", "perturb": "perturbed"}.get(kind, f"recovered/{arm_}/{n_}")
        rep = TaskProgress(hub, f"trial {trial_id} train {name}", "steps")
        rep.status("running")
        result = run_train(kind, cfg_, where_, parent, data_, arm_, n_, reuse=reuse, on_step=rep.on_step)
        rep.status("reused" if result["reused"] else "done", *rep.last)
        return result

    def probe_stage(cfg_: AuditConfig, where_: str, stage: dict, data_, reuse: bool = True) -> dict:
        rep = TaskProgress(hub, f"trial {trial_id} probe {stage['checkpoint']['name']}", "items")
        rep.status("running")
        result = run_probe(cfg_, where_, stage, data_, on_progress=rep, reuse=reuse)
        rep.status("reused" if result["reused"] else "done", *rep.last)
        return result

    # The trial's nested run is made (or found, for a restarted trial) now, while the
    # server answers; what the trial logs at its end waits in its own journal if the
    # server is down then (the driver, or `cl-audit sync`, sends it).
    tracker = AuditTracker(mlflow_ctx["tracking_uri"], mlflow_ctx["experiment"],
                           journal=Path(out_dir) / TRIAL_JOURNALS / f"{trial_id}.jsonl",
                           experiment_id=mlflow_ctx.get("experiment_id"))
    tracker.attach(mlflow_ctx["parent_run_id"])
    rid = tracker.child_run(cell_name({"kl_penalty": c.perturb.kl_penalty, "n": n, "arm": arm,
                                       "freeze_layers": c.perturb.freeze_layers}),
                            "cl_audit.trial_id", trial_id, {})

    try:
        failpoint("sweep_" + cell_name({"kl_penalty": c.perturb.kl_penalty, "n": n, "arm": arm,
                                        "freeze_layers": c.perturb.freeze_layers}))
        base = {"checkpoint": prep["base"], "history": []}
        aligned = note(train_stage("tune", c, where, base, data, reuse=reuse))
        # The two shared probes are independent: odd trials take them in the other order,
        # so two trials starting together compute one each instead of one waiting.
        probes: dict[str, dict] = {}
        order = [("base", base), ("aligned", aligned)]
        odd = trial_id[-1:].isdigit() and int(trial_id[-1]) % 2 == 1
        for name, stage in order[::-1] if odd else order:
            probes[name] = note(probe_stage(c, where, stage, data, reuse=reuse))
        perturbed = note(train_stage("perturb", c, where, aligned, data, reuse=reuse))
        probes["perturbed"] = note(probe_stage(c, where, perturbed, data, reuse=reuse))

        cfg_cols = {"kl_penalty": c.perturb.kl_penalty, "n": n, "arm": arm, "freeze_layers": c.perturb.freeze_layers}
        a = assess(probes, ["base", "aligned", "perturbed"], *boot)
        st, v = a["stages"], a["verdict"]
        metrics = {
            **cfg_cols,
            "task_drop": _num(v["task_drop"]),
            "task_drop_ci_low": _num(v["task_drop_ci"][0]), "task_drop_ci_high": _num(v["task_drop_ci"][1]),
            "drop_significant": bool(v["task_drop_significant"]),
            "knowledge_retention": _num(v["knowledge_retention"]),
            "perturb_acc": st["perturbed"]["perturb_acc"],
            "kl_to_aligned": st["perturbed"]["kl_to_aligned"],
            "aligned_task_acc": st["aligned"]["task_acc"],
            "perturbed_task_acc": st["perturbed"]["task_acc"],
            "perturbed_knowledge_acc": st["perturbed"]["knowledge_acc"],
        }
        # Every report carries every metric (Tune checks the objective in each); the
        # recovery quantities are NaN until the recover stage has run.
        tune.report({**{k: float("nan") for k in METRIC_COLUMNS}, **metrics})

        recovered = note(train_stage("recover", c, where, perturbed, data, arm, n, reuse=reuse))
        probes[rec_name] = note(probe_stage(c, where, recovered, data, reuse=reuse))
        a = assess(probes, ["base", "aligned", "perturbed", rec_name], *boot)
        st, v = a["stages"], a["verdict"]
        key = f"{arm}/{n}"
        metrics.update({
            "recovery_ratio": _num(v["recovery_ratio"][key]),
            "recovery_ratio_ci_low": _num(v["recovery_ratio_ci"][key][0]),
            "recovery_ratio_ci_high": _num(v["recovery_ratio_ci"][key][1]),
            "knowledge_after_recovery": _num(v["knowledge_after_recovery"][key]),
            "recovered_task_acc": st[rec_name]["task_acc"],
            "recovered_task_acc_ci_low": _num(st[rec_name]["ci"]["task_acc"][0]),
            "recovered_task_acc_ci_high": _num(st[rec_name]["ci"]["task_acc"][1]),
            "recovered_knowledge_acc": st[rec_name]["knowledge_acc"],
            "recovered_kl_to_aligned": st[rec_name]["kl_to_aligned"],
            "label": v["label"],
            "stages_computed": ",".join(computed),
        })

        failpoint("sweep_log:" + trial_id)
        rid = tracker.stage(
            cell_name(cfg_cols),
            {**{f"recover.{k}": v for k, v in c.recover.model_dump(exclude={"arms", "sizes"}).items()},
             **cfg_cols, "trial_id": trial_id, "stage": "sweep_trial"},
            recovered.get("history", []),
            {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)},
            {"": Path(probes[rec_name]["dir"]) / "predictions.parquet"},
            tags={"cl_audit.trial_id": trial_id, "cl_audit.label": v["label"],
                  "cl_audit.drop_significant": str(metrics["drop_significant"]).lower(),
                  "cl_audit.perturb_key": perturbed["key"], "cl_audit.recover_key": recovered["key"],
                  "cl_audit.stages_computed": metrics["stages_computed"] or "none"},
            run_id=rid,
        )
        tune.report({**metrics, "mlflow_run_id": rid})
    except BaseException:
        # the nested run of a trial that raised is FAILED, not left RUNNING; a retry of
        # the trial finds it again and its end marks it FINISHED
        try:
            tracker._send("set_terminated", rid, status="FAILED")
        except Exception:  # noqa: BLE001 - the trial's own error is the one to report
            pass
        raise


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _say(msg: str) -> None:
    for fn in _SINK:
        fn(msg)


def _trial_entry(trial, trials) -> tuple[str, dict]:
    """The ``on_progress`` entry of a trial: ``trial <i>/<N> kl=../<arm>/n=..``."""
    key = f"trial {trial.trial_id}"
    st = _LIVE["state"].get(key)
    if st is None:
        i = next((k for k, t in enumerate(trials, 1) if t.trial_id == trial.trial_id), len(trials))
        n = max(_LIVE["total"], len(trials))
        st = _LIVE["state"][key] = {
            "kind": "trial", "name": f"{cell_name(trial.config)[len('trial/'):]}", "prefix": f"trial {i}/{n} ",
            "status": "waiting", "done": 0, "total": None, "unit": "", "seconds": None, "index": f"{i}/{n}"}
    return key, st


def _show(trials, force: bool = False) -> None:
    """Fold the hub's reports (stages of running trials) into the live state and pass
    it to :data:`_BOARD`; at most every 0.5 s unless ``force``."""
    import time

    import ray

    if not _BOARD:
        return
    now = time.monotonic()
    if not force and now - _LIVE["polled"] < 0.5:
        return
    _LIVE["polled"] = now
    state = _LIVE["state"]
    for t in trials:  # finished in an earlier, interrupted run of the sweep
        if t.status == "TERMINATED" and f"trial {t.trial_id}" not in state:
            _trial_entry(t, trials)[1]["status"] = "reused"
    hub = _LIVE["hub"]
    if hub is not None:
        try:
            snap = ray.get(hub.snapshot.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - a slow hub only delays the display
            snap = {}
        for key, rep in snap.items():
            if not key.startswith("trial "):
                continue
            _, tid, kind, name = key.split(" ", 3)
            trial = next((t for t in trials if t.trial_id == tid), None)
            if trial is None:
                continue
            prefix = _trial_entry(trial, trials)[1]["prefix"]
            st = state.setdefault(key, {"kind": kind, "name": name, "prefix": prefix, "status": "waiting",
                                        "done": 0, "total": None, "unit": rep["unit"], "seconds": None})
            if st["status"] in ("done", "reused", "error"):
                continue
            st.update(done=rep["done"], total=rep["total"], status=rep.get("status", "running"))
    for fn in _BOARD:
        fn(state)


class Progress(Callback):
    """Tune callback: one progress line per finished or failed trial, through
    :data:`_SINK`, and the live state of the trials and their stages (``trial i/N``,
    its current stage and count) through :data:`_BOARD` (it is pickled into the
    experiment, so it holds no printer)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        _trial_entry(trial, trials)[1]["status"] = "running"
        _show(trials, force=True)

    def on_step_end(self, iteration, trials, **info):
        _show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        _trial_entry(trial, trials)[1]["status"] = "done"
        _show(trials, force=True)
        r = trial.last_result or {}
        parts = [f"{k}={r[k]:.3f}" for k in ("task_drop", "perturb_acc", "recovered_task_acc", "recovery_ratio")
                 if isinstance(r.get(k), float)]
        if r.get("drop_significant") is False:
            parts.append("(task drop not significant)")
        _say(f"trial {trial.trial_id} finished: {cell_name(trial.config)} " + " ".join(parts))

    def on_trial_error(self, iteration, trials, trial, **info):
        _trial_entry(trial, trials)[1]["status"] = "error"
        _show(trials, force=True)
        _say(f"trial {trial.trial_id} failed: {cell_name(trial.config)}")


def check_sweep(cfg: AuditConfig, data=None) -> None:
    """Check the sweep's sizes against the recovery pools (``data.n_recover_pool``, or
    the split pools of ``data`` when given).

    Raises:
        UserError: a size larger than the pool of an arm.
    """
    if data is None:
        if {"in_task", "in_context"} & set(cfg.sweep.arms) and max(sweep_sizes(cfg)) > cfg.data.n_recover_pool:
            raise UserError(
                f"sweep.sizes: {max(sweep_sizes(cfg))} is larger than the in-task recovery pool "
                f"data.n_recover_pool={cfg.data.n_recover_pool}"
            )
        return
    pools = {"in_task": len(data.recover), "in_context": len(data.recover), "irrelevant": len(data.irrelevant)}
    for arm in cfg.sweep.arms:
        if max(sweep_sizes(cfg)) > pools[arm]:
            raise UserError(
                f"sweep.sizes: {max(sweep_sizes(cfg))} is larger than the {arm} recovery pool ({pools[arm]} items)"
            )


def run_sweep(
    cfg: AuditConfig,
    out_dir: Path,
    home: Path | None = None,
    tracking_uri: str | None = None,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    on_progress: Callable[[dict[str, dict]], None] | None = None,
) -> dict:
    """Run (or resume) the sweep of ``cfg.sweep`` and write its outputs into ``out_dir``.

    ``progress(message)`` receives one line per finished trial; ``on_progress(state)``
    (see :class:`pipelines.console.AuditProgress`) the preparation steps, then every
    trial (kind ``trial``, ``trial i/N`` in its ``prefix``) and the stage it runs with
    its count. Ray Tune prints nothing of its own (no banner, table or TensorBoard hint).

    A folder that holds an interrupted sweep of the same config (``sweep_digest``) is
    resumed with ``Tuner.restore``: finished trials are kept, unfinished and failed
    ones run again (their stages mostly come from the store). A folder holding a sweep
    or an audit of another config is refused before anything is written, unless
    ``force`` (its files are then replaced; :func:`pipelines.state.claim_folder`).

    Returns:
        The ``sweep_summary.json`` content; ``"interrupted": true`` when the run was
        stopped (SIGINT) before every trial finished (the table then holds the trials so
        far; running again resumes).

    Raises:
        UserError: bad input (unwritable folder, a folder holding another sweep,
            unreachable tracking store, sizes beyond a recovery pool, ...).
    """
    import ray
    from ray import tune
    from ray.exceptions import RayTaskError

    from components.models import check_model_id
    from pipelines.audit import check_writable, default_home, provenance_tags, versions
    from pipelines.dag import init_ray, new_task_state, prepare_task, wait_prepare, worker_allocator_env
    from pipelines.mlflow_env import absolute_env
    from pipelines.journal import JOURNAL, Journal, journal_files
    from pipelines.tracking import (AuditTracker, applicable_params, check_given_stages, redact_uri,
                                    resolve_tracking_uri, run_name, source_tags)

    # Every trial runs in its own working folder: the paths it is given (home, out_dir,
    # the tracking URI, the config's files) and the environment it inherits
    # (MLFLOW_TRACKING_URI, CL_AUDIT_HOME) are absolute, so they mean the same place there.
    absolute_env()
    home = Path(home or default_home()).resolve()
    out_dir = Path(out_dir).resolve()
    digest = sweep_digest(cfg)
    state_path = out_dir / SWEEP_STATE
    try:
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{state_path}: not valid JSON; remove the folder or choose another --out") from None
    replaced = claim_folder(out_dir, "sweep", digest, force)  # first: a refused folder is left as it was
    check_writable(out_dir)
    uri = resolve_tracking_uri(tracking_uri, home)
    check_model_id(cfg.model, home / "cache")
    check_given_stages(cfg, home, uri)
    check_sweep(cfg)
    say = progress or (lambda msg: None)
    worker_allocator_env()  # a bad CL_AUDIT_MALLOC stops here, before any MLflow run
    if replaced:  # --force: the other config's run goes once this one's input is known to be good
        remove_run(out_dir, replaced)
        state = {}
    tracker = AuditTracker(uri, cfg.experiment, journal=out_dir / JOURNAL)

    init_ray()
    prep_t = ray.remote(num_cpus=cfg.ray.probe_cpus, max_retries=cfg.ray.max_retries)(prepare_task)
    hub, hub_name = None, None
    live: dict[str, dict] = {"prepare base": new_task_state("prepare", "base")}
    if on_progress is not None:
        from pipelines.progress import ProgressHub

        hub_name = f"cl-audit-progress-{os.getpid()}-{digest[:8]}"
        hub = ProgressHub.options(name=hub_name).remote()
    try:
        prep = wait_prepare(prep_t.remote(cfg, str(home), hub), hub, live, on_progress)
    except BaseException as e:
        if hub is not None:
            ray.kill(hub)
        if isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), UserError):
            raise UserError(str(e.cause)) from None
        raise
    check_sweep(cfg, prep["data"])
    notes = prep["data"].notes
    say(f"model ready; {notes['n_known']} of {notes['n_items']} facts known to the base model")

    exp_dir = out_dir / "tune" / EXPERIMENT_NAME
    resuming = tune.Tuner.can_restore(str(exp_dir))
    prev = state.get("mlflow", {})
    if resuming and prev.get("run_id") and prev.get("tracking_uri") == redact_uri(uri):
        tracker.attach(prev["run_id"], status="RUNNING")
    else:
        tracker.start(
            tracker.unique_name(run_name("sweep", cfg)),
            applicable_params(cfg, "sweep"),
            {**source_tags("sweep"), "cl_audit.kind": "sweep", "cl_audit.suite": cfg.suite, "cl_audit.sweep_digest": digest,
             "cl_audit.config_digest": cfg.digest(), **provenance_tags(), "cl_audit.seed": str(cfg.seed),
             "model_digest": prep["model_digest"], "data_digest": prep["data_digest"],
             **{f"version.{k}": v for k, v in versions().items()}},
        )
    mlflow_ctx = {"tracking_uri": uri, "experiment": cfg.experiment, "parent_run_id": tracker.parent_id,
                  "experiment_id": tracker.experiment_id}
    atomic_write(state_path, json.dumps({"sweep_digest": digest, "mlflow": {
        "tracking_uri": redact_uri(uri), "experiment_id": tracker.experiment_id, "run_id": tracker.parent_id}},
        indent=1))
    atomic_write(out_dir / "config.yaml", dump_yaml(cfg))

    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, cfg=cfg, prep=prep, home=str(home), out_dir=str(out_dir),
                             mlflow_ctx=mlflow_ctx, hub_name=hub_name),
        {"cpu": cfg.sweep.cpus_per_trial},
    )
    sw = cfg.sweep
    _SINK[:] = [say]
    _BOARD[:] = [on_progress] if on_progress is not None else []
    _LIVE.update(hub=hub, total=expected_trials(cfg), state=live, polled=0.0)
    # Tune's own console output: with its "new output engine" (the default) even
    # verbose=0 prints a banner table, the experiment path and a TensorBoard hint; the
    # classic output prints nothing at verbose=0. Read by Tune in this process only.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        if resuming:
            done = int((sweep_table(exp_dir).status == "TERMINATED").sum())
            say(f"resuming the sweep in {exp_dir} ({done} trials already finished)")
            tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, restart_errored=True)
        else:
            scheduler = None
            if sw.search == "random":
                from ray.tune.schedulers import ASHAScheduler

                scheduler = ASHAScheduler(time_attr="training_iteration", max_t=2, grace_period=1,
                                          reduction_factor=2)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(cfg),
                tune_config=tune.TuneConfig(
                    metric=sw.metric, mode=sw.mode, num_samples=sw.num_samples, scheduler=scheduler,
                    max_concurrent_trials=sw.max_concurrent, reuse_actors=True,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT_NAME, storage_path=str(out_dir / "tune"), verbose=0,
                    failure_config=tune.FailureConfig(max_failures=sw.max_failures),
                    callbacks=[Progress()],
                ),
            )
        tuner.fit()
    except BaseException:
        tracker.client.set_terminated(tracker.parent_id, status="FAILED")
        raise
    finally:
        _SINK.clear()
        _BOARD.clear()
        _LIVE.update(hub=None, state={})
        if hub is not None:
            ray.kill(hub)

    table = sweep_table(exp_dir)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write(out_dir / "sweep.parquet", buf.getvalue())
    finished = table[table.status == "TERMINATED"]
    counts = {s: int(c) for s, c in table.status.value_counts().items()}
    total = expected_trials(cfg)
    # Tune creates trials lazily (max_concurrent), so a stopped sweep may also lack rows
    interrupted = (any(s not in ("TERMINATED", "ERROR") for s in counts)
                   or counts.get("TERMINATED", 0) + counts.get("ERROR", 0) < total)
    target = sw.recovery_target if sw.recovery_target is not None else cfg.verdict.recovery_target
    computed: dict[str, int] = {}
    for s in finished.stages_computed.dropna():
        for kind in filter(None, s.split(",")):
            computed[kind] = computed.get(kind, 0) + 1
    summary = {
        "suite": cfg.suite,
        "model": cfg.model.id,
        "sweep_digest": digest,
        "config_digest": cfg.digest(),
        "search": sw.search,
        "objective": {"metric": sw.metric, "mode": sw.mode},
        "space": sw.model_dump(mode="json", include={"kl_penalty", "sizes", "arms", "freeze_layers", "num_samples"})
        | {"sizes": sweep_sizes(cfg)},
        "interrupted": interrupted,
        "trials": {"total": total, "finished": len(finished), "by_status": counts,
                   "stopped_early": int(finished.stopped_early.sum())},
        "best": best_trial(table, sw.metric, sw.mode),
        "best_rule": best_rule(sw.metric, sw.mode, cfg.probe.ci_level, bool(finished.drop_significant.any())),
        "ranking": ranking(table, sw.metric, sw.mode),
        "recovery_target": target,
        "smallest_n": smallest_n(finished, target),
        "pareto_perturb_acc_vs_task_drop": pareto_front(finished),
        "stages_computed": computed,
        "reuse": sw.reuse,
        "outputs": {"table": "sweep.parquet", "heatmap": HEATMAP, "tune_experiment": str(exp_dir)},
        "mlflow": {"tracking_uri": redact_uri(uri), "experiment_id": tracker.experiment_id,
                   "run_id": tracker.parent_id},
    }
    if len(finished):
        atomic_write(out_dir / HEATMAP, recovery_heatmap(
            finished, f"{cfg.suite} / {cfg.model.id}: recovery ratio (target {target})"))
    atomic_write(out_dir / "sweep_summary.json", json.dumps(summary, indent=2))
    arts = [out_dir / "sweep.parquet", out_dir / "sweep_summary.json", out_dir / "config.yaml"]
    if (out_dir / HEATMAP).exists():
        arts.append(out_dir / HEATMAP)
    metrics = {"trials_finished": float(len(finished))}
    if summary["best"] and summary["best"]["value"] is not None:
        metrics[f"best_{sw.metric}"] = summary["best"]["value"]
    if interrupted:
        for p in arts:
            tracker.client.log_artifact(tracker.parent_id, str(p))
        tracker.client.set_terminated(tracker.parent_id, status="KILLED")
    else:
        # what the trials could not send comes first (their runs), then the sweep's end
        trial_journals = [Journal(p) for p in journal_files(out_dir)[:-1]]
        for j in trial_journals:
            if not _replay(j, tracker):
                break
        tracker.finish(metrics, arts, {"cl_audit.trials_finished": str(len(finished))})
        tracker.flush()
        left = sum(j.pending() for j in trial_journals) + (tracker.journal.pending() if tracker.journal else 0)
        if left:
            say(f"MLflow tracking server at {redact_uri(uri)} not answering: {left} records kept in {out_dir}; "
                f"`cl-audit sync {out_dir}` sends them")
    return summary


def _replay(journal, tracker) -> bool:
    """Send a trial's journal through the sweep's tracker; False if the server does not
    answer (the records stay; what the sweep logs next waits in its own journal)."""
    if not journal.pending():
        return True
    try:
        return journal.replay(tracker.client)
    except Exception as e:  # noqa: BLE001 - sorted by unreachable()
        from pipelines.journal import unreachable

        if not unreachable(e):
            raise
        return False

