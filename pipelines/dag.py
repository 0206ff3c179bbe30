"""The audit DAG on Ray: prepare -> tune -> perturb -> recover[arm][n], a probe per checkpoint.

Each stage is one Ray task with declared CPUs; tasks receive their inputs as object
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

from components.artifacts import Store
from components.config import AuditConfig, stable_hash
from components.data import SUITES, SuiteData, pretraining_items, split_items, suite_texts
from components.models import Checkpoint, model_digest, resolve_model

TASK_ENV = {
    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::FutureWarning",
}


def _set_threads() -> None:
    import torch

    try:
        n = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    except Exception:  # noqa: BLE001 - outside a Ray task
        n = os.cpu_count() or 1
    torch.set_num_threads(max(1, n))


def _items_digest(items) -> str:
    return stable_hash([i.to_dict() for i in items], 20)


def prepare(cfg: AuditConfig, home: Path) -> dict:
    """Resolve the model, keep the facts the base model knows, split the pools.

    Returns:
        ``{"base": Checkpoint dict, "data": SuiteData, "model_digest", "data_digest",
        "model_dir", "known": [...]}``.
    """
    from components.metrics import generate_answers
    from components.data import MATCHERS
    from components.models import load_checkpoint

    home = Path(home)
    suite = SUITES[cfg.suite]
    items = suite.raw_items(cfg.data.n_candidates, cfg.seed)
    if cfg.data.max_items:
        items = items[: cfg.data.max_items]
    model_dir = resolve_model(cfg.model, home / "cache", suite_texts(items), cfg.seed, pretraining_items(items, cfg.seed))
    mdigest = model_digest(model_dir)
    base = Checkpoint("base", str(model_dir), [], None, f"base-{mdigest[:20]}")
    known = None
    if cfg.data.filter_known:
        store = Store(home / "store")
        key = Store.key(
            "filter",
            {"suite": cfg.suite, "items": _items_digest(items), "precision": cfg.model.precision,
             # only the generation settings decide which facts count as known
             "probe": cfg.probe.model_dump(include={"batch_size", "max_new_tokens"})},
            [base.digest],
        )

        def fn(tmp: Path) -> dict:
            model, tok = load_checkpoint(base, cfg.model.trust_remote_code)
            answers = generate_answers(
                model, tok, items, cfg.probe.batch_size, cfg.probe.max_new_tokens, cfg.model.precision
            )
            match = MATCHERS[suite.task_matcher]
            return {"known": [bool(match(a, it.answer)) for a, it in zip(answers, items)], "answers": answers}

        known = store.produce(key, fn)[0]["known"]
    data = split_items(items, known, cfg.data, cfg.perturb.kind, cfg.seed)
    data.task_matcher = suite.task_matcher
    data.probe_attribute = suite.probe_attribute
    return {
        "base": base.to_dict(), "data": data, "model_digest": mdigest, "data_digest": data.digest(),
        "model_dir": str(model_dir), "known": known,
    }


def train_stage(kind: str, cfg: AuditConfig, home: Path, parent: dict, data: SuiteData,
                arm: str | None = None, n: int | None = None) -> dict:
    """Run (or reuse) one training stage; returns its stored result plus ``key`` and ``reused``."""
    from components.perturb import perturb
    from components.recover import recover, recovery_set
    from components.tune import tune

    parent_ckpt = Checkpoint(**parent["checkpoint"])
    store = Store(Path(home) / "store")
    common = {"seed": cfg.seed, "precision": cfg.model.precision}
    if kind == "tune":
        key = Store.key("tune", {**cfg.tune.model_dump(), **common}, [parent_ckpt.digest, _items_digest(data.align)])
        run = lambda tmp: tune(cfg, parent_ckpt, data, tmp)  # noqa: E731
    elif kind == "perturb":
        key = Store.key(
            "perturb", {**cfg.perturb.model_dump(), **common}, [parent_ckpt.digest, _items_digest(data.perturb)]
        )
        run = lambda tmp: perturb(cfg, parent_ckpt, data, tmp)  # noqa: E731
    else:
        rc = cfg.recover.model_dump(exclude={"arms", "sizes"})
        key = Store.key(
            "recover", {**rc, **common, "arm": arm, "n": n},
            [parent_ckpt.digest, _items_digest(recovery_set(data, arm, n))],
        )
        run = lambda tmp: recover(cfg, parent_ckpt, data, arm, n, tmp)  # noqa: E731

    def fn(tmp: Path) -> dict:
        _set_threads()
        t0 = time.time()
        res = run(tmp)
        ckpt = res.checkpoint
        ckpt.digest = key
        return {
            "checkpoint": ckpt.to_dict(), "history": res.history, "n_items": res.n_items,
            "seconds": time.time() - t0, "dir": str(tmp),
        }

    result, reused = store.produce(key, fn)
    return {**result, "key": key, "reused": reused}


def probe_stage(cfg: AuditConfig, home: Path, stage: dict, data: SuiteData) -> dict:
    """Run (or reuse) the probe of one checkpoint."""
    from components.probe import probe

    ckpt = Checkpoint(**stage["checkpoint"])
    store = Store(Path(home) / "store")
    key = Store.key(
        "probe", {**cfg.probe.model_dump(), "seed": cfg.seed, "precision": cfg.model.precision},
        [ckpt.digest, _items_digest(data.eval), _items_digest(data.perturb_eval)],
    )

    def fn(tmp: Path) -> dict:
        _set_threads()
        t0 = time.time()
        res = probe(cfg, ckpt, data, tmp)
        return {**res, "dir": str(tmp), "seconds": time.time() - t0}

    result, reused = store.produce(key, fn)
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
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray on this machine."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address or None,
        include_dashboard=False if not address else None,
        logging_level="ERROR",
        log_to_driver=bool(os.environ.get("CL_AUDIT_WORKER_LOGS")),
        runtime_env={"env_vars": TASK_ENV},
        configure_logging=True,
    )


def run_dag(
    cfg: AuditConfig, home: Path, on_event: Callable[[str, str, dict], None] | None = None
) -> dict:
    """Run the audit DAG on Ray and return every stage's result.

    ``on_event(kind, name, result)`` is called in the driver as each stage finishes
    (``kind`` is ``prepare``, ``train``, ``probe`` or ``drift``), so it can log to
    MLflow and show progress while the rest still runs.

    Returns:
        ``{"prepare": ..., "train": {name: result}, "probe": {name: result},
        "drift": {"drift": result}}``.
    """
    init_ray()
    home = str(Path(home).resolve())
    tcpu, pcpu = cfg.ray.train_cpus, cfg.ray.probe_cpus
    retries = cfg.ray.max_retries
    prep_t = ray.remote(num_cpus=pcpu, max_retries=retries)(prepare)
    train_t = ray.remote(num_cpus=tcpu, max_retries=retries)(train_stage)
    probe_t = ray.remote(num_cpus=pcpu, max_retries=retries)(probe_stage)
    drift_t = ray.remote(num_cpus=pcpu, max_retries=retries)(drift_stage)

    prep_ref = prep_t.remote(cfg, home)
    prep = ray.get(prep_ref)
    if on_event:
        on_event("prepare", "base", prep)
    data_ref = ray.put(prep["data"])
    base_stage = {"checkpoint": prep["base"], "history": []}

    pending: dict = {}
    aligned = train_t.remote("tune", cfg, home, base_stage, data_ref)
    pending[aligned] = ("train", "aligned")
    pending[probe_t.remote(cfg, home, base_stage, data_ref)] = ("probe", "base")
    pending[probe_t.remote(cfg, home, aligned, data_ref)] = ("probe", "aligned")
    perturbed = train_t.remote("perturb", cfg, home, aligned, data_ref)
    pending[perturbed] = ("train", "perturbed")
    pending[probe_t.remote(cfg, home, perturbed, data_ref)] = ("probe", "perturbed")
    names, refs = ["base", "aligned", "perturbed"], [base_stage, aligned, perturbed]
    for arm in cfg.recover.arms:
        for n in cfg.recover.sizes:
            name = f"recovered/{arm}/{n}"
            rec = train_t.remote("recover", cfg, home, perturbed, data_ref, arm, n)
            pending[rec] = ("train", name)
            pending[probe_t.remote(cfg, home, rec, data_ref)] = ("probe", name)
            names.append(name)
            refs.append(rec)
    pending[drift_t.remote(cfg, home, names, *refs)] = ("drift", "drift")

    out = {"prepare": prep, "train": {}, "probe": {}, "drift": {}}
    waiting = list(pending)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        kind, name = pending[done[0]]
        result = ray.get(done[0])
        out[kind][name] = result
        if on_event:
            on_event(kind, name, result)
    return out


def summary_json_text(summary: dict) -> str:
    return json.dumps(summary, indent=2, sort_keys=False)
