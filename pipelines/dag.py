"""The audit DAG on Ray: prepare -> tune -> perturb -> recover[arm][n], a probe per checkpoint.

Each stage is one Ray task with declared CPUs around the stage runner
(:mod:`components.runner`, which decides the store key and reuse); a training stage
trains inside a Ray Train ``TorchTrainer`` (``pipelines.train_ray``: in-process by
default, or data-parallel workers and GPUs from the stage's ``scaling`` section). Tasks
receive their inputs as object references, so probes and recovery arms run in parallel
where resources allow. ``ray.init()`` starts a local Ray unless ``RAY_ADDRESS`` points
at a cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import ray

from components import runner
from components.runner import TASK_ENV
from components.config import AuditConfig
from components.data import SuiteData
from pipelines.train_ray import TEST_FAULT_ENV



MALLOC_ENV = "CL_AUDIT_MALLOC"
MALLOC_CHOICES = ("mimalloc", "system")


def worker_allocator_env() -> dict[str, str]:
    """Environment that makes the local Ray's stage workers allocate with mimalloc.

    PyTorch on CPU frees and re-allocates every step's activations; glibc's malloc keeps
    much of that memory in per-thread arenas, so a LoRA step on SmolLM2-135M peaks
    ~0.6 GiB above its live tensors. mimalloc (the ``cmeel-mimalloc`` wheel, preloaded
    with ``LD_PRELOAD`` into every worker the local Ray starts: stage tasks, Ray Train
    and Tune actors) keeps the peak within ~0.1 GiB of them at about the same speed;
    README "Performance" has the figures. Allocation does not change any
    arithmetic: the audit's numbers are the same with either allocator.

    ``CL_AUDIT_MALLOC=system`` keeps the system allocator. Only Linux and only a Ray that
    this process starts (with ``RAY_ADDRESS`` set the cluster's workers are left as its
    image made them). A ``LD_PRELOAD`` the user set is kept as it is (the workers
    inherit it), and so is glibc when the library's path holds a space or a colon, which
    ``LD_PRELOAD`` cannot carry.

    Returns:
        ``{"LD_PRELOAD": path}``, or ``{}`` (system allocator, not Linux, a cluster, the
        user's own ``LD_PRELOAD``, or the wheel not installed).

    Raises:
        UserError: ``CL_AUDIT_MALLOC`` is neither ``mimalloc`` nor ``system``.
    """
    import sys
    from importlib.metadata import PackageNotFoundError, distribution

    from components.errors import UserError

    choice = os.environ.get(MALLOC_ENV, "mimalloc").strip().lower() or "mimalloc"
    if choice not in MALLOC_CHOICES:
        raise UserError(f"{MALLOC_ENV}={os.environ[MALLOC_ENV]!r}: expected one of {', '.join(MALLOC_CHOICES)}")
    if (choice == "system" or not sys.platform.startswith("linux") or os.environ.get("RAY_ADDRESS")
            or os.environ.get("LD_PRELOAD")):
        return {}
    try:
        lib = Path(str(distribution("cmeel-mimalloc").locate_file("cmeel.prefix/lib/libmimalloc.so")))
    except PackageNotFoundError:
        return {}
    ok = lib.is_file() and not any(c in str(lib) for c in " :")  # ld.so splits LD_PRELOAD there
    return {"LD_PRELOAD": str(lib)} if ok else {}


def _task_threads() -> int:
    """Inside a Ray task: as many torch threads as the task's CPUs."""
    try:
        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001 - the driver, not a Ray task
        return os.cpu_count() or 1


def prepare_task(cfg: AuditConfig, home: Path, hub=None) -> dict:
    """The Ray task of :func:`components.runner.prepare` (its steps reported to ``hub``
    as ``"step <name>"``, :class:`pipelines.progress.StepProgress`)."""
    from pipelines.progress import StepProgress

    steps = StepProgress(hub)
    result = runner.prepare(cfg, home, on_step=steps)
    steps.flush()
    return result


def train_task(kind: str, cfg: AuditConfig, home: Path, parent: dict, data: SuiteData,
               arm: str | None = None, n: int | None = None, hub=None) -> dict:
    """The Ray task of :func:`components.runner.train`: the stage trains on Ray Train
    (:func:`pipelines.train_ray.fit_stage`: in this worker with ``scaling.num_workers``
    0, else on data-parallel workers and GPUs); Ray Train keeps the run's latest
    checkpoint in ``<home>/ray_train/<key>`` until the stage is stored, so a restarted
    task resumes it. ``hub``: a :class:`pipelines.progress.ProgressHub` receiving the
    optimiser steps (``"train <checkpoint name>"``)."""
    from pipelines.progress import TaskProgress
    from pipelines.train_ray import fit_stage

    name = {"tune": "aligned", "perturb": "perturbed"}.get(kind, f"recovered/{arm}/{n}")
    tracker = TaskProgress(hub, f"train {name}", "steps")

    def fit(spec, tmp, key, on_step):
        return fit_stage(spec, tmp, Path(home) / "ray_train", key, progress=tracker)

    result = runner.train(kind, cfg, home, parent, data, arm, n, fit=fit, on_step=tracker.on_step,
                          threads=_task_threads())
    if not result["reused"]:
        steps = len(result["history"])
        tracker.finish(steps, steps)
    return result


def probe_task(cfg: AuditConfig, home: Path, stage: dict, data: SuiteData, hub=None) -> dict:
    """The Ray task of :func:`components.runner.probe` (scored items reported to ``hub``)."""
    from pipelines.progress import TaskProgress

    report = TaskProgress(hub, f"probe {stage['checkpoint']['name']}", "items")
    result = runner.probe(cfg, home, stage, data, on_progress=report, threads=_task_threads())
    if not result["reused"]:
        report.finish(*report.last)
    return result


def drift_task(cfg: AuditConfig, home: Path, names: list[str], *stages: dict) -> dict:
    """The Ray task of :func:`components.runner.drift`."""
    return runner.drift(cfg, home, names, *stages, threads=_task_threads())


def stage_task_resources(cfg: AuditConfig, kind: str) -> dict:
    """Ray task options of a training stage: with Ray Train workers the task only drives
    them (no CPU of its own); in-process it takes ``ray.train_cpus`` (and a GPU with
    ``scaling.use_gpu``)."""
    sc = getattr(cfg, kind).scaling
    if sc.num_workers > 0:
        return {"num_cpus": 0, "num_gpus": 0}
    return {"num_cpus": cfg.ray.train_cpus, "num_gpus": sc.gpus_per_worker if sc.use_gpu else 0}


def check_scaling(cfg: AuditConfig) -> None:
    """Fail fast when a training stage asks for more workers, CPUs or GPUs than the
    local Ray has (a cluster named by ``RAY_ADDRESS`` may autoscale; it is not checked).

    Raises:
        UserError: naming the stage's ``scaling`` section.
    """
    from pipelines.train_ray import check_fits

    if os.environ.get("RAY_ADDRESS"):
        return
    total = ray.cluster_resources()
    for kind in ("tune", "perturb", "recover"):
        check_fits(kind, getattr(cfg, kind).scaling, total)


def init_ray() -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray on this machine (no
    dashboard; stage workers on mimalloc, :func:`worker_allocator_env`).

    Raises:
        UserError: a bad ``CL_AUDIT_MALLOC``.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address or None,
        include_dashboard=False if not address else None,
        logging_level="ERROR",
        log_to_driver=bool(os.environ.get("CL_AUDIT_WORKER_LOGS")),
        runtime_env={"env_vars": {**TASK_ENV, **worker_allocator_env()}},
        configure_logging=True,
    )


