"""What the Kubeflow components do, without kfp: each step calls one stage function.

The component functions in :mod:`pipelines.kubeflow` are thin wrappers that import this
module inside the image (importing kfp's compiler there would be circular) and call one
step: :func:`prepare_step`, :func:`train_step`, :func:`probe_step`, :func:`verdict_step`.
Each step calls the same stage runner as the Ray DAG (:mod:`components.runner`) or
:func:`pipelines.audit.run_audit`; this module only moves stage outputs in and out of
kfp artifact directories (layouts in :mod:`pipelines.kubeflow`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import List

from components.config import AuditConfig
from components.registry import config_from_tree



def _setup(config: dict, overrides: List[str], cpus: str) -> tuple[AuditConfig, Path]:
    """Resolve the config, the run folder and the torch threads of one component.

    ``cpus`` is ``train`` or ``probe``: torch gets ``ray.train_cpus`` or
    ``ray.probe_cpus`` threads, as the same stage gets inside a Ray task.
    """
    import torch

    from pipelines.audit import default_home
    from components.runner import TASK_ENV

    for k, v in TASK_ENV.items():
        os.environ.setdefault(k, v)
    if not isinstance(config, dict):
        from components.errors import UserError

        raise UserError(f"config: expected a mapping of config sections, got {type(config).__name__}")
    cfg = config_from_tree(config, list(overrides), "pipeline parameter config")
    n = cfg.ray.train_cpus if cpus == "train" else cfg.ray.probe_cpus
    torch.set_num_threads(max(1, int(n)))
    home = default_home()
    home.mkdir(parents=True, exist_ok=True)
    return cfg, home


def _write_json(path: Path, obj) -> None:
    from components.artifacts import atomic_write

    atomic_write(path, json.dumps(obj, indent=1, default=str))


def export_checkpoint(ckpt: dict, dst: Path, stage: dict | None = None) -> None:
    """Copy a checkpoint's adapters (or full weights) into an artifact directory.

    ``ckpt`` is a :class:`components.models.Checkpoint` dict with absolute paths; the
    base model is not copied (it travels as its own artifact).
    """
    dst.mkdir(parents=True, exist_ok=True)
    rel = {"name": ckpt["name"], "digest": ckpt["digest"], "adapters": [], "full_dir": None}
    for i, a in enumerate(ckpt["adapters"]):
        shutil.copytree(a, dst / "adapters" / str(i))
        rel["adapters"].append(f"adapters/{i}")
    if ckpt.get("full_dir"):
        shutil.copytree(ckpt["full_dir"], dst / "full")
        rel["full_dir"] = "full"
    _write_json(dst / "checkpoint.json", rel)
    if stage is not None:
        _write_json(dst / "stage.json", stage)


def import_checkpoint(src: Path, base_model: Path) -> dict:
    """The :class:`components.models.Checkpoint` dict of a checkpoint artifact, with
    paths into ``src`` and the base model directory of the ``base_model`` artifact."""
    src, base_model = Path(src), Path(base_model)
    rel = json.loads((src / "checkpoint.json").read_text())
    return {
        "name": rel["name"], "base_dir": str(base_model / "model"),
        "adapters": [str(src / a) for a in rel["adapters"]],
        "full_dir": str(src / rel["full_dir"]) if rel["full_dir"] else None,
        "digest": rel["digest"],
    }


def load_data(path: Path) -> dict:
    """The prepared-data artifact: ``{"data": SuiteData, "model_digest", "data_digest", "known"}``."""
    from components.data import SuiteData

    d = json.loads((Path(path) / "data.json").read_text())
    d["data"] = SuiteData.from_dict(d["data"])
    return d


def recovery_cells(cfg: AuditConfig) -> List[str]:
    """``["<arm>/<n>", ...]`` for every recovery arm and size, in DAG order."""
    return [f"{a}/{n}" for a in cfg.recover.arms for n in cfg.recover.sizes]


def prepare_step(config: dict, overrides: List[str], data_dir: str, base_dir: str) -> dict:
    """Component ``prepare-data``: :func:`components.runner.prepare`, then its outputs as artifacts.

    Returns:
        ``{"cells": [...], "n_known": int, "n_items": int, "model_digest": str}``.
    """
    from components.runner import prepare

    cfg, home = _setup(config, overrides, "probe")
    prep = prepare(cfg, home)
    data_dir, base_dir = Path(data_dir), Path(base_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_json(data_dir / "data.json", {
        "data": prep["data"].to_dict(), "model_digest": prep["model_digest"],
        "data_digest": prep["data_digest"], "known": prep["known"], "config_digest": cfg.digest(),
    })
    base_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(prep["model_dir"], base_dir / "model", ignore=shutil.ignore_patterns(".cl-audit-digest"))
    export_checkpoint(prep["base"], base_dir)
    notes = prep["data"].notes
    return {"cells": recovery_cells(cfg), "n_known": notes["n_known"], "n_items": notes["n_items"],
            "model_digest": prep["model_digest"]}


def train_step(kind: str, config: dict, overrides: List[str], data_dir: str, base_dir: str,
               parent_dir: str, out_dir: str, cell: str = "") -> dict:
    """Components ``tune``, ``perturb``, ``recover``: :func:`components.runner.train`
    on the parent checkpoint artifact (in this process, or on Ray Train workers when the
    stage's ``scaling.num_workers`` asks for them); the new checkpoint written as an
    artifact.

    Returns:
        The stage's result (``checkpoint``, ``history``, ``n_items``, ``key``, ``reused``).
    """
    from components.runner import train

    cfg, home = _setup(config, overrides, "train")
    data = load_data(Path(data_dir))["data"]
    parent = import_checkpoint(Path(parent_dir), Path(base_dir))
    arm, n = None, None
    if kind == "recover":
        arm, n_text = cell.split("/")
        n = int(n_text)
    fit = None
    if getattr(cfg, kind).scaling.num_workers > 0:
        from pipelines.train_ray import fit_stage

        def fit(spec, tmp, key, on_step):
            return fit_stage(spec, tmp, Path(home) / "ray_train", key)
    result = train(kind, cfg, home, {"checkpoint": parent}, data, arm, n, fit=fit)
    stage = {k: v for k, v in result.items() if k not in ("checkpoint", "dir")}
    export_checkpoint(result["checkpoint"], Path(out_dir), stage)
    return result


def probe_step(config: dict, overrides: List[str], data_dir: str, base_dir: str, ckpt_dir: str,
               out_dir: str) -> dict:
    """Component ``probe``: :func:`components.runner.probe` on a checkpoint artifact;
    predictions and reference log-probs written as an artifact.

    Returns:
        The probe's result (``metrics``, ``knowledge_chance``, ``per_item``, ...).
    """
    from components.runner import probe

    cfg, home = _setup(config, overrides, "probe")
    data = load_data(Path(data_dir))["data"]
    ckpt = import_checkpoint(Path(ckpt_dir), Path(base_dir))
    stage = {"checkpoint": ckpt}
    trained = Path(ckpt_dir) / "stage.json"  # absent on the base model's artifact
    if trained.exists() and json.loads(trained.read_text()).get("context"):
        stage["context"] = json.loads(trained.read_text())["context"]  # in_context: the few-shot turns
    result = probe(cfg, home, stage, data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(result["dir"]).iterdir()):  # predictions, log-probs, probe features
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    _write_json(out / "stage.json", {k: v for k, v in result.items() if k != "dir"})
    return result


def verdict_step(config: dict, overrides: List[str], data_dir: str, base_dir: str,
                 trained: List[str], probed: List[str], out_dir: str, tracking_uri: str = "") -> dict:
    """Component ``verdict``: :func:`pipelines.audit.run_audit` over the stage artifacts.

    ``trained`` are the checkpoint artifacts of aligned, perturbed and every recovered
    cell; ``probed`` the probe artifacts of every checkpoint including base. The run
    folder (``summary.json``, ``metrics.parquet``, ...) is written into ``out_dir`` and
    recorded in MLflow.

    Returns:
        The ``summary.json`` content.

    Raises:
        RuntimeError: the artifacts do not cover the config's stages.
    """
    from pipelines.audit import run_audit, stage_order

    cfg, home = _setup(config, overrides, "probe")
    prepared = load_data(Path(data_dir))
    base = import_checkpoint(Path(base_dir), Path(base_dir))
    from components.models import model_source

    prep = {**prepared, "base": base, "model_dir": base["base_dir"],
            "model_source": model_source(cfg.model, Path(base["base_dir"]))}
    train, probe = {}, {}
    for d in map(Path, trained):
        stage = json.loads((d / "stage.json").read_text())
        ckpt = import_checkpoint(d, Path(base_dir))
        train[ckpt["name"]] = {**stage, "checkpoint": ckpt, "dir": str(d)}
    for d in map(Path, probed):
        stage = json.loads((d / "stage.json").read_text())
        probe[stage["checkpoint"]] = {**stage, "dir": str(d)}
    order = stage_order(cfg)
    if set(probe) != set(order) or set(train) != set(order) - {"base"}:
        raise RuntimeError(
            f"verdict: the stage artifacts cover {sorted(probe)}, the config asks for {order}"
        )

    def replay(cfg, home, on_event, on_progress=None) -> dict:
        on_event("prepare", "base", prep)
        for name in order:
            if name in train:
                on_event("train", name, train[name])
            on_event("probe", name, probe[name])
        # weight drift needs only the checkpoints: computed here, as the DAG's drift task does
        from components.runner import drift as weight_drift

        # an in_context stage has no weights of its own: no drift (as in the DAG)
        names = [n for n in order if n == "base" or not train[n].get("context")]
        stages = [{"checkpoint": base}] + [train[n] for n in names if n != "base"]
        drift = weight_drift(cfg, home, names, *stages)
        on_event("drift", "drift", drift)
        return {"prepare": prep, "train": train, "probe": probe, "drift": {"drift": drift}}

    return run_audit(cfg, Path(out_dir), home, tracking_uri or None, execute=replay)


def stage_metrics(result: dict) -> dict[str, float]:
    """The scalar metrics of a probe result, for a kfp ``Metrics`` artifact."""
    return {k: float(v["value"]) for k, v in result["metrics"].items() if v.get("value") is not None}


def verdict_metrics(summary: dict) -> dict[str, float]:
    """The verdict and per-stage values of a summary, flat, for a kfp ``Metrics`` artifact."""
    v = summary["verdict"]
    out = {"task_drop": v["task_drop"], "knowledge_retention": v["knowledge_retention"]}
    out.update({f"recovery_ratio/{k}": r for k, r in v["recovery_ratio"].items()})
    for name, st in summary["stages"].items():
        out.update({f"{name}/{k}": x for k, x in st.items() if isinstance(x, float)})
    return {k: float(x) for k, x in out.items() if x is not None}
