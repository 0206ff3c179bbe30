"""Training stages on Ray Train (V2): the same stage from one CPU to many GPUs.

:func:`fit_stage` runs one training stage (a :class:`components.training.TrainSpec`)
inside a ``ray.train.torch.TorchTrainer`` whose ``ScalingConfig`` comes from the stage's
``scaling`` section (``components.config.ScalingSection``):

- ``num_workers: 0`` (default): Ray Train V2 local mode, the loop runs in this process
  (the stage's Ray task), as before Ray Train; no worker restarts.
- ``num_workers: n``: ``n`` Ray Train workers, each a DDP rank (gloo on CPU, NCCL on
  GPU) with ``cpus_per_worker`` CPUs and, with ``use_gpu``, ``gpus_per_worker`` GPUs.
  The global batch is the config's ``batch_size``; each rank takes its share
  (``components.training``), so the result does not depend on ``n``.

Every rank reports after each epoch through ``ray.train.report``; rank 0 attaches a
checkpoint (weights as safetensors, optimiser moments as safetensors, step, scheduler
and history as JSON). Ray Train keeps the latest one under
``<storage_path>/<run_name>/`` (absolute; on a cluster, storage every node sees). When a
worker dies, Ray Train restarts the worker group (``FailureConfig(max_failures)``) and
the loop resumes from that checkpoint (``ray.train.get_checkpoint``); a stage task
started again with the same run name (its store key) resumes the same way. The final
reported checkpoint is the stage's output: its weights are moved into the stage's store
folder and the run folder is removed, so one artifact set remains. Only rank 0 writes;
the MLflow records are written by the audit driver from the stage's returned history.

Inside a Ray Tune trial (a sweep), call :func:`fit_stage` from the trainable as Train V2
expects: the trainable is the Train driver (give it few resources, e.g.
``tune.with_resources(trainable, {"CPU": 0.1})`` and ``TuneConfig(max_concurrent_trials)``
to bound the number of concurrent Train runs), the workers report with
``ray.train.report``, and the trainable reports its objective with ``ray.tune.report``.
Pass ``callbacks=[ray.tune.integration.ray_train.TuneReportCallback()]`` only when the
sweep wants the per-epoch training metrics (``loss``, ``ce``, ``kl``, ``epoch``) as
intermediate Tune results. With ``num_workers: 0`` the loop runs inside the trial's own
process and resources.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.config import ScalingSection
from components.errors import TrainingDiverged, UserError

if TYPE_CHECKING:  # torch is imported where the training runs, not in the audit's driver
    from components.training import StageResult, TrainSpec

# Test only: "RANK:STEP:MARKER" makes the worker of that rank exit abruptly (os._exit)
# after that optimiser step, once (the marker file records that it happened), so the
# tests can show Ray Train restarting the worker group from the last checkpoint. It is
# read in the process that calls fit_stage and never set outside tests.
TEST_FAULT_ENV = "CL_AUDIT_TEST_KILL_WORKER"


def scaling_config(sc: ScalingSection):
    """The ``ray.train.ScalingConfig`` of a stage's ``scaling`` section."""
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": float(sc.cpus_per_worker)}
    if sc.use_gpu:
        resources["GPU"] = float(sc.gpus_per_worker)
    return ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources)


def required_resources(sc: ScalingSection) -> dict[str, float]:
    """Logical resources the stage's workers reserve together (empty in local mode)."""
    if sc.num_workers == 0:
        return {}
    out = {"CPU": sc.num_workers * sc.cpus_per_worker}
    if sc.use_gpu:
        out["GPU"] = sc.num_workers * sc.gpus_per_worker
    return out


def check_fits(section: str, sc: ScalingSection, available: dict[str, float]) -> None:
    """Fail fast when a stage's workers can never be placed on a fixed-size Ray cluster.

    Args:
        section: the config section (``tune``, ``perturb``, ``recover``) for the message.
        available: total logical resources of the cluster (``ray.cluster_resources()``).

    Raises:
        UserError: more CPUs or GPUs asked for than the cluster has, or ``use_gpu`` on a
            cluster without GPUs (in-process stages included).
    """
    need = required_resources(sc)
    if sc.num_workers == 0 and sc.use_gpu:
        need = {"GPU": sc.gpus_per_worker}
    for res, n in need.items():
        have = float(available.get(res, 0))
        if n > have:
            per = sc.cpus_per_worker if res == "CPU" else sc.gpus_per_worker
            what = f"{sc.num_workers} workers x {per:g} {res}"
            if sc.num_workers == 0:
                what = f"use_gpu with {sc.gpus_per_worker:g} GPU"
            raise UserError(
                f"{section}.scaling: {what} need {n:g} {res}, the Ray cluster has {have:g} "
                f"(lower {section}.scaling.num_workers or the per-worker resources, or set RAY_ADDRESS)"
            )


def _test_fault() -> dict | None:
    raw = os.environ.get(TEST_FAULT_ENV)
    if not raw:
        return None
    rank, step, marker = raw.split(":", 2)
    return {"rank": int(rank), "step": int(step), "marker": marker}


