"""One audit from config to the files of the output contract and the MLflow records.

``run_audit`` wires the DAG (``pipelines.dag``), the MLflow tracker and the outputs:
``summary.json``, ``metrics.parquet``, ``predictions/<stage>.parquet``, ``config.yaml``
and ``data_manifest.json`` in the run folder (DESIGN.md, "Contract").
"""

from __future__ import annotations

import io
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from components.artifacts import atomic_copy, atomic_write, git_commit
from components.config import AuditConfig, dump_yaml
from components.errors import UserError
from components.metrics import drift_kl, summarise, transitions
from components.models import check_model_id
from components.verdict import compute_verdict
from pipelines.tracking import AuditTracker, resolve_tracking_uri

STAGE_METRICS = ("task_acc", "knowledge_acc", "first_token_prob", "perturb_acc", "kl_to_base", "kl_to_aligned")
# per-item transitions from the stage a checkpoint was trained from (Harmon et al. 2025)
TRANSITION_METRICS = ("task_correct_to_wrong", "task_wrong_to_correct",
                      "knowledge_correct_to_wrong", "knowledge_wrong_to_correct")


def default_home() -> Path:
    """The project's run folder: ``$CL_AUDIT_HOME`` or ``./runs`` (absolute)."""
    return Path(os.environ.get("CL_AUDIT_HOME", "runs")).resolve()


