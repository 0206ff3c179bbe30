"""The audit DAG on Ray: prepare -> tune -> perturb -> recover[arm][n], a probe per checkpoint.

Each stage is one Ray task with declared CPUs; a training stage trains inside a Ray
Train ``TorchTrainer`` (``pipelines.train_ray``: in-process by default, or data-parallel
workers and GPUs from the stage's ``scaling`` section). Tasks receive their inputs as object
references, so probes and recovery arms run in parallel where resources allow. Each
task computes its store key and reuses a finished output (``components.artifacts.Store``).
``ray.init()`` starts a local Ray unless ``RAY_ADDRESS`` points at a cluster.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import ray

from components.artifacts import Store, machine_info
from components.config import AuditConfig, stable_hash
from components.data import SUITES, SuiteData, check_leakage
from components.models import Checkpoint, model_digest, model_source, resolve_model
from pipelines.train_ray import TEST_FAULT_ENV

TASK_ENV = {
    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::FutureWarning",
}


def _release_memory() -> None:
    """After a stage task: free its model and hand freed heap pages back to the OS, so an
    idle Ray worker waiting for its next task does not hold a model's worth of memory
    (mimalloc's ``mi_collect`` where the worker runs on it, else glibc's ``malloc_trim``)."""
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(None)
        if hasattr(libc, "mi_collect"):  # mimalloc preloaded (worker_allocator_env)
            libc.mi_collect(ctypes.c_bool(True))
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc; TypeError: CDLL(None) on Windows
        pass


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


def _set_threads() -> None:
    """Inside a Ray task, as many torch threads as the task's CPUs.

    Outside Ray (a Kubeflow component) the caller's setting is kept: asking Ray for the
    runtime context there would start a local Ray instance.
    """
    import torch

    if not ray.is_initialized():
        return
    try:
        n = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    except Exception:  # noqa: BLE001 - the driver, not a Ray task
        n = os.cpu_count() or 1
    torch.set_num_threads(max(1, n))


def _items_digest(items) -> str:
    return stable_hash([i.to_dict() for i in items], 20)


def prepare(cfg: AuditConfig, home: Path) -> dict:
    """Resolve the model, keep the facts the base model knows, split the pools, check
    them for leakage.

    The suite decides where the items come from, what a ``tiny-llama`` base model is
    pretrained on, and how the pools are split (:class:`components.data.Suite`). Only
    items with candidates (evaluable ones) are checked for being known.

    Returns:
        ``{"base": Checkpoint dict, "data": SuiteData, "model_digest", "data_digest",
        "model_dir", "model_source", "known": [...], "machine": machine_info()}``.

    Raises:
        UserError: bad data, too few known items, or leakage between a training pool
            and the evaluation pool (unless ``data.allow_leakage``; allowed leaks are
            listed in ``data.notes["allowed_leaks"]``).
    """
    from components.metrics import generate_answers
    from components.data import MATCHERS
    from components.models import load_checkpoint

    home = Path(home)
    suite = SUITES[cfg.suite]
    items = suite.items(cfg)
    model_dir = resolve_model(
        cfg.model, home / "cache", suite.tokenizer_texts(items, cfg), cfg.seed, suite.pretraining_items(items, cfg)
    )
    mdigest = model_digest(model_dir)
    base = Checkpoint("base", str(model_dir), [], None, f"base-{mdigest[:20]}")
    known = None
    base_answers: dict[str, str] = {}
    if cfg.data.filter_known:
        store = Store(home / "store")
        evaluable = [i for i, it in enumerate(items) if it.candidates]
        sub = [items[i] for i in evaluable]
        key = Store.key(
            "filter",
            {"suite": cfg.suite, "items": _items_digest(sub), "precision": cfg.model.precision,
             # only the generation settings decide which facts count as known
             "probe": cfg.probe.model_dump(include={"batch_size", "max_new_tokens"})},
            [base.digest],
        )

        def fn(tmp: Path) -> dict:
            model, tok = load_checkpoint(base, cfg.model.trust_remote_code)
            answers = generate_answers(
                model, tok, sub, cfg.probe.batch_size, cfg.probe.max_new_tokens, cfg.model.precision
            )
            match = MATCHERS[suite.task_matcher]
            return {"known": [bool(match(a, it.answer)) for a, it in zip(answers, sub)], "answers": answers}

        filtered = store.produce(key, fn)[0]
        known = [False] * len(items)
        for i, k, a in zip(evaluable, filtered["known"], filtered["answers"]):
            known[i] = k
            base_answers[items[i].id] = a
    data = suite.make_split(items, known, cfg)
    data.notes["candidates"] = prepare_candidates(cfg, base, data, base_answers, Store(home / "store"))
    leaks = check_leakage(data, cfg.data.allow_leakage)
    if leaks:  # allowed by the user: recorded in summary.json ("data") and the manifest
        data.notes["allowed_leaks"] = [f"{e.id} ({how} of {t.id})" for e, how, t in leaks]
    _release_memory()
    return {
        "base": base.to_dict(), "data": data, "model_digest": mdigest, "data_digest": data.digest(),
        "model_dir": str(model_dir), "model_source": model_source(cfg.model, model_dir), "known": known,
        "machine": machine_info(),
    }


def prepare_candidates(cfg: AuditConfig, base: Checkpoint, data: SuiteData, base_answers: dict[str, str],
                       store: Store) -> dict:
    """Give every evaluation item its knowledge phrasings and its K candidates, once per
    audit (stored, keyed by the base model, the items and the mining settings): the base
    model's own answer becomes the first phrasing where it names the gold answer, and
    the candidates of items with an answer type are mined (``data.candidates``,
    :func:`components.knowledge.mine_candidates`). ``data.eval`` is replaced in place.

    Returns:
        Notes for ``summary.json``: the mode, K, items mined and kept, answers scored
        in full per item, items ranked in the base model's own words.

    Raises:
        UserError: an answer type has fewer than ``data.n_candidates`` answers.
    """
    from components.data import Item
    from components.errors import UserError
    from components.knowledge import rank_pool

    for it in data.eval:
        pool = rank_pool(it, data.answer_pools)
        if pool is not None and len(pool) < cfg.data.n_candidates:
            raise UserError(
                f"data.n_candidates: {cfg.data.n_candidates} candidates asked for, but item {it.id} has only "
                f"{len(pool)} answers of its type ({it.answer_type}) to rank among; lower data.n_candidates")
    key = Store.key(
        "candidates",
        {"mode": cfg.data.candidates, "k": cfg.data.n_candidates, "seed": cfg.seed, "precision": cfg.model.precision,
         "items": _items_digest(data.eval), "pools": stable_hash(data.answer_pools, 20),
         "groups": stable_hash(data.answer_groups, 20),
         "probe": cfg.probe.model_dump(include={"batch_size", "max_new_tokens"})},
        [base.digest],
    )

    def fn(tmp: Path) -> dict:
        from components.knowledge import add_own_phrasings, mine_candidates
        from components.metrics import generate_answers
        from components.models import load_checkpoint

        model, tok = load_checkpoint(base, cfg.model.trust_remote_code)
        items = [Item(**it.to_dict()) for it in data.eval]
        missing = [it for it in items if it.id not in base_answers]
        answers = dict(base_answers)
        if missing:
            got = generate_answers(model, tok, missing, cfg.probe.batch_size, cfg.probe.max_new_tokens,
                                   cfg.model.precision)
            answers.update({it.id: a for it, a in zip(missing, got)})
        own = add_own_phrasings(items, answers)
        info = mine_candidates(model, tok, items, data.answer_pools, data.answer_groups, cfg.data.n_candidates,
                               cfg.data.candidates, cfg.seed, cfg.probe.batch_size, cfg.model.precision)
        return {"eval": [it.to_dict() for it in items],
                "notes": {"mode": cfg.data.candidates, "k": cfg.data.n_candidates, **info, "own_phrasing": own}}

    out = store.produce(key, fn)[0]
    data.eval = [Item(**d) for d in out["eval"]]
    return out["notes"]


def train_stage(kind: str, cfg: AuditConfig, home: Path, parent: dict, data: SuiteData,
                arm: str | None = None, n: int | None = None, hub=None,
                reuse: bool = True) -> dict:
    """Run (or reuse) one training stage; returns its stored result plus ``key`` and ``reused``.

    The stage trains on Ray Train (``pipelines.train_ray.fit_stage``) with the workers
    and GPUs of its ``scaling`` section; ``scaling`` is left out of the store key, since
    the number of workers changes speed, not the result. Ray Train keeps the run's
    latest checkpoint in ``<home>/ray_train/<key>`` until the stage is stored.

    ``hub``: an optional :class:`pipelines.progress.ProgressHub` that receives the
    optimiser steps as they happen (``"train <checkpoint name>"``). ``reuse=False``
    computes the stage even when ``<home>/store`` already holds its key (the naive
    baseline of ``benchmarks/sweep_reuse.py``).
    """
    from components.perturb import perturb_spec, reinit_blocks, unperturbed
    from components.recover import recover_spec, recovery_set
    from components.tune import tune_spec
    from pipelines.progress import TaskProgress
    from pipelines.train_ray import fit_stage

    parent_ckpt = Checkpoint(**parent["checkpoint"])
    name = {"tune": "aligned", "perturb": "perturbed"}.get(kind, f"recovered/{arm}/{n}")
    tracker = TaskProgress(hub, f"train {name}", "steps")
    store = Store(Path(home) / "store")
    common = {"seed": cfg.seed, "precision": cfg.model.precision}
    if kind == "tune":
        key = Store.key("tune", {**cfg.tune.result_fields(), **common}, [parent_ckpt.digest, _items_digest(data.align)])
        spec = tune_spec(cfg, parent_ckpt, data)
    elif kind == "perturb":
        key = Store.key(
            "perturb", {**cfg.perturb.result_fields(), **common}, [parent_ckpt.digest, _items_digest(data.perturb)]
        )
        spec = perturb_spec(cfg, parent_ckpt, data)
    else:
        rc = cfg.recover.result_fields()
        rc.pop("arms"), rc.pop("sizes")
        key = Store.key(
            "recover", {**rc, **common, "arm": arm, "n": n},
            [parent_ckpt.digest, _items_digest(recovery_set(data, arm, n))],
        )
        spec = recover_spec(cfg, parent_ckpt, data, arm, n)

    def fn(tmp: Path) -> dict:
        _set_threads()
        t0 = time.time()
        if kind == "perturb" and cfg.perturb.kind == "reinit":  # no training: blocks re-initialised
            res = reinit_blocks(parent_ckpt, cfg.perturb.reinit_layers, cfg.seed + 1, tmp, cfg.model.trust_remote_code)
        elif spec is None:  # perturb.kind == "none": nothing to train
            res = unperturbed(parent_ckpt)
        elif spec.cfg.scaling.num_workers == 0 and _in_tune_trial():
            # Inside a Ray Tune trial a nested local-mode TorchTrainer fails; the same loop
            # runs in-process instead (identical result: num_workers 0 is one process).
            from components.training import train_checkpoint

            res = train_checkpoint(spec.name, spec.parent, spec.items, spec.cfg, spec.seed, spec.precision, tmp,
                                   spec.trust_remote_code, tracker.on_step)
        else:
            res = fit_stage(spec, tmp, Path(home) / "ray_train", key, progress=tracker)
        tracker.finish(len(res.history), len(res.history))
        ckpt = res.checkpoint
        ckpt.digest = key
        return {
            "checkpoint": ckpt.to_dict(), "history": res.history, "n_items": res.n_items,
            "seconds": time.time() - t0, "dir": str(tmp), "machine": machine_info(), "train_run": res.run,
        }

    result, reused = store.produce(key, fn, reuse=reuse)
    _release_memory()
    return {**result, "key": key, "reused": reused}


def _in_tune_trial() -> bool:
    """True inside a Ray Tune trial (a sweep cell)."""
    try:
        from ray import tune

        return bool(tune.get_context().get_trial_id())
    except Exception:  # noqa: BLE001 - outside Tune there is no trial context
        return False


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


def probe_stage(
    cfg: AuditConfig, home: Path, stage: dict, data: SuiteData, hub=None, reuse: bool = True
) -> dict:
    """Run (or reuse) the probe of one checkpoint (scored items reported to ``hub``, if given;
    ``reuse`` as in :func:`train_stage`)."""
    from components.probe import probe
    from pipelines.progress import TaskProgress

    ckpt = Checkpoint(**stage["checkpoint"])
    report = TaskProgress(hub, f"probe {ckpt.name}", "items")
    store = Store(Path(home) / "store")
    key = Store.key(
        "probe", {**cfg.probe.model_dump(), "seed": cfg.seed, "precision": cfg.model.precision},
        [ckpt.digest, _items_digest(data.eval), _items_digest(data.perturb_eval)],
    )

    def fn(tmp: Path) -> dict:
        _set_threads()
        t0 = time.time()
        res = probe(cfg, ckpt, data, tmp, report)
        report.finish(*report.last)
        return {**res, "dir": str(tmp), "seconds": time.time() - t0, "machine": machine_info()}

    result, reused = store.produce(key, fn, reuse=reuse)
    _release_memory()
    return {**result, "key": key, "reused": reused}


def drift_stage(cfg: AuditConfig, home: Path, names: list[str], *stages: dict) -> dict:
    """Run (or reuse) the weight-drift analysis of the trained checkpoints.

    Args:
        names: stage names (``base``, ``aligned``, ``perturbed``, ``recovered/...``) in
            the order of ``stages`` (their train results, resolved by Ray).
    """
    from components.drift import weight_drift_report

    ckpts = {n: Checkpoint(**st["checkpoint"]) for n, st in zip(names, stages)}
    parent_of = {n: parent_stage(n) for n in names if parent_stage(n) is not None}
    store = Store(Path(home) / "store")
    key = Store.key("drift", {"angle_rank": cfg.probe.angle_rank}, [ckpts[n].digest for n in names])

    def fn(tmp: Path) -> dict:
        _set_threads()
        t0 = time.time()
        rep = weight_drift_report(ckpts, parent_of, ("perturbed", "aligned"), cfg.probe.angle_rank)
        return {**rep, "parent_of": parent_of, "seconds": time.time() - t0}

    result, reused = store.produce(key, fn)
    return {**result, "key": key, "reused": reused}


def parent_stage(name: str) -> str | None:
    """The stage a checkpoint was trained from (None for ``base``)."""
    if name.startswith("recovered/"):
        return "perturbed"
    return {"aligned": "base", "perturbed": "aligned"}.get(name)


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
    prep_t = ray.remote(num_cpus=pcpu, max_retries=retries)(prepare)
    train_r = ray.remote(max_retries=retries)(train_stage)
    fault = os.environ.get(TEST_FAULT_ENV)  # test only: forwarded to the stage tasks
    extra = {"runtime_env": {"env_vars": {TEST_FAULT_ENV: fault}}} if fault else {}
    train_t = {k: train_r.options(**stage_task_resources(cfg, k), **extra) for k in ("tune", "perturb", "recover")}
    probe_t = ray.remote(num_cpus=pcpu, max_retries=retries)(probe_stage)
    drift_t = ray.remote(num_cpus=pcpu, max_retries=retries)(drift_stage)

    prep_ref = prep_t.remote(cfg, home)
    prep = ray.get(prep_ref)
    if on_event:
        on_event("prepare", "base", prep)
    data_ref = ray.put(prep["data"])
    base_stage = {"checkpoint": prep["base"], "history": []}
    hub = None
    if on_progress is not None:
        from pipelines.progress import ProgressHub

        hub = ProgressHub.remote()

    pending: dict = {}
    aligned = train_t["tune"].remote("tune", cfg, home, base_stage, data_ref, hub=hub)
    pending[aligned] = ("train", "aligned")
    pending[probe_t.remote(cfg, home, base_stage, data_ref)] = ("probe", "base")
    pending[probe_t.remote(cfg, home, aligned, data_ref)] = ("probe", "aligned")
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
            names.append(name)
            refs.append(rec)
    pending[drift_t.remote(cfg, home, names, *refs)] = ("drift", "drift")

    state = {
        f"{kind} {name}": {"kind": kind, "name": name, "status": "waiting", "done": 0, "total": None,
                           "unit": "steps" if kind == "train" else "items"}
        for kind, name in pending.values()
    }
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


def _merge_progress(state: dict[str, dict], hub) -> None:
    """Fold the hub's latest counts into ``state`` (finished tasks keep their final status)."""
    try:
        snap = ray.get(hub.snapshot.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - a slow or lost hub only delays the bars
        return
    for key, rep in snap.items():
        st = state.get(key)
        if st is None or st["status"] in ("done", "reused"):
            continue
        st.update(done=rep["done"], total=rep["total"], status="running")


def summary_json_text(summary: dict) -> str:
    return json.dumps(summary, indent=2, sort_keys=False)
