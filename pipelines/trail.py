"""The audit trail, read back: ``verify`` a finished audit against its manifest, list past
audits (``history``), and ``compare`` two audits.

An audit is named either by its run folder (``summary.json``, ``manifest.json`` ...) or
by the MLflow run id of its parent run; the artifacts are then downloaded from the
tracking store. Nothing here writes to the store or to the run folder.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from components.artifacts import check_file, flatten
from components.errors import UserError
from components.stats import holm, normal_p
from components.verdict import KNOWLEDGE_MEASURES, STAGE_METRICS, bootstrap_diff, quantities
from pipelines.tracking import RUN_ID, download, find_audits, get_audit_run, open_store
from pipelines.mlflow_env import redact_uri

MANIFEST = "manifest.json"
# Per-checkpoint metrics that are means of a per-item column of predictions/<stage>.parquet
# (the knowledge measures and gold_logprob are columns of their own name).
PER_ITEM = {"task_acc": "task_correct", "first_token_prob": "first_token_prob",
            **{m: m for m in (*KNOWLEDGE_MEASURES, "gold_logprob")}}
# 10000 resamples: the smallest bootstrap p-value, 2 / 10001, stays below Holm's first
# threshold 0.05 / m for up to 250 compared quantities (a default audit has about 100).
N_BOOT = 10000
LEVEL = 0.95
CORRECTION = "holm"
RULE_CIS = "normal approx. of the CIs"


def classify(target: str) -> str:
    """``folder`` (an existing directory) or ``run`` (a 32-hex MLflow run id).

    Raises:
        UserError: neither.
    """
    if Path(target).is_dir():
        return "folder"
    if RUN_ID.match(target):
        return "run"
    raise UserError(f"{target}: neither a run folder nor an MLflow run id (32 hex digits)")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: not found; expected the {what} of a finished audit")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """What ``cl-audit verify`` found.

    Attributes:
        where: the audit, in words (run folder or MLflow run and store).
        checked: files checked against the manifest.
        mismatches: ``(path, why)`` for every file whose size or sha256 differs, that
            is missing, or that lies outside the run folder and the stage store (not
            read); ``manifest.json`` itself when it differs from the digest recorded on
            the audit's MLflow run, or when that digest cannot be checked (unless
            unanchored manifests are allowed).
        notes: remarks that do not fail the check (files added after the audit, the
            anchor checked, an unanchored manifest that was allowed).
    """

    where: str
    checked: int = 0
    mismatches: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _anchor(report: VerifyReport, run, manifest_bytes: bytes) -> str | None:
    """Check manifest.json against the sha256 recorded on the audit's MLflow run.

    Returns:
        None when the digest was checked (a mismatch is added when it differs), else why
        it could not be (no digest recorded on the run).
    """
    want = run.data.tags.get("cl_audit.manifest_sha256")
    got = hashlib.sha256(manifest_bytes).hexdigest()
    if want is None:
        return f"no digest recorded on MLflow run {run.info.run_id}"
    if got != want:
        report.mismatches.append(
            (MANIFEST, f"sha256 {got[:16]}... != {want[:16]}... recorded on MLflow run {run.info.run_id}"))
    else:
        report.notes.append(f"manifest.json matches the sha256 recorded on MLflow run {run.info.run_id}")
    return None


def _unanchored(report: VerifyReport, why: str | None, allow: bool) -> None:
    """An anchor that could not be checked (``why``) fails the check unless ``allow``:
    a manifest rewritten together with the files it lists would otherwise pass."""
    if why is None:
        return
    if allow:
        report.notes.append(f"manifest.json not anchored ({why}); checked against itself only (--allow-unanchored)")
    else:
        report.mismatches.insert(0, (MANIFEST, (f"not anchored ({why}); the files cannot be trusted to be the "
                                                "audit's; --allow-unanchored checks them against this manifest alone")))


def verify(target: str, tracking_uri: str | None = None, allow_unanchored: bool = False,
           store: Path | None = None) -> VerifyReport:
    """Check every artifact of an audit against its manifest (sha256 and size).

    The manifest itself is checked against the sha256 recorded on the audit's MLflow
    run (its anchor) in the store the caller trusts: a manifest rewritten together with
    the files it lists differs from it. A run the manifest names that is not an audit in
    that store fails the check. When the digest cannot be checked (the store
    unreachable, no run named, no digest recorded) the check fails, unless
    ``allow_unanchored``.

    No file outside the run folder and the stage store is read: a manifest entry whose
    ``local`` path lies outside ``store``, or a run-folder entry that leads out of the
    folder (a symbolic link), is a mismatch.

    Args:
        target: a run folder (its files are read; stage artifacts from the stage store
            paths the manifest names) or an audit's MLflow run id (every artifact is
            downloaded from the tracking store).
        tracking_uri: the store of a run id; for a folder, the store trusted to anchor
            its manifest (default: ``MLFLOW_TRACKING_URI``, else the sqlite store of
            ``CL_AUDIT_HOME``). The store the manifest itself names is never used, nor
            opened: a forger can name a store of his own.
        allow_unanchored: accept a manifest whose digest cannot be checked (a note).
        store: the stage store of a run folder's stage artifacts (default: ``store/``
            of ``CL_AUDIT_HOME``, as for ``cl-audit run``).

    Raises:
        UserError: no manifest, an unreadable one, an entry that escapes the run folder,
            an unknown run or store; a run folder whose stage artifacts all lie in
            another stage store than ``store`` (the audit used another ``CL_AUDIT_HOME``).
    """
    if classify(target) == "folder":
        from pipelines.audit import default_home
        from pipelines.tracking import resolve_tracking_uri

        if store is None:
            store = default_home() / "store"
        trusted = resolve_tracking_uri(tracking_uri, default_home())
        return _verify_folder(Path(target).resolve(), trusted, allow_unanchored, Path(store).resolve())
    if tracking_uri is None:
        raise UserError(f"{target}: an MLflow run id needs --tracking-uri (or MLFLOW_TRACKING_URI)")
    return _verify_run(target, tracking_uri, allow_unanchored)


def _entries(manifest: dict, where: str) -> list[dict]:
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and {"path", "sha256", "size"} <= set(f)
                                              for f in files):
        raise UserError(f"{where}: manifest.json: expected 'files', a list of {{path, sha256, size}}")
    for i, f in enumerate(files):
        for key in ("path", "artifact_path"):
            rel = f.get(key)
            if rel is not None and (not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts):
                raise UserError(f"{where}: manifest.json: files[{i}].{key}: {rel!r} escapes the run folder; "
                                "expected a relative path without '..'")
    return files


def _confined(e: dict, folder: Path, store: Path) -> tuple[Path | None, str | None]:
    """The file a manifest entry of a run folder names, and None; or None and why it is
    not read (it lies outside the run folder and the stage store)."""
    if e.get("local"):
        local = Path(e["local"])
        real = local.resolve() if local.is_absolute() else None
        if real is None or not any(real.is_relative_to(root) for root in (store, folder)):
            return None, f"{local} is outside the run folder and the stage store {store}; not read"
        return real, None
    path = folder / e["path"]
    if not path.resolve().is_relative_to(folder):
        return None, f"{path} leads outside the run folder {folder}; not read"
    return path, None


def _verify_folder(folder: Path, tracking_uri: str | None, allow_unanchored: bool, store: Path) -> VerifyReport:
    mpath = folder / MANIFEST
    manifest = _read_json(mpath, "manifest.json")
    report = VerifyReport(f"run folder {folder}")
    entries = _entries(manifest, str(mpath))
    _same_home(entries, folder, store, mpath)
    for e in entries:
        path, why = _confined(e, folder, store)
        why = why or check_file(path, e)
        if why:
            report.mismatches.append((e["path"], why))
    report.checked = len(entries)
    if any(why == "missing" and e.get("local") for e in entries for p, why in report.mismatches if p == e["path"]):
        report.notes.append("stage artifacts are read from the stage store paths in the manifest; on another "
                            "machine verify the MLflow run id instead (its logged copies are downloaded)")
    listed = {e["path"] for e in entries}
    extra = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not any(s.startswith(".") for s in p.relative_to(folder).parts)
             and p.relative_to(folder).as_posix() not in listed]
    if extra:
        report.notes.append(f"{len(extra)} file(s) not in the manifest (added after the audit): {', '.join(extra)}")
    run_id = manifest.get("audit_run_id")
    named = manifest.get("tracking_uri")
    shown = redact_uri(tracking_uri)
    if named and named != shown:
        report.notes.append(f"the manifest names the tracking store {named}; anchored against {shown}, the one "
                            "trusted here (--tracking-uri, MLFLOW_TRACKING_URI or CL_AUDIT_HOME)")
    why = None
    if not isinstance(run_id, str) or not RUN_ID.match(run_id):
        why = "it names no MLflow run"
    else:
        try:
            client = open_store(tracking_uri)
        except UserError as e:
            why = str(e)
        else:
            try:
                run = get_audit_run(client, run_id)
            except UserError as e:  # not an audit in the trusted store: evidence, not a gap
                report.mismatches.insert(0, (MANIFEST, (
                    f"{e}; the manifest is not anchored in the store trusted here (if the audit was recorded "
                    "elsewhere, pass that store's --tracking-uri)")))
            else:
                why = _anchor(report, run, mpath.read_bytes())
    _unanchored(report, why, allow_unanchored)
    return report


def _same_home(entries: list[dict], folder: Path, store: Path, mpath: Path) -> None:
    """Refuse, in one line, a run folder whose stage artifacts all lie in one other
    stage store (``<home>/store``): the audit ran with another ``CL_AUDIT_HOME``, and a
    mismatch per file would read as tampering."""
    outside = [Path(e["local"]) for e in entries if e.get("local") and Path(e["local"]).is_absolute()
               and not any(Path(e["local"]).resolve().is_relative_to(r) for r in (store, folder))]
    if not outside or len(outside) < sum(1 for e in entries if e.get("local")):
        return
    roots = set()
    for p in outside:
        parts = p.parts
        roots.add(Path(*parts[:max(i for i, x in enumerate(parts) if x == "store") + 1]) if "store" in parts else None)
    if len(roots) == 1 and None not in roots:
        [other] = roots
        raise UserError(f"{mpath}: the audit's stage artifacts are in the stage store {other}, not in {store} "
                        f"(CL_AUDIT_HOME); run verify with CL_AUDIT_HOME={other.parent}, or verify the audit's "
                        "MLflow run id")


def _verify_run(run_id: str, uri: str, allow_unanchored: bool) -> VerifyReport:
    client = open_store(uri)
    run = get_audit_run(client, run_id)
    report = VerifyReport(f"MLflow run {run_id} ({uri})")
    with tempfile.TemporaryDirectory(prefix="cl-audit-verify-") as tmp:
        got = download(client, run_id, MANIFEST, Path(tmp) / "m")
        if got is None:
            raise UserError(f"run {run_id}: no {MANIFEST} artifact (an audit from before manifests?)")
        raw = got.read_bytes()
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"run {run_id}: {MANIFEST} is not valid JSON ({e})") from None
        unanchored = _anchor(report, run, raw)
        entries = _entries(manifest, f"run {run_id}")
        roots: dict[str, Path | None] = {}
        for e in entries:
            rid = e.get("run_id") or run_id
            if rid not in roots:  # one download per run: its whole artifact tree
                roots[rid] = download(client, rid, "", Path(tmp) / rid)
            root = roots[rid]
            why = check_file(root / e.get("artifact_path", e["path"]) if root else None, e)
            if why:
                report.mismatches.append((e["path"], why))
        report.checked = len(entries)
    _unanchored(report, unanchored, allow_unanchored)
    return report


# ----------------------------------------------------------------------------- history


# params every row shows in a column of its own (not among the differing settings)
OWN_COLUMNS = ("model.id", "seed")


def history(uri: str, suite: str | None = None, model: str | None = None, limit: int = 50) -> list[dict]:
    """Past audits and sweeps in a tracking store, newest first, one dict per run.

    Keys: ``kind`` (``audit`` or ``sweep``), ``date`` (local time of the start),
    ``run_id``, ``model``, ``suite``, ``seed``, ``params`` (the run's resolved config, the
    flattened params MLflow holds), ``differs`` (``{param: value}`` of every param whose
    value is not the same in all the listed runs, seed and model.id aside: see
    :func:`differing_params`), ``verdict``, ``task_drop``, ``knowledge_retention``,
    ``best_recovery`` (an audit: the largest recovery ratio and its ``arm/n``, ties: the
    first ``arm/n`` in alphabetical order; a sweep: its best trial's objective value),
    ``trials`` (a sweep's finished trials; None for an audit).

    Raises:
        UserError: the store does not exist or cannot be reached.
    """
    client = open_store(uri)
    found = [r for kind in ("audit", "sweep") for r in find_audits(client, suite, model, limit, kind)]
    found.sort(key=lambda r: r.info.start_time, reverse=True)
    rows = []
    for r in found[:limit]:
        p, m, tags = r.data.params, r.data.metrics, r.data.tags
        kind = tags.get("cl_audit.kind", "audit")
        if kind == "sweep":
            metric = p.get("sweep.metric", "?")
            best = m.get(f"best_{metric}")
            best_txt = f"{best:.2f} {metric}" if best is not None and np.isfinite(best) else "-"
        else:
            rec = {k.removeprefix("recovery_ratio/"): v for k, v in sorted(m.items())
                   if k.startswith("recovery_ratio/") and v is not None and np.isfinite(v)}
            top = max(rec.items(), key=lambda kv: kv[1]) if rec else None
            best_txt = f"{top[1]:.2f} {top[0]}" if top else "-"
        rows.append({
            "kind": kind,
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000)),
            "run_id": r.info.run_id,
            "model": p.get("model.id", "?"),
            "suite": tags.get("cl_audit.suite", "?"),
            "seed": p.get("seed", tags.get("cl_audit.seed", "?")),
            "params": dict(sorted(p.items())),
            "verdict": tags.get("verdict", "-" if kind == "sweep" else "?"),
            "task_drop": m.get("task_drop"),
            "knowledge_retention": m.get("knowledge_retention"),
            "best_recovery": best_txt,
            "trials": int(m["trials_finished"]) if kind == "sweep" and "trials_finished" in m else None,
        })
    keys = differing_params(rows)
    for row in rows:
        row["differs"] = {k: row["params"].get(k) for k in keys}
    return rows


def differing_params(rows: list[dict]) -> list[str]:
    """The params (resolved config fields) whose value is not the same in every row of
    :func:`history` (missing in some counts as different), in name order, without
    ``seed`` and ``model.id`` (columns of their own). Empty for fewer than two rows.

    A field that is logged only where it applies (:data:`APPLIES_ONLY`: ``sweep.*`` on a
    sweep, ``model.tiny_*`` for ``tiny-llama`` ...) is compared among the rows that
    have it: its absence says the field does not apply, not that it differs."""
    if len(rows) < 2:
        return []
    names = sorted({k for r in rows for k in r["params"]} - set(OWN_COLUMNS))
    out = []
    for k in names:
        have = [r["params"][k] for r in rows if k in r["params"]]
        if k.startswith(APPLIES_ONLY):
            differs = len(set(have)) > 1
        else:
            differs = len({r["params"].get(k) for r in rows}) > 1
        if differs:
            out.append(k)
    return out


# params a run logs only where they apply (pipelines.tracking.applicable_params)
APPLIES_ONLY = ("sweep.", "biography.", "model.tiny_", "data.files")


# ----------------------------------------------------------------------------- compare


@dataclass
class Audit:
    """One audit loaded for comparison: its summary, flattened config and predictions."""

    name: str
    run_id: str | None
    date: str
    summary: dict
    config: dict
    predictions: dict[str, pd.DataFrame]


def load_audit(target: str, tracking_uri: str | None) -> Audit:
    """Load an audit from its run folder or (downloading) its MLflow parent run.

    Raises:
        UserError: not a run folder or run id, or summary.json / config.yaml missing.
    """
    if classify(target) == "folder":
        return _load_folder(Path(target).resolve(), target)
    if tracking_uri is None:
        raise UserError(f"{target}: an MLflow run id needs --tracking-uri (or MLFLOW_TRACKING_URI)")
    client = open_store(tracking_uri)
    run = get_audit_run(client, target)
    with tempfile.TemporaryDirectory(prefix="cl-audit-compare-") as tmp:
        for art in ("summary.json", "config.yaml", "predictions"):
            download(client, target, art, Path(tmp))
        audit = _load_folder(Path(tmp), target)
    audit.run_id = target
    audit.date = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
    return audit


def _load_folder(folder: Path, name: str) -> Audit:
    summary = _read_json(folder / "summary.json", "summary.json")
    cpath = folder / "config.yaml"
    if not cpath.is_file():
        raise UserError(f"{cpath}: not found; expected the resolved config of a finished audit")
    try:
        config = flatten(yaml.safe_load(cpath.read_text()) or {})
    except yaml.YAMLError as e:
        raise UserError(f"{cpath}: invalid YAML ({e})") from None
    preds = {}
    for stage in summary.get("stages", {}):
        p = folder / "predictions" / f"{stage}.parquet"
        if p.is_file():
            preds[stage] = pd.read_parquet(p)
    created = None
    if (folder / MANIFEST).is_file():
        created = json.loads((folder / MANIFEST).read_text()).get("created")
    date = created.replace("T", " ")[:16] + " UTC" if created else "-"
    return Audit(name, summary.get("mlflow", {}).get("run_id"), date, summary, config, preds)


@dataclass
class Comparison:
    """``cl-audit compare``: two audits side by side.

    Attributes:
        a, b: the audits.
        config_diff: ``(key, value in A, value in B)`` for every config field that differs.
        rows: per metric ``{"stage", "metric", "a", "a_ci", "b", "b_ci", "diff", "diff_ci",
            "significant", "rule"}``: every per-checkpoint metric either summary holds,
            then the verdict's quantities (``task_drop``, ``knowledge_retention`` by the
            deciding measure when both audits used the same, ``retention:<measure>``
            for every knowledge measure either verdict carries, ``tune_change`` and
            ``gold_logprob_change`` when both carry them, ``recovery_ratio`` and
            ``knowledge_after_recovery`` per common recovered checkpoint), computed by
            :func:`components.verdict.quantities` and None where a ratio is undefined
            (its denominator <= 0), as in the verdict; ``rule`` is ``paired bootstrap`` (same items,
            resampled together), ``bootstrap`` (different items, resampled separately)
            or ``normal approx. of the CIs`` (no per-item values: a Wald test from the two
            CIs, :func:`components.stats.normal_p`). Each row also holds ``p`` (its
            two-sided p-value, None where the difference is undefined),
            ``p_adjusted`` (Holm's adjustment over every row with a p-value) and
            ``significant_uncorrected`` (p < alpha alone); ``significant`` is
            ``p_adjusted < alpha``: the correction controls the chance of calling any
            difference significant when none is (family-wise error) at alpha.
        paired: whether both audits scored the same evaluation items.
        correction: the multiple-comparison correction, ``"holm"``.
        alpha: the family-wise error rate, 1 - the CI level (0.05).
        tests: the rows with a p-value (the family the correction spans).
    """

    a: Audit
    b: Audit
    config_diff: list[tuple[str, object, object]]
    rows: list[dict]
    paired: bool
    correction: str = CORRECTION
    alpha: float = 1 - LEVEL
    tests: int = 0

    def as_json(self) -> dict:
        """The comparison as JSON-able data (``cl-audit compare --json``): both audits
        (name, MLflow run id, date, model, suite, verdict label), the config
        differences, the rows, and the correction (method, alpha, tests, how many
        differences are significant after and before it)."""
        def audit(au: Audit) -> dict:
            return {"name": au.name, "run_id": au.run_id, "date": au.date, "model": au.summary.get("model"),
                    "suite": au.summary.get("suite"), "verdict": au.summary.get("verdict", {}).get("label")}

        return {
            "a": audit(self.a), "b": audit(self.b), "paired": self.paired,
            "config_diff": [{"field": k, "a": va, "b": vb} for k, va, vb in self.config_diff],
            "correction": {"method": self.correction, "alpha": self.alpha, "tests": self.tests,
                           "significant": sum(1 for r in self.rows if r["significant"]),
                           "significant_uncorrected": sum(1 for r in self.rows if r["significant_uncorrected"])},
            "rows": self.rows,
        }


def _arrays(audit: Audit, stages: list[str], ids: list[str] | None) -> tuple[dict, int]:
    """Per-item arrays ``"<stage>/<column>"`` of an audit (rows ordered as ``ids``) and N.

    Columns: ``task_correct``, ``first_token_prob`` and every knowledge measure and
    ``gold_logprob`` the predictions carry; predictions from before the knowledge
    measures (only ``knowledge_correct``) give it as ``knowledge_acc``.
    """
    out: dict = {}
    n = 0
    for st in stages:
        df = audit.predictions[st]
        if ids is not None:
            df = df.set_index("item_id").loc[ids].reset_index()
        for col in dict.fromkeys(PER_ITEM.values()):
            if col in df.columns:
                out[f"{st}/{col}"] = df[col].to_numpy(dtype=float)
        if f"{st}/knowledge_acc" not in out and "knowledge_correct" in df.columns:
            out[f"{st}/knowledge_acc"] = df["knowledge_correct"].to_numpy(dtype=float)
        n = len(df)
    return out, n


def _mean(key: str):
    return lambda arr, ix: arr[key][ix].mean(-1)


def _chances(audit: Audit) -> dict:
    """The chance level of each knowledge measure the audit's verdict used: its
    ``verdict.knowledge_chances``, or ``{"knowledge_acc": knowledge_chance}`` for an
    audit from before the knowledge measures."""
    v = audit.summary.get("verdict", {})
    if v.get("knowledge_chances"):
        return dict(v["knowledge_chances"])
    return {"knowledge_acc": v.get("knowledge_chance", audit.summary["stages"]["base"].get("knowledge_chance"))}


def _verdict_stat(key: tuple[str, str]):
    """``stat(arrays, ix)`` for :func:`components.verdict.bootstrap_diff`: the verdict's
    quantity ``key`` (:func:`components.verdict.quantities`, the one definition the
    verdict uses) from the audit's per-item arrays; each audit's arrays carry its own
    quantities (its chance levels) under ``"quantities"``."""
    def stat(arrays: dict, ix: np.ndarray) -> np.ndarray:
        return np.asarray(arrays["quantities"][key](lambda st, m: arrays[f"{st}/{m}"][ix].mean(-1)), float)
    return stat


def _verdict_value(v: dict, key: tuple[str, str]) -> tuple:
    """The value and CI a summary's verdict holds for row ``key`` (None, None where it
    holds none); ``knowledge_retention`` and ``knowledge_after_recovery`` are those of
    the verdict's deciding measure."""
    st, name = key
    if st != "verdict":  # recovery_ratio, knowledge_after_recovery (the deciding measure)
        k = st.removeprefix("recovered/")
        return v.get(name, {}).get(k), v.get(f"{name}_ci", {}).get(k)
    if name in ("task_drop", "knowledge_retention"):
        return v.get(name), v.get(f"{name}_ci")
    if name.startswith("retention:"):
        m = name.removeprefix("retention:")
        if "retention" not in v:  # a verdict from before the knowledge measures: knowledge_acc alone
            old = m == "knowledge_acc"
            return (v.get("knowledge_retention"), v.get("knowledge_retention_ci")) if old else (None, None)
        r = v["retention"].get(m)
        return (r["value"], r["ci"]) if r else (None, None)
    r = v.get(name)
    return (r["value"], r["ci"]) if isinstance(r, dict) else (None, None)


def compare(target_a: str, target_b: str, tracking_uri: str | None = None) -> Comparison:
    """Compare two audits: config differences and every metric with its CI, with the
    difference B - A, its CI and whether it is significant.

    The rule: when both audits have per-item predictions, a bootstrap of the difference
    over the evaluation items (:func:`components.verdict.bootstrap_diff`, 10000
    resamples, 95% CI and a two-sided p-value), paired when both scored the same items
    (the same item ids: the same resampled items in both audits, which resamples the
    per-item differences), unpaired otherwise. Metrics without per-item values
    (``perturb_acc``, ``kl_to_*``) get a p-value from the two 95% CIs (a Wald test).
    Every p-value then goes through Holm's correction (:func:`components.stats.holm`)
    across all the rows: a difference is significant when its adjusted p < 0.05, so
    two audits that differ only by chance show none, with probability >= 95%.

    Raises:
        UserError: either audit cannot be loaded.
    """
    a, b = load_audit(target_a, tracking_uri), load_audit(target_b, tracking_uri)
    keys = sorted(set(a.config) | set(b.config))
    config_diff = [(k, a.config.get(k), b.config.get(k)) for k in keys if a.config.get(k) != b.config.get(k)]
    stages = [s for s in a.summary["stages"] if s in b.summary["stages"]]
    have = [s for s in stages if s in a.predictions and s in b.predictions]
    ids_a = list(a.predictions[have[0]]["item_id"]) if have else []
    ids_b = list(b.predictions[have[0]]["item_id"]) if have else []
    paired = bool(have) and sorted(ids_a) == sorted(ids_b) and len(set(ids_a)) == len(ids_a)
    arr_a, n_a = _arrays(a, have, None) if have else ({}, 0)
    arr_b, n_b = _arrays(b, have, ids_a if paired else None) if have else ({}, 0)

    def row(stage, metric, va, cia, vb, cib, stat=None) -> dict:
        r = {"stage": stage, "metric": metric, "a": va, "a_ci": cia, "b": vb, "b_ci": cib,
             "diff": None if va is None or vb is None else vb - va, "diff_ci": None, "p": None}
        if stat is not None:
            d = bootstrap_diff(stat, arr_a, arr_b, n_a, n_b, paired, N_BOOT, LEVEL, seed=0)
            r.update(diff=d["diff"] if d["diff"] is not None else r["diff"], p=d["p"],
                     diff_ci=None if d["ci_low"] is None else [d["ci_low"], d["ci_high"]],
                     rule="paired bootstrap" if paired else "bootstrap")
        else:
            r.update(rule=RULE_CIS, p=normal_p(r["diff"], cia, cib, LEVEL))
        r["significant_uncorrected"] = None if r["p"] is None else bool(r["p"] < 1 - LEVEL)
        return r

    # the per-item columns both audits have for every stage with predictions
    cols = {c for c in PER_ITEM.values() if have and all(f"{st}/{c}" in arr_a and f"{st}/{c}" in arr_b for st in have)}

    rows = []
    for st in stages:
        sa, sb = a.summary["stages"][st], b.summary["stages"][st]
        for m in STAGE_METRICS:
            if m not in sa and m not in sb:
                continue
            stat = _mean(f"{st}/{PER_ITEM[m]}") if m in PER_ITEM and PER_ITEM[m] in cols and st in have else None
            rows.append(row(st, m, sa.get(m), sa.get("ci", {}).get(m), sb.get(m), sb.get("ci", {}).get(m), stat))

    # The verdict's quantities, from components.verdict.quantities: n/a (None) exactly where
    # the verdict's ratio is undefined (denominator <= 0).
    va, vb = a.summary["verdict"], b.summary["verdict"]
    da, db = va.get("decided_by", "knowledge_acc"), vb.get("decided_by", "knowledge_acc")
    rec = [f"recovered/{k}" for k in va.get("recovery_ratio", {}) if k in vb.get("recovery_ratio", {})]
    # the knowledge measures whose retention either verdict holds (defined or not)
    carried = [m for m in KNOWLEDGE_MEASURES if any(m in v.get("retention", {"knowledge_acc": None}) for v in (va, vb))]
    measures = [m for m in KNOWLEDGE_MEASURES if m in cols]
    arr_a["quantities"] = quantities(rec, _chances(a), measures)
    arr_b["quantities"] = quantities(rec, _chances(b), measures)
    # (row key, the quantity of components.verdict.quantities it is)
    keys: list[tuple[tuple[str, str], tuple[str, str]]] = [(("verdict", "task_drop"), ("verdict", "task_drop"))]
    if da == db:  # the retention that decided both labels
        keys.append((("verdict", "knowledge_retention"), ("verdict", f"retention:{da}")))
    keys += [(("verdict", f"retention:{m}"), ("verdict", f"retention:{m}")) for m in carried]
    keys += [(("verdict", k), ("verdict", k)) for k in ("tune_change", "gold_logprob_change") if k in va and k in vb]
    for st in rec:
        keys.append(((st, "recovery_ratio"), (st, "recovery_ratio")))
        if da == db:
            keys.append(((st, "knowledge_after_recovery"), (st, f"after_recovery:{da}")))
    for key, q in keys:
        xa, ca = _verdict_value(va, key)
        xb, cb = _verdict_value(vb, key)
        needs = {"aligned", "perturbed"} | ({"base"} if key[1] == "tune_change" else set()) | (
            {key[0]} if key[0] != "verdict" else set())
        m = q[1].split(":", 1)[1] if ":" in q[1] else None
        ok = (needs <= set(have) and q in arr_a["quantities"]
              and (m is None or m in measures) and (key[1] != "gold_logprob_change" or "gold_logprob" in cols))
        rows.append(row(key[0], key[1], xa, ca, xb, cb, _verdict_stat(q) if ok else None))
    # one correction across every test run: Holm's step-down adjustment of the p-values
    for r, adj in zip(rows, holm([r["p"] for r in rows])):
        r["p_adjusted"] = adj
        r["significant"] = None if adj is None else bool(adj < 1 - LEVEL)
    return Comparison(a, b, config_diff, rows, paired, tests=sum(1 for r in rows if r["p"] is not None))


def rule_text(cmp: Comparison) -> str:
    """One paragraph saying which significance rule each row used."""
    how = ("a paired bootstrap of B - A over the same evaluation items (items resampled together)"
           if cmp.paired else "a bootstrap of B - A, each audit's items resampled separately (different items)")
    alpha = round(1 - LEVEL, 6)
    return (f"significant (*): Holm-adjusted p < {alpha:g} over all {cmp.tests} tests (multiple-comparison "
            f"correction: holm, family-wise error rate {alpha:g}); each p is two-sided, by {how}, "
            f"{N_BOOT} resamples of the per-item predictions; rows marked '{RULE_CIS}' have no per-item "
            f"values and take p from the two {int(LEVEL * 100)}% CIs (normal approximation); the B - A "
            f"intervals are per-test {int(LEVEL * 100)}% CIs, not corrected.")