def check_writable(out_dir: Path) -> None:
    """Raise UserError unless ``out_dir`` can be created and written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UserError(f"--out {out_dir}: output folder not writable ({e.strerror})") from None


def stage_order(cfg: AuditConfig) -> list[str]:
    """Checkpoint names in DAG order."""
    rec = [f"recovered/{a}/{n}" for a in cfg.recover.arms for n in cfg.recover.sizes]
    return ["base", "aligned", "perturbed", *rec]


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the numbers depend on."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "ray", "mlflow", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_audit(
    cfg: AuditConfig,
    out_dir: Path,
    home: Path | None = None,
    tracking_uri: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run one audit end to end and write the output contract into ``out_dir``.

    Returns:
        The ``summary.json`` content.

    Raises:
        UserError: bad input (unwritable folder, unreachable tracking store, too few
            known facts, ...), also when raised inside a Ray task.
    """
    from ray.exceptions import RayTaskError

    from pipelines.dag import parent_stage, run_dag

    home = Path(home or default_home()).resolve()
    out_dir = Path(out_dir).resolve()
    check_writable(out_dir)
    uri = resolve_tracking_uri(tracking_uri, home)
    check_model_id(cfg.model)
    tracker = AuditTracker(uri, cfg.experiment)
    say = progress or (lambda msg: None)
    order = stage_order(cfg)
    vers = versions()
    trained: dict[str, dict] = {}
    probed: dict[str, dict] = {}
    logged: set[str] = set()
    prep_box: dict = {}

    def on_event(kind: str, name: str, result: dict) -> None:
        if kind == "drift":
            say("measured weight drift" + (" (reused)" if result.get("reused") else ""))
            return
        if kind == "prepare":
            # The parent run starts once the model and data are known to be good, so a
            # bad model path or data set leaves no run behind.
            prep_box.update(result)
            n = result["data"].notes
            say(f"model ready; {n['n_known']} of {n['n_items']} facts known to the base model")
            tracker.start(
                f"audit-{cfg.suite}-{cfg.digest()[:8]}",
                cfg.model_dump(mode="json"),
                {"cl_audit.suite": cfg.suite, "cl_audit.config_digest": cfg.digest(), "git_commit": git_commit(),
                 "cl_audit.seed": str(cfg.seed), "model_digest": result["model_digest"],
                 "data_digest": result["data_digest"], **{f"version.{k}": v for k, v in vers.items()}},
            )
            return
        (trained if kind == "train" else probed)[name] = result
        what = "trained" if kind == "train" else "probed"
        reused = " (reused)" if result.get("reused") else f" in {result.get('seconds', 0):.0f} s"
        say(f"{what} {name}{reused}")
        if name in logged or name not in probed or (name != "base" and name not in trained):
            return
        logged.add(name)
        t = trained.get(name, {})
        p = probed[name]
        params = {"checkpoint": name, **_stage_params(cfg, name), "n_train_items": t.get("n_items", 0)}
        arts = {"": Path(p["dir"]) / "predictions.parquet", "probe": Path(p["dir"]) / "probe.json"}
        if t.get("checkpoint", {}).get("adapters"):
            arts["adapter"] = Path(t["checkpoint"]["adapters"][-1])
        tracker.stage(
            name, params, t.get("history", []),
            {k: v["value"] for k, v in p["metrics"].items()},
            arts, tags={"cl_audit.store_key": p["key"], "cl_audit.reused": str(bool(t.get("reused")))},
        )

    try:
        results = run_dag(cfg, home, on_event)
    except BaseException as e:
        if tracker.parent_id is not None:
            tracker.client.set_terminated(tracker.parent_id, status="FAILED")
        cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else None
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise

    prep = results["prepare"]
    data = prep["data"]
    chance = results["probe"]["base"]["knowledge_chance"]
    boot = dict(n_boot=cfg.probe.n_bootstrap, level=cfg.probe.ci_level, seed=cfg.seed)
    from components.probe import load_ref_logprobs

    lp = {name: load_ref_logprobs(Path(results["probe"][name]["dir"])) for name in order}
    lengths = np.array(results["probe"]["base"]["answer_tokens"])
    drift = results["drift"]["drift"]
    probe_info = results["probe"]["base"].get("probe")
    probe_chance = probe_info["chance"] if probe_info else None
    stages, rows = {}, []

    def row(stage: str, metric: str, value, ci=(None, None), layer=None) -> None:
        rows.append({"stage": stage, "metric": metric, "layer": layer, "value": value,
                     "ci_low": ci[0], "ci_high": ci[1]})

    for name in order:
        p = results["probe"][name]
        m = dict(p["metrics"])
        m["kl_to_base"] = summarise(drift_kl(lp["base"], lp[name], lengths), **boot)
        m["kl_to_aligned"] = summarise(drift_kl(lp["aligned"], lp[name], lengths), **boot)
        parent = parent_stage(name)
        if parent is not None:
            before, after = results["probe"][parent]["per_item"], p["per_item"]
            for what in ("task", "knowledge"):
                tr = transitions(before[f"{what}_correct"], after[f"{what}_correct"], **boot)
                m.update({f"{what}_{k}": v for k, v in tr.items()})
        scalars = [k for k in (*STAGE_METRICS, *TRANSITION_METRICS) if k in m]
        st = {k: m[k]["value"] for k in scalars}
        st["knowledge_chance"] = chance
        st["ci"] = {k: [m[k]["ci_low"], m[k]["ci_high"]] for k in scalars}
        if parent is not None:
            st["transitions_from"] = parent
        for k in scalars:
            row(name, k, m[k]["value"], (m[k]["ci_low"], m[k]["ci_high"]))
        row(name, "knowledge_chance", chance)
        # per layer: probes (CI over items), weight drift and update angles (exact, no CI)
        per_layer = {}
        if p.get("probe_acc"):
            per_layer["probe_acc"] = {lay: v["value"] for lay, v in p["probe_acc"].items()}
            st["ci"]["probe_acc"] = {lay: [v["ci_low"], v["ci_high"]] for lay, v in p["probe_acc"].items()}
            st["probe_chance"] = p["probe"]["chance"]
            for lay, v in p["probe_acc"].items():
                row(name, "probe_acc", v["value"], (v["ci_low"], v["ci_high"]), int(lay))
            row(name, "probe_chance", p["probe"]["chance"])
        if name in drift["weight_drift"]:
            per_layer["weight_drift"] = drift["weight_drift"][name]
        if name == "perturbed":
            for k in ("principal_angle_mean", "principal_angle_min"):
                if drift[k]:
                    per_layer[k] = drift[k]
        for k, by_layer in per_layer.items():
            st[k] = by_layer
            if k != "probe_acc":
                for lay, v in by_layer.items():
                    row(name, k, v, layer=int(lay))
        stages[name] = st
        if name in tracker.children:
            tracker.extra_metrics(name, {k: m[k]["value"] for k in ("kl_to_base", "kl_to_aligned", *TRANSITION_METRICS)
                                         if k in m}, per_layer)

    per_item = {name: results["probe"][name]["per_item"] for name in order if name != "base"}
    verdict = compute_verdict(per_item, chance, cfg.verdict, **boot, probe_chance=probe_chance)
    for k in ("task_drop", "knowledge_retention", "probe_retention"):
        row("verdict", k, verdict[k], verdict[f"{k}_ci"])
    for key, v in verdict["recovery_ratio"].items():
        row(f"recovered/{key}", "recovery_ratio", v, verdict["recovery_ratio_ci"][key])
        row(f"recovered/{key}", "knowledge_after_recovery", verdict["knowledge_after_recovery"][key],
            verdict["knowledge_after_recovery_ci"][key])

    summary = {
        "suite": cfg.suite,
        "model": cfg.model.id,
        "config_digest": cfg.digest(),
        "model_digest": prep["model_digest"],
        "data_digest": prep["data_digest"],
        "seed": cfg.seed,
        "versions": vers,
        "data": data.notes,
        "stages": stages,
        "verdict": verdict,
        "mlflow": {"tracking_uri": uri, "experiment_id": tracker.experiment_id, "run_id": tracker.parent_id},
    }

    # Outputs: each file written to a temporary name, fsynced and renamed.
    metrics_df = pd.DataFrame(rows, columns=["stage", "metric", "layer", "value", "ci_low", "ci_high"])
    metrics_df["layer"] = metrics_df["layer"].astype("Int64")
    buf = io.BytesIO()
    metrics_df.to_parquet(buf, index=False)
    atomic_write(out_dir / "metrics.parquet", buf.getvalue())
    for name in order:
        atomic_copy(Path(results["probe"][name]["dir"]) / "predictions.parquet",
                    out_dir / "predictions" / f"{name}.parquet")
    atomic_write(out_dir / "config.yaml", dump_yaml(cfg))
    manifest = {"suite": cfg.suite, "data_digest": prep["data_digest"], "pools": data.manifest(),
                "model": {"id": cfg.model.id, "dir": prep["model_dir"], "sha256": prep["model_digest"]}}
    atomic_write(out_dir / "data_manifest.json", json.dumps(manifest, indent=2))
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2))

    vm = {k: verdict[k] for k in ("task_drop", "knowledge_retention", "probe_retention")}
    vm.update({f"recovery_ratio/{k}": v for k, v in verdict["recovery_ratio"].items()})
    for name, st in stages.items():
        vm.update({f"{name}/{k}": v for k, v in st.items() if isinstance(v, float)})
    tracker.finish(
        vm,
        [out_dir / "summary.json", out_dir / "metrics.parquet", out_dir / "config.yaml",
         out_dir / "data_manifest.json", out_dir / "predictions"],
        {"verdict": verdict["label"]},
    )
    return summary


def _stage_params(cfg: AuditConfig, name: str) -> dict:
    if name == "aligned":
        return {"stage": "tune", **cfg.tune.model_dump()}
    if name == "perturbed":
        return {"stage": "perturb", **cfg.perturb.model_dump()}
    if name.startswith("recovered/"):
        _, arm, n = name.split("/")
        return {"stage": "recover", "arm": arm, "n": int(n), **cfg.recover.model_dump(exclude={"arms", "sizes"})}
    return {"stage": "base"}