def dag_tasks(cfg: AuditConfig) -> list[tuple[str, str]]:
    """Every stage task the audit DAG of ``cfg`` runs, ``(kind, name)`` in the order they
    are submitted: ``prepare``, then per checkpoint its training stage (none for ``base``)
    and its probe, then ``drift``. Their number is the total of the stage counter."""
    names = ["base", "aligned", "perturbed", *[f"recovered/{a}/{n}" for a in cfg.recover.arms
                                                for n in cfg.recover.sizes]]
    out = [("prepare", "base")]
    for name in names:
        if name != "base":
            out.append(("train", name))
        out.append(("probe", name))
    return [*out, ("drift", "drift")]


def new_task_state(kind: str, name: str) -> dict:
    """The ``on_progress`` entry of a task or step before it starts."""
    return {"kind": kind, "name": name, "status": "waiting", "done": 0, "total": None,
            "unit": "steps" if kind == "train" else "items", "seconds": None}


def wait_prepare(prep_ref, hub, state: dict[str, dict], on_progress: Callable[[dict[str, dict]], None] | None,
                 poll_s: float = 0.5) -> dict:
    """Wait for the prepare task ``prep_ref``, passing its steps (``"step <name>"``
    entries, added to ``state`` as they start) to ``on_progress`` every ``poll_s``
    seconds; ``state["prepare base"]`` is marked done with the result.

    Returns:
        The prepare task's result. Raises what the task raised.
    """
    if hub is None or on_progress is None:
        prep = ray.get(prep_ref)
    else:
        state["prepare base"]["status"] = "running"
        on_progress(state)
        while True:
            done, _ = ray.wait([prep_ref], timeout=poll_s)
            _merge_progress(state, hub, add="step ")
            if done:
                prep = ray.get(prep_ref)
                break
            on_progress(state)
        for key, st in state.items():  # a step whose last report was lost still ends
            if key.startswith("step ") and st["status"] == "running":
                st["status"] = "done"
    st = state["prepare base"]
    st["status"] = "done"
    if on_progress is not None:
        on_progress(state)
    return prep


