"""One audit from config to the files of the output contract and the MLflow records.

``run_audit`` wires the DAG (``pipelines.dag``), the MLflow tracker and the outputs:
``summary.json``, ``metrics.parquet``, ``predictions/<stage>.parquet``, ``config.yaml``,
``data_manifest.json``, ``plots/*.png`` and ``report.html`` in the run folder (DESIGN.md,
"Contract").
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
from components.metrics import drift_kl, summarise
from components.models import check_model_id
from components.verdict import compute_verdict
from pipelines.report import write_report
from pipelines.tracking import AuditTracker, resolve_tracking_uri

STAGE_METRICS = ("task_acc", "knowledge_acc", "first_token_prob", "perturb_acc", "kl_to_base", "kl_to_aligned")


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
    on_progress: Callable[[dict[str, dict]], None] | None = None,
    execute: Callable[..., dict] | None = None,
) -> dict:
    """Run one audit end to end and write the output contract into ``out_dir``.

    ``progress(message)`` receives one line per finished stage; ``on_progress(state)``
    the live step / item counts of every stage task (see :func:`pipelines.dag.run_dag`).
    Last, the figures (``plots/*.png``) and ``report.html`` are written
    (:func:`pipelines.report.write_report`) and logged on the parent MLflow run.

    ``execute(cfg, home, on_event, on_progress)`` produces the stage results and
    reports each one through ``on_event`` as it finishes; the default is the Ray DAG
    (:func:`pipelines.dag.run_dag`). The Kubeflow pipeline's last component passes one
    that reads the stage results from its input artifacts, so both routes write the
    same files and MLflow records from the same code.

    Returns:
        The ``summary.json`` content.

    Raises:
        UserError: bad input (unwritable folder, unreachable tracking store, too few
            known facts, ...), also when raised inside a Ray task.
    """
    from ray.exceptions import RayTaskError

    from pipelines.dag import run_dag

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
        results = (execute or run_dag)(cfg, home, on_event, on_progress)
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
    stages, rows = {}, []
    for name in order:
        p = results["probe"][name]
        m = dict(p["metrics"])
        m["kl_to_base"] = summarise(drift_kl(lp["base"], lp[name], lengths), **boot)
        m["kl_to_aligned"] = summarise(drift_kl(lp["aligned"], lp[name], lengths), **boot)
        st = {k: m[k]["value"] for k in STAGE_METRICS}
        st["knowledge_chance"] = chance
        st["ci"] = {k: [m[k]["ci_low"], m[k]["ci_high"]] for k in STAGE_METRICS}
        stages[name] = st
        for k in STAGE_METRICS:
            rows.append({"stage": name, "metric": k, "layer": None, "value": m[k]["value"],
                         "ci_low": m[k]["ci_low"], "ci_high": m[k]["ci_high"]})
        rows.append({"stage": name, "metric": "knowledge_chance", "layer": None, "value": chance,
                     "ci_low": None, "ci_high": None})
        if name in tracker.children:
            for k in ("kl_to_base", "kl_to_aligned"):
                tracker.client.log_metric(tracker.children[name], k, m[k]["value"])

    per_item = {name: results["probe"][name]["per_item"] for name in order if name != "base"}
    verdict = compute_verdict(per_item, chance, cfg.verdict, **boot)
    rows.append({"stage": "verdict", "metric": "task_drop", "layer": None, "value": verdict["task_drop"],
                 "ci_low": verdict["task_drop_ci"][0], "ci_high": verdict["task_drop_ci"][1]})
    rows.append({"stage": "verdict", "metric": "knowledge_retention", "layer": None,
                 "value": verdict["knowledge_retention"], "ci_low": verdict["knowledge_retention_ci"][0],
                 "ci_high": verdict["knowledge_retention_ci"][1]})
    for key, v in verdict["recovery_ratio"].items():
        lo, hi = verdict["recovery_ratio_ci"][key]
        rows.append({"stage": f"recovered/{key}", "metric": "recovery_ratio", "layer": None, "value": v,
                     "ci_low": lo, "ci_high": hi})
        lo, hi = verdict["knowledge_after_recovery_ci"][key]
        rows.append({"stage": f"recovered/{key}", "metric": "knowledge_after_recovery", "layer": None,
                     "value": verdict["knowledge_after_recovery"][key], "ci_low": lo, "ci_high": hi})

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

    try:
        say("writing the report")
        write_report(out_dir)
    except BaseException:
        tracker.client.set_terminated(tracker.parent_id, status="FAILED")
        raise

    vm = {"task_drop": verdict["task_drop"], "knowledge_retention": verdict["knowledge_retention"]}
    vm.update({f"recovery_ratio/{k}": v for k, v in verdict["recovery_ratio"].items()})
    for name, st in stages.items():
        vm.update({f"{name}/{k}": v for k, v in st.items() if isinstance(v, float)})
    tracker.finish(
        vm,
        [out_dir / "summary.json", out_dir / "metrics.parquet", out_dir / "config.yaml",
         out_dir / "data_manifest.json", out_dir / "predictions", out_dir / "plots", out_dir / "report.html"],
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