def _worker_loop(config: dict) -> dict:
    """The function every Ray Train worker runs (and local mode runs in-process).

    Returns (from rank 0, as the Result's ``return_value``): ``{"ok": True}`` or
    ``{"diverged": message}``; a divergence is the same on every rank and is returned,
    not raised, so that Ray Train does not restart a deterministic failure.
    """
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint as RayCheckpoint

    from components.training import World, load_train_state, run_spec

    spec: TrainSpec = config["spec"]
    local: bool = config["local"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if not local:
        torch.set_num_threads(max(1, int(spec.cfg.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=True)) if world_size > 1 else None
    world = World(rank=rank, world_size=world_size, device=device, wrap=wrap)

    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_train_state(Path(d))

    fault = config.get("fault")
    progress = config.get("progress")

    def on_step(rec: dict) -> None:
        if progress is not None and rank == 0:
            progress.on_step(rec)
        if fault and rank == fault["rank"] and rec["step"] == fault["step"] and not Path(fault["marker"]).exists():
            # Test only: a worker dies abruptly mid-stage. It first waits until Ray Train
            # has committed every checkpoint reported so far (the controller collects
            # reports on its own schedule), so the restart point is deterministic.
            from ray.train import CheckpointConsistencyMode

            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            Path(fault["marker"]).touch()
            os._exit(1)

    def on_epoch_end(ev) -> None:
        last = ev.history[-1]
        metrics = {"epoch": ev.epoch, "step": ev.step, "loss": last["loss"], "ce": last["ce"], "kl": last["kl"]}
        name = f"epoch_{ev.epoch:04d}"
        if local:
            # Local mode keeps reported checkpoints in memory and cannot restart, so only
            # the final one is written, straight into the run folder.
            if ev.final:
                d = Path(config["run_dir"]) / "local" / name
                ev.save(d)
                ray.train.report(metrics, checkpoint=RayCheckpoint.from_directory(str(d)), checkpoint_dir_name=name)
            else:
                ray.train.report(metrics)
            return
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="cl-audit-ckpt-") as d:
                ev.save(Path(d))
                ray.train.report(metrics, checkpoint=RayCheckpoint.from_directory(d), checkpoint_dir_name=name)
        else:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)

    try:
        run_spec(spec, world, resume, on_step, on_epoch_end)
    except TrainingDiverged as e:
        return {"diverged": str(e)}
    return {"ok": True}


def _user_error_in(err: BaseException) -> UserError | None:
    """The UserError a worker raised, if that is what failed the run."""
    failures = getattr(err, "worker_failures", None) or {}
    for e in failures.values():
        for cand in (e, getattr(e, "_base_exc", None), getattr(e, "cause", None)):
            if isinstance(cand, UserError):
                return cand
    return None


@contextmanager
def _sigint_restored():
    """Put back the SIGINT handler that ``trainer.fit()`` installs in the main thread:
    it holds the Train controller's handle, which would keep that (idle) actor alive for
    as long as this process lives."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and old is not None:
            signal.signal(signal.SIGINT, old)


def fit_stage(
    spec: TrainSpec, out_dir: Path, storage_path: Path, run_name: str, callbacks: list[Any] | None = None,
    progress: Any = None,
) -> StageResult:
    """Train ``spec`` on Ray Train and put its weights into ``out_dir``.

    Args:
        spec: the stage (its ``cfg.scaling`` gives the workers and GPUs).
        out_dir: the stage's output folder (the store's temporary folder); receives
            ``adapter/`` (LoRA) or ``model/`` (full), safetensors.
        storage_path: Ray Train's storage (made absolute); the run keeps its per-epoch
            checkpoint in ``<storage_path>/<run_name>/`` until the stage is done.
        run_name: unique per stage output (the store key), so a restarted stage task
            resumes the same run.
        callbacks: Ray Train ``UserCallback``s, e.g. Tune's ``TuneReportCallback``
            inside a trial.
        progress: a :class:`pipelines.progress.TaskProgress`; rank 0 reports each
            optimiser step to it (for the CLI's progress bars).

    Returns:
        A :class:`StageResult`; ``run`` holds ``num_workers``, ``use_gpu`` and
        ``resumed_at`` (the steps at which a restarted worker group resumed).

    Raises:
        TrainingDiverged: non-finite loss (nothing is written to ``out_dir``).
        UserError: raised by a worker (e.g. bf16 on a GPU without it).
        ray.train.TrainingFailedError: workers kept failing beyond ``max_failures``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from components.training import StageResult, train_state_info

    sc = spec.cfg.scaling
    storage = Path(storage_path).resolve()
    run_dir = storage / run_name
    local = sc.num_workers == 0
    if local:
        shutil.rmtree(run_dir / "local", ignore_errors=True)  # local mode never resumes
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"spec": spec, "local": local, "run_dir": str(run_dir), "fault": _test_fault(),
                           "progress": progress},
        scaling_config=scaling_config(sc),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=list(callbacks or []),
        ),
    )
    try:
        with _sigint_restored():
            result = trainer.fit()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a worker's UserError comes back wrapped
        user = _user_error_in(e)
        if user is not None:
            raise type(user)(str(user)) from None
        raise
    ret = result.return_value or {}
    if ret.get("diverged"):
        shutil.rmtree(run_dir, ignore_errors=True)  # resuming would diverge again
        raise TrainingDiverged(ret["diverged"])
    if result.checkpoint is None:
        raise RuntimeError(f"{spec.name}: Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        info = train_state_info(Path(d))
        shutil.move(str(spec.weights_dir(Path(d))), str(spec.weights_dir(out_dir)))
    shutil.rmtree(run_dir, ignore_errors=True)
    run = {"num_workers": sc.num_workers, "use_gpu": sc.use_gpu, "resumed_at": info["resumed_at"]}
    return StageResult(spec.output(out_dir), info["history"], len(spec.items), run)
