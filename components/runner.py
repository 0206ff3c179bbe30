"""The stage runner: what a stage *is*, whoever runs it.

Plain functions, one per kind of stage: :func:`prepare` (model, known-fact filter,
split, candidates), :func:`train` (tune, perturb or recover), :func:`probe` (every metric
of one checkpoint) and :func:`drift` (weight drift of the trained checkpoints). Each
computes its store key and reuses a finished output (:class:`components.artifacts.Store`),
so a stage's output is the same whether the Ray DAG (:mod:`pipelines.dag`), a Ray Tune
trial (:mod:`pipelines.sweep`), a Kubeflow component (:mod:`pipelines.kubeflow_steps`)
or a benchmark calls it. Nothing here imports Ray, kfp, MLflow, typer or rich: where a
stage trains (in this process, or on Ray Train workers) is the caller's choice, passed
as ``fit``; so is how progress is reported (``on_step``, ``on_progress``) and how many
torch threads a stage gets (``threads``).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable

from components.artifacts import Store, machine_info
from components.config import AuditConfig, stable_hash
from components.data import SuiteData, check_leakage, check_special_tokens
from components.registry import SUITES
from components.base_model import resolve_model
from components.models import Checkpoint, model_digest, model_source, tokenizer_rebuild

# The environment of every process that runs a stage (a Ray worker, a Kubeflow
# component): no hub downloads, no progress bars or warnings of the libraries.
TASK_ENV = {
    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::FutureWarning",
}

# fit(spec, out_dir, key, on_step) -> StageResult: trains a TrainSpec into out_dir
Fit = Callable[..., object]


def _threads(n: int | None) -> None:
    """Give torch ``n`` threads (None: leave the caller's setting)."""
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


def release_memory() -> None:
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


def _items_digest(items) -> str:
    """The store key's digest of a list of items: their content only. ``source`` (file
    and line, for messages) is left out, so the same rows in a renamed file, or on other
    lines, reuse every stage."""
    return stable_hash([{k: v for k, v in i.to_dict().items() if k != "source"} for i in items], 20)


# on_step(name, status, done, total, unit): a preparation step's progress (status
# ``running``, then ``done`` or ``reused``; counts in ``unit``)
Step = Callable[..., None]

PREP_STEPS = ("model", "model load", "known-fact filter", "candidate mining")


def _no_step(name: str, status: str, done: int = 0, total: int | None = None, unit: str = "items") -> None:
    pass


def prepare(cfg: AuditConfig, home: Path, threads: int | None = None, on_step: Step | None = None) -> dict:
    """Resolve the model, keep the facts the base model knows, split the pools, check
    them for leakage.

    ``on_step(name, status, done, total, unit)`` follows the steps (names of
    :data:`PREP_STEPS`): ``model`` (found in the cache, or built / converted from GGUF
    on the first run: ``unit`` says which), ``model load`` (weights into memory, only
    when the filter or the mining is not stored yet), ``known-fact filter`` (``done``
    of ``total`` items answered) and ``candidate mining`` (items); status ``running``,
    then ``done`` or ``reused`` (read from the store).

    The suite decides where the items come from, what a ``tiny-llama`` base model is
    pretrained on, and how the pools are split (:class:`components.data.Suite`). Only
    items with candidates (evaluable ones) are checked for being known.

    Returns:
        ``{"base": Checkpoint dict, "data": SuiteData, "model_digest", "data_digest",
        "model_dir", "model_source", "known": [...], "machine": machine_info()}``.

    Raises:
        UserError: bad data (also a text that spells a special token of the model's
            tokenizer: :func:`components.data.check_special_tokens`), too few known items,
            or leakage between a training pool
            and the evaluation pool (unless ``data.allow_leakage``; allowed leaks are
            listed in ``data.notes["allowed_leaks"]``).
    """
    from components.metrics import generate_answers
    from components.data import MATCHERS
    from components.models import load_checkpoint, load_tokenizer

    _threads(threads)
    step = on_step or _no_step
    home = Path(home)
    suite = SUITES[cfg.suite]
    items = suite.items(cfg)
    models_dir = home / "cache" / "models"
    before = set(models_dir.iterdir()) if models_dir.is_dir() else set()
    step("model", "running", unit=_model_unit(cfg.model.id))
    model_dir = base_model_dir(cfg, home, items)
    made = Path(model_dir).parent == models_dir and Path(model_dir) not in before
    step("model", "done", unit=_model_unit(cfg.model.id, made))
    if cfg.stages.given():  # the user's checkpoints against this base, before any work on it
        from components.given import resolve_all

        resolve_all(cfg, home / "cache", Path(model_dir))
    mdigest = model_digest(model_dir)  # first: it refuses a folder without safetensors weights
    # user text that spells a special token (<|im_end|>) would become a control token
    check_special_tokens(items, load_tokenizer(model_dir, cfg.model.trust_remote_code),
                         {"data.answer_pool": list(cfg.data.answer_pool)})
    tok = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    # a tokenizer that cl-audit rebuilt (a GGUF's pre-tokenizer) is part of what the stages compute
    rebuilt = tokenizer_rebuild(model_dir)
    bdigest = mdigest[:20] if rebuilt is None else stable_hash([mdigest, rebuilt], 20)
    base = Checkpoint("base", str(model_dir), [], None, f"base-{bdigest}")
    # loaded once, and only when the filter or the candidate mining is not stored yet
    def _load() -> tuple:
        step("model load", "running", unit="")
        out = load_checkpoint(base, cfg.model.trust_remote_code)
        step("model load", "done", unit="")
        return out

    load_base = functools.cache(_load)
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
            model, tok = load_base()
            scored = [0]

            def on_batch(k: int) -> None:
                scored[0] += k
                step("known-fact filter", "running", scored[0], len(sub))

            step("known-fact filter", "running", 0, len(sub))
            answers = generate_answers(
                model, tok, sub, cfg.probe.batch_size, cfg.probe.max_new_tokens, cfg.model.precision, on_batch
            )
            match = MATCHERS[suite.task_matcher]
            return {"known": [bool(match(a, it.answer)) for a, it in zip(answers, sub)], "answers": answers}

        filtered, reused = store.produce(key, fn)
        step("known-fact filter", "reused" if reused else "done", len(sub), len(sub))
        known = [False] * len(items)
        for i, k, a in zip(evaluable, filtered["known"], filtered["answers"]):
            known[i] = k
            base_answers[items[i].id] = a
    data = suite.make_split(items, known, cfg)
    data.notes["candidates"] = prepare_candidates(cfg, base, data, base_answers, Store(home / "store"), load_base,
                                                  step)
    load_base.cache_clear()
    leaks = check_leakage(data, cfg.data.allow_leakage, suite.fact_subject,
                          cfg.data.leakage_similarity if suite.near_duplicates else None)
    if leaks:  # allowed by the user: recorded in summary.json ("data") and the manifest
        data.notes["allowed_leaks"] = [f"{e.id} ({how} of {t.id})" for e, how, t in leaks]
    ic_sizes = set(cfg.recover.sizes if "in_context" in cfg.recover.arms else [])
    if "in_context" in cfg.sweep.arms:
        ic_sizes |= set(cfg.sweep.sizes or cfg.recover.sizes)
    if ic_sizes:  # the few-shot prompts must fit the model's context: said before any training
        from components.recover import check_in_context_fits, context_length

        limit = context_length(model_dir)
        need = check_in_context_fits(tok, limit, data, sorted(ic_sizes), cfg.probe.max_new_tokens)
        data.notes["in_context_tokens"] = {"context_length": limit, **{str(n): t for n, t in need.items()}}
    release_memory()
    return {
        "base": base.to_dict(), "data": data, "model_digest": mdigest, "data_digest": data.digest(),
        "model_dir": str(model_dir), "model_source": model_source(cfg.model, model_dir), "known": known,
        "machine": machine_info(),
    }


def base_model_dir(cfg: AuditConfig, home: Path, items: list | None = None) -> Path:
    """The base model's local transformers directory (built, converted or downloaded once
    into ``home/cache``; :func:`components.base_model.resolve_model`); ``items``: the
    suite's items when already read."""
    suite = SUITES[cfg.suite]
    items = suite.items(cfg) if items is None else items
    return resolve_model(
        cfg.model, Path(home) / "cache", suite.tokenizer_texts(items, cfg), cfg.seed,
        suite.pretraining_items(items, cfg))


def check_given(cfg: AuditConfig, home: Path) -> dict:
    """Resolve the checkpoints given as stages (``stages.<stage>.from``) and check them
    against the base model (resolved, or built, here), before any work: see
    :func:`components.given.check_given`. Returns ``{stage: Given}`` ({} when none).

    Raises:
        UserError: one line naming the flag, the checkpoint and the base model.
    """
    if not cfg.stages.given():
        return {}
    from components.given import resolve_all

    return resolve_all(cfg, Path(home) / "cache", base_model_dir(cfg, home))


def given_stage(kind: str, cfg: AuditConfig) -> bool:
    """True when the training stage ``kind`` (``tune``, ``perturb``) is not trained: its
    checkpoint is given (``--aligned``, ``--perturbed``), or, for ``tune`` with only
    ``--perturbed`` given, it is the base model itself."""
    given = cfg.stages.given()
    return (kind == "perturb" and "perturbed" in given) or (kind == "tune" and bool(given))


def _model_unit(model_id: str, made: bool | None = None) -> str:
    """What the ``model`` step does, by the kind of ``model.id``: ``made`` None while it
    runs, then True when it was built / converted now, False when it came from the cache."""
    from components.models import model_kind

    kind = model_kind(model_id)
    first = {"smollm2": "GGUF -> transformers conversion", "gguf": "GGUF -> transformers conversion",
             "tiny": "build and pretraining"}.get(kind)
    if first is None:
        return "hub model (downloaded once, then from the cache)" if kind == "hub" else "local directory"
    if made is None:
        return f"{first} on the first run, else from the cache"
    return f"{first} (first run only)" if made else "from the cache"


def prepare_candidates(cfg: AuditConfig, base: Checkpoint, data: SuiteData, base_answers: dict[str, str],
                       store: Store, load_base: Callable[[], tuple] | None = None, on_step: Step | None = None) -> dict:
    """Give every evaluation item its knowledge phrasings and its K candidates, once per
    audit (stored, keyed by the base model, the items and the mining settings): the base
    model's own answer becomes the first phrasing where it names the gold answer, and
    the candidates of items with an answer type are mined (``data.candidates``,
    :func:`components.knowledge.mine_candidates`). ``data.eval`` is replaced in place.

    ``load_base()`` returns the loaded base model and tokenizer (prepare shares one load
    with the known-fact filter); None: loaded here when the mining is not stored yet.
    ``on_step`` as in :func:`prepare` (the step ``candidate mining``, in items).

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

    step = on_step or _no_step
    n_eval = len(data.eval)

    def fn(tmp: Path) -> dict:
        from components.knowledge import add_own_phrasings, mine_candidates
        from components.metrics import generate_answers
        from components.models import load_checkpoint

        model, tok = load_base() if load_base is not None else load_checkpoint(base, cfg.model.trust_remote_code)
        step("candidate mining", "running", 0, n_eval)
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

    out, reused = store.produce(key, fn)
    step("candidate mining", "reused" if reused else "done", n_eval, n_eval)
    data.eval = [Item(**d) for d in out["eval"]]
    return out["notes"]


def train(kind: str, cfg: AuditConfig, home: Path, parent: dict, data: SuiteData,
          arm: str | None = None, n: int | None = None, fit: Fit | None = None,
          on_step: Callable[[dict], None] | None = None, reuse: bool = True, threads: int | None = None) -> dict:
    """Run (or reuse) one training stage; returns its stored result plus ``key`` and ``reused``.

    The store key holds the stage's config without ``scaling`` (the number of workers
    changes speed, not the result), the seed, the precision, the parent checkpoint's
    key and the digest of the training items. ``perturb.kl_penalty`` reaches the loss by
    one route whoever calls: the stage's :class:`components.training.TrainSpec`.

    Args:
        kind: ``tune``, ``perturb`` or ``recover`` (with ``arm`` and ``n``). The
            ``in_context`` arm trains nothing: its result is the parent checkpoint under
            the name ``recovered/in_context/<n>``, its ``context`` the n recovery examples
            as few-shot turns (:func:`components.recover.few_shot_turns`), its key the
            parent's key, n and the examples' digest (no training settings).
        parent: the parent stage's result (its ``checkpoint`` dict).
        fit: how to train the spec: ``fit(spec, out_dir, key, on_step) ->
            StageResult`` (the Ray DAG passes Ray Train); None: in this process
            (:func:`components.training.train_checkpoint`).
        on_step: called after each optimiser step with its record.
        reuse: False computes the stage even when the store holds its key (the naive
            baseline of ``benchmarks/sweep_reuse.py``).
        threads: torch threads for the stage (None: the caller's setting).

    Returns:
        The stored result (``checkpoint``, ``history``, ``n_items``, ``seconds``,
        ``dir``, ``machine``, ``train_run``) plus ``key`` and ``reused``.

    Raises:
        TrainingDiverged: a non-finite loss, or non-finite weights in what the stage
            saved (checked before the store publishes it); nothing of the stage is stored.
    """
    from components.perturb import perturb_spec, reinit_blocks, unperturbed
    from components.recover import recover_spec, recovery_set
    from components.tune import tune_spec

    if kind in ("tune", "perturb") and given_stage(kind, cfg):  # not trained: the user's checkpoint
        from components.given import given_result

        t0 = time.time()
        res = given_result("aligned" if kind == "tune" else "perturbed", cfg, Path(home) / "cache", parent)
        res["seconds"] = time.time() - t0
        return {**res, "machine": machine_info(threads), "key": res["checkpoint"]["digest"], "reused": False}
    parent_ckpt = Checkpoint(**parent["checkpoint"])
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
    elif arm == "in_context":
        # no training: the perturbed checkpoint, probed with the n examples as few-shot
        # turns; the key holds the examples (their digest) and nothing of recover's training
        from components.recover import few_shot_turns

        shots = recovery_set(data, arm, n)
        key = Store.key("recover", {**common, "arm": arm, "n": n}, [parent_ckpt.digest, _items_digest(shots)])
        spec = None
    else:
        rc = cfg.recover.result_fields()
        rc.pop("arms"), rc.pop("sizes")
        key = Store.key(
            "recover", {**rc, **common, "arm": arm, "n": n},
            [parent_ckpt.digest, _items_digest(recovery_set(data, arm, n))],
        )
        spec = recover_spec(cfg, parent_ckpt, data, arm, n)

    def fn(tmp: Path) -> dict:
        _threads(threads)
        t0 = time.time()
        if kind == "recover" and arm == "in_context":  # no weight update: a prompt prefix
            ckpt = Checkpoint(f"recovered/{arm}/{n}", parent_ckpt.base_dir, list(parent_ckpt.adapters),
                              parent_ckpt.full_dir, key)
            return {"checkpoint": ckpt.to_dict(), "history": [], "n_items": n, "seconds": time.time() - t0,
                    "dir": str(tmp), "machine": machine_info(threads), "train_run": {"in_context": True},
                    "context": few_shot_turns(shots)}
        if kind == "perturb" and cfg.perturb.kind == "reinit":  # no training: blocks re-initialised
            res = reinit_blocks(parent_ckpt, cfg.perturb.reinit_layers, cfg.seed + 1, tmp, cfg.model.trust_remote_code)
        elif spec is None:  # perturb.kind == "none": nothing to train
            res = unperturbed(parent_ckpt)
        elif fit is not None:
            res = fit(spec, tmp, key, on_step)
        else:
            from components.training import train_checkpoint

            res = train_checkpoint(spec.name, spec.parent, spec.items, spec.cfg, spec.seed, spec.precision, tmp,
                                   spec.trust_remote_code, on_step)
        if spec is not None and res.history:  # trained, by whichever fit: its saved weights must be finite
            from components.training import check_saved_weights

            check_saved_weights(spec.weights_dir(tmp), spec.name, res.history[-1]["step"], spec.cfg.lr)
        ckpt = res.checkpoint
        ckpt.digest = key
        return {
            "checkpoint": ckpt.to_dict(), "history": res.history, "n_items": res.n_items,
            "seconds": time.time() - t0, "dir": str(tmp), "machine": machine_info(threads), "train_run": res.run,
        }

    result, reused = store.produce(key, fn, reuse=reuse)
    release_memory()
    return {**result, "key": key, "reused": reused}


def probe(
    cfg: AuditConfig, home: Path, stage: dict, data: SuiteData,
    on_progress: Callable[[int, int], None] | None = None, reuse: bool = True, threads: int | None = None,
) -> dict:
    """Run (or reuse) the probe of one checkpoint (:func:`components.probe.probe`).

    ``on_progress(done, total)`` counts scored items; ``reuse`` and ``threads`` as in
    :func:`train`. The store key holds the probe config, the seed, the precision, the
    checkpoint's key and the digests of the evaluation items (with an ``in_context``
    stage's few-shot turns in their prompts: its checkpoint key also holds the examples).
    """
    from components.probe import probe as measure

    ckpt = Checkpoint(**stage["checkpoint"])
    if stage.get("context"):  # the in_context arm: the few-shot turns before every prompt
        from components.recover import in_context_data

        data = in_context_data(data, stage["context"])
    store = Store(Path(home) / "store")
    key = Store.key(
        "probe", {**cfg.probe.model_dump(), "seed": cfg.seed, "precision": cfg.model.precision},
        [ckpt.digest, _items_digest(data.eval), _items_digest(data.perturb_eval)],
    )

    def fn(tmp: Path) -> dict:
        _threads(threads)
        t0 = time.time()
        res = measure(cfg, ckpt, data, tmp, on_progress)
        return {**res, "dir": str(tmp), "seconds": time.time() - t0, "machine": machine_info(threads)}

    result, reused = store.produce(key, fn, reuse=reuse)
    release_memory()
    return {**result, "key": key, "reused": reused}


def drift(cfg: AuditConfig, home: Path, names: list[str], *stages: dict, threads: int | None = None) -> dict:
    """Run (or reuse) the weight-drift analysis of the trained checkpoints.

    Args:
        names: stage names (``base``, ``aligned``, ``perturbed``, ``recovered/...``) in
            the order of ``stages`` (their train results).
    """
    from components.drift import weight_drift_report

    ckpts = {n: Checkpoint(**st["checkpoint"]) for n, st in zip(names, stages)}
    parent_of = {n: parent_stage(n) for n in names if parent_stage(n) is not None}
    store = Store(Path(home) / "store")
    key = Store.key("drift", {"angle_rank": cfg.probe.angle_rank}, [ckpts[n].digest for n in names])

    def fn(tmp: Path) -> dict:
        _threads(threads)
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