def run_dag(
    cfg: AuditConfig, home: Path, on_event: Callable[[str, str, dict], None] | None = None,
    on_progress: Callable[[dict[str, dict]], None] | None = None, poll_s: float = 0.5,
) -> dict:
    """Run the audit DAG on Ray and return every stage's result.

    ``on_event(kind, name, result)`` is called in the driver as each stage finishes
    (``kind`` is ``prepare``, ``train``, ``probe`` or ``drift``), so it can log to
    MLflow and show progress while the rest still runs.

    ``on_progress(state)``, when given, is called about every ``poll_s`` seconds with
    ``{"<kind> <name>": {"kind", "name", "status", "done", "total", "unit"}}`` for every
    task (``status``: ``waiting``, ``running``, ``done`` or ``reused``; ``done``/``total``
    in optimiser steps for ``train``, scored items for ``probe``). The tasks report to a
    :class:`pipelines.progress.ProgressHub` actor; without ``on_progress`` none is made.

    Returns:
        ``{"prepare": ..., "train": {name: result}, "probe": {name: result},
        "drift": {"drift": result}}``.
    """
    init_ray()
    check_scaling(cfg)
    home = str(Path(home).resolve())
    pcpu = cfg.ray.probe_cpus
    retries = cfg.ray.max_retries
    prep_t = ray.remote(num_cpus=pcpu, max_retries=retries)(prepare_task)
    train_r = ray.remote(max_retries=retries)(train_task)
    fault = os.environ.get(TEST_FAULT_ENV)  # test only: forwarded to the stage tasks
    extra = {"runtime_env": {"env_vars": {TEST_FAULT_ENV: fault}}} if fault else {}
    train_t = {k: train_r.options(**stage_task_resources(cfg, k), **extra) for k in ("tune", "perturb", "recover")}
    probe_t = ray.remote(num_cpus=pcpu, max_retries=retries)(probe_task)
    drift_t = ray.remote(num_cpus=pcpu, max_retries=retries)(drift_task)

    hub = None
    if on_progress is not None:
        from pipelines.progress import ProgressHub

        hub = ProgressHub.remote()
    state = {f"{kind} {name}": new_task_state(kind, name) for kind, name in dag_tasks(cfg)}
    try:
        prep = wait_prepare(prep_t.remote(cfg, home, hub), hub, state, on_progress, poll_s)
    except BaseException:
        if hub is not None:
            ray.kill(hub)
        raise
    if on_event:
        on_event("prepare", "base", prep)
    data_ref = ray.put(prep["data"])
    base_stage = {"checkpoint": prep["base"], "history": []}

    pending: dict = {}
    aligned = train_t["tune"].remote("tune", cfg, home, base_stage, data_ref, hub=hub)
    pending[aligned] = ("train", "aligned")
    pending[probe_t.remote(cfg, home, base_stage, data_ref, hub=hub)] = ("probe", "base")
    pending[probe_t.remote(cfg, home, aligned, data_ref, hub=hub)] = ("probe", "aligned")
    perturbed = train_t["perturb"].remote("perturb", cfg, home, aligned, data_ref, hub=hub)
    pending[perturbed] = ("train", "perturbed")
    pending[probe_t.remote(cfg, home, perturbed, data_ref, hub=hub)] = ("probe", "perturbed")
    names, refs = ["base", "aligned", "perturbed"], [base_stage, aligned, perturbed]
    for arm in cfg.recover.arms:
        for n in cfg.recover.sizes:
            name = f"recovered/{arm}/{n}"
            rec = train_t["recover"].remote("recover", cfg, home, perturbed, data_ref, arm, n, hub=hub)
            pending[rec] = ("train", name)
            pending[probe_t.remote(cfg, home, rec, data_ref, hub=hub)] = ("probe", name)
            if arm != "in_context":  # in context: no weights of its own, no drift
                names.append(name)
                refs.append(rec)
    pending[drift_t.remote(cfg, home, names, *refs)] = ("drift", "drift")

    assert {f"{kind} {name}" for kind, name in pending.values()} | {"prepare base"} == {
        k for k in state if not k.startswith("step ")}, "dag_tasks() must list the tasks run_dag submits"
    out = {"prepare": prep, "train": {}, "probe": {}, "drift": {}}
    waiting = list(pending)
    try:
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1, timeout=poll_s if hub is not None else None)
            if hub is not None:
                _merge_progress(state, hub)
            if not done:
                on_progress(state)
                continue
            kind, name = pending[done[0]]
            result = ray.get(done[0])
            out[kind][name] = result
            st = state[f"{kind} {name}"]
            st["status"] = "reused" if result.get("reused") else "done"
            st["seconds"] = None if result.get("reused") else result.get("seconds")
            if st["total"] is not None:
                st["done"] = st["total"]
            if on_progress is not None:
                on_progress(state)
            if on_event:
                on_event(kind, name, result)
    finally:
        if hub is not None:
            ray.kill(hub)
    return out


def _merge_progress(state: dict[str, dict], hub, add: str | None = None) -> None:
    """Fold the hub's latest counts into ``state`` (finished tasks keep their final status).

    Keys starting with ``add`` that ``state`` lacks are added (the preparation steps,
    ``"step <name>"``, known only once they start); their status is the reported one.
    """
    try:
        snap = ray.get(hub.snapshot.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - a slow or lost hub only delays the bars
        return
    for key, rep in snap.items():
        st = state.get(key)
        if st is None and add is not None and key.startswith(add):
            st = state[key] = new_task_state(key.split(" ", 1)[0], key.split(" ", 1)[1])
        if st is None or st["status"] in ("done", "reused"):
            continue
        status = rep.get("status", "running") if key.startswith("step ") else "running"
        st.update(done=rep["done"], total=rep["total"], unit=rep["unit"], status=status)


def summary_json_text(summary: dict) -> str:
    return json.dumps(summary, indent=2, sort_keys=False)
