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

import pandas as pd

from components.artifacts import atomic_copy, atomic_write, git_commit
from components.config import AuditConfig, dump_yaml
from components.errors import UserError
from components.models import check_model_id
from components.verdict import STAGE_METRICS, assess  # noqa: F401 - STAGE_METRICS re-exported
from pipelines.tracking import AuditTracker, resolve_tracking_uri


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
    assessed = assess(results["probe"], order, cfg.verdict, cfg.probe.n_bootstrap, cfg.probe.ci_level, cfg.seed)
    stages, verdict, rows = assessed["stages"], assessed["verdict"], assessed["rows"]
    for name in order:
        if name in tracker.children:
            for k in ("kl_to_base", "kl_to_aligned"):
                tracker.client.log_metric(tracker.children[name], k, stages[name][k])

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

    vm = {"task_drop": verdict["task_drop"], "knowledge_retention": verdict["knowledge_retention"]}
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
