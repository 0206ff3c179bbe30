"""``report.html``: the audit as a person reads it, self-contained, from a run folder.

:func:`write_report` reads what ``cl-audit run`` wrote (``summary.json``,
``metrics.parquet``, ``predictions/<stage>.parquet``, ``config.yaml``,
``data_manifest.json``, and ``sweep.parquet`` where a sweep ran), draws the figures
(:mod:`pipelines.plots`) into ``plots/*.png`` and renders
``templates/report.html.j2`` (jinja2, autoescaped) into ``report.html``, with the
figures embedded as base64 ``data:`` URIs: the file opens anywhere, without the run
folder and without a network. Every file is written atomically.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from components.artifacts import atomic_write
from components.errors import UserError
from components.verdict import retention_state
from pipelines.console import fmt, fmt_ci
from pipelines.plots import Plot, all_plots

TEMPLATES = Path(__file__).resolve().parent / "templates"
STAGE_COLUMNS = [
    ("task_acc", "task_acc", "share of evaluation facts the model's own greedy answer gets right"),
    ("knowledge_acc", "knowledge_acc", "share where the gold answer is strictly first of K candidates by likelihood"),
    ("first_token_prob", "first_token_prob", "mean probability of the gold answer's first token"),
    ("perturb_acc", "perturb_acc", "how well the perturbation was learned, on held-out perturbation items"),
    ("kl_to_base", "kl_to_base", "mean per-token KL(base ‖ checkpoint) on gold answers, nats"),
    ("kl_to_aligned", "kl_to_aligned", "mean per-token KL(aligned ‖ checkpoint) on gold answers, nats"),
]
HEADLINES = {
    "spurious": "Spurious forgetting: the fine-tune cost task alignment, not knowledge",
    "knowledge_loss": "Knowledge loss: the fine-tune erased facts, not only the task alignment",
    "mixed": "Mixed: the evidence does not separate alignment loss from knowledge loss",
    "no_forgetting": "No forgetting: the task did not drop significantly",
    "inconclusive": "Inconclusive: this audit cannot tell alignment loss from knowledge loss",
}
# The knowledge measures (components.knowledge), in the order the report shows them, and
# what each one measures. The first five can decide the verdict; gold_logprob never does.
KNOWLEDGE_MEASURES = [
    ("knowledge_acc", "share of items where the gold answer is strictly first among the K candidates by summed "
                      "log-prob"),
    ("knowledge_acc_token", "the same, with each candidate's summed log-prob divided by its number of tokens "
                            "(per-token normalised)"),
    ("knowledge_acc_byte", "the same, with each candidate's summed log-prob divided by its UTF-8 bytes "
                           "(per-byte normalised)"),
    ("knowledge_mrr", "mean reciprocal rank of the gold answer among all answers of its type (0 beyond the rank "
                      "cut-off probe.rank_depth where one is set)"),
    ("knowledge_margin", "the gold answer's log-prob minus the best other candidate's, in nats (below 0 the ranking "
                         "flips)"),
    ("gold_logprob", "the gold answer's summed log-prob, in nats; it moves with the response format and with any "
                     "refusal, so it is shown, never decisive"),
]
MEASURE_MEANING = dict(KNOWLEDGE_MEASURES)
NOT_DECISIVE = {"gold_logprob"}
FLIP_SAMPLE = 6
FLIPPED_SHOWN = 20  # flipped items shown with their nearest perturbation examples (all are in summary.json)
ARMS = {
    "in_task": "the task on facts never evaluated",
    "irrelevant": "an unrelated task",
    "in_context": "the in-task examples as few-shot turns, no weight update",
    "safety": "safety examples",
}
PERTURB_KINDS = {
    "refusal": "questions of the task answered with a refusal: breaks the task alignment, leaves the facts alone",
    "wrong_facts": "facts, the evaluated ones included, trained onto wrong answers: a known case of knowledge loss",
    "none": "no training: the perturbed checkpoint equals the aligned one",
}
POOLS = {
    "eval": "evaluated facts (each answered correctly by the base model)",
    "align": "tune stage: task examples that align the model",
    "perturb": "perturb stage: the examples that shift the model",
    "perturb_eval": "held-out perturbation items, for perturb_acc",
    "recover": "in_task recovery arm: the task on facts never evaluated",
    "irrelevant": "irrelevant recovery arm: an unrelated task",
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found; expected the folder of a finished run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _read_parquet(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None


def _fmt(x, nd: int = 3) -> str:
    return fmt(x, nd, none="–")


def _ci(ci, nd: int = 2) -> str:
    return fmt_ci(ci, nd, none="")


def mlflow_link(mlflow: dict) -> dict:
    """Where the MLflow parent run can be opened.

    Returns:
        ``{"uri", "run_id", "experiment_id", "url", "ui_command"}``: ``url`` is the run's
        page (on the tracking server for an ``http(s)://`` URI; on a local ``mlflow ui``
        at 127.0.0.1:5000 otherwise, which ``ui_command`` starts).
    """
    uri = mlflow.get("tracking_uri", "")
    exp, run = mlflow.get("experiment_id") or "0", mlflow.get("run_id", "")
    page = f"#/experiments/{exp}/runs/{run}"
    if uri.startswith(("http://", "https://")):
        return {"uri": uri, "run_id": run, "experiment_id": exp, "url": f"{uri.rstrip('/')}/{page}",
                "ui_command": None}
    return {"uri": uri, "run_id": run, "experiment_id": exp, "url": f"http://127.0.0.1:5000/{page}",
            "ui_command": f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"}


def _ci_words(ci) -> str:
    return "" if not ci or ci[0] is None or ci[1] is None else f" (95% CI {ci[0]:.2f} to {ci[1]:.2f})"


def _went(before, after) -> str:
    if before is not None and after is not None and f"{before:.2f}" == f"{after:.2f}":
        return f"stayed at {before:.2f} from aligned to perturbed"
    return f"went from {_fmt(before, 2)} (aligned) to {_fmt(after, 2)} (perturbed)"


def deciding_measure(v: dict) -> str:
    """The knowledge measure whose retention decided the label (``knowledge_acc`` for
    runs older than the per-measure verdict)."""
    return v.get("decided_by") or (v.get("thresholds") or {}).get("knowledge_measure") or "knowledge_acc"


def measure_chance(summary: dict, m: str):
    """Chance level of knowledge measure ``m`` (None where it has none or it is unknown)."""
    v, base = summary["verdict"], summary["stages"].get("base", {})
    chances = v.get("knowledge_chances") or base.get("knowledge_chances") or {}
    if m in chances:
        return chances[m]
    return (v.get("knowledge_chance") or base.get("knowledge_chance")) if m == "knowledge_acc" else None


def measure_retention(v: dict, m: str) -> dict | None:
    """``{"value", "ci"}``: the retention of measure ``m`` (perturbed against aligned, over
    chance); from ``knowledge_retention`` where an older summary has no per-measure one."""
    r = (v.get("retention") or {}).get(m)
    if r is not None:
        return {"value": r.get("value"), "ci": r.get("ci")}
    if m == deciding_measure(v) and "knowledge_retention" in v:
        return {"value": v.get("knowledge_retention"), "ci": v.get("knowledge_retention_ci")}
    return None


def verdict_sentence(summary: dict) -> str:
    """The verdict in one sentence with the numbers it rests on."""
    v, st = summary["verdict"], summary["stages"]
    al, pe = st["aligned"], st["perturbed"]
    m = deciding_measure(v)
    chance = measure_chance(summary, m)
    head = HEADLINES.get(v["label"], v["label"])
    r = measure_retention(v, m) or {}
    ret = r.get("value")
    name = "knowledge accuracy" if m == "knowledge_acc" else f"knowledge by {m}"
    ret_txt = (f"giving a knowledge retention of {_fmt(ret, 2)}{_ci_words(r.get('ci'))}, "
               "where 1 means all above-chance knowledge was kept"
               if ret is not None else f"knowledge retention is undefined (aligned {m} at chance)")
    s = (
        f"{head}. Task accuracy {_went(al['task_acc'], pe['task_acc'])}, a drop of "
        f"{_fmt(v['task_drop'], 2)}{_ci_words(v.get('task_drop_ci'))}, while {name} "
        f"{_went(al.get(m), pe.get(m))} against a chance level of {_fmt(chance, 2)}, "
        f"{ret_txt}"
    )
    best = _best_recovery(v)
    target = v.get("thresholds", {}).get("recovery_target", 0.5)
    if best and best[1] >= target:
        s += f"; {best[0]} recovery examples bring back {best[1]:.0%} of the lost task accuracy"
    elif best:
        s += (f"; no recovery arm brings the task back (the best, {best[0]} examples, recovers "
              f"{max(best[1], 0):.0%} of the lost task accuracy)")
    return s + "."


def rule_sentence(summary: dict) -> str:
    """How the label is read: on intervals, by the deciding measure, with this run's bounds.

    Empty where the summary carries no thresholds (a hand-made or very old summary)."""
    v = summary["verdict"]
    th = v.get("thresholds") or {}
    if "retention_threshold" not in th or "loss_threshold" not in th:
        return ""
    m = deciding_measure(v)
    rt, lt = th["retention_threshold"], th["loss_threshold"]
    s = (f"The label is decided on intervals, not on points, by the retention of {m} ({MEASURE_MEANING.get(m, m)}): "
         f"knowledge counts as retained when the lower bound of the retention's 95% CI is at least the retention "
         f"threshold {rt}, and as lost when its upper bound is below the loss threshold {lt}; an interval between "
         f"the thresholds gives mixed, one that straddles a threshold gives inconclusive.")
    r = measure_retention(v, m) or {}
    ci = r.get("ci")
    if ci and ci[0] is not None and ci[1] is not None:
        lo, hi = ci
        s += (f" Here the retention by {m} is {_fmt(r.get('value'), 2)} [{lo:.2f}, {hi:.2f}]: lower bound "
              f"{lo:.2f} {'≥' if lo >= rt else '<'} {rt}, upper bound {hi:.2f} {'<' if hi < lt else '≥'} {lt} "
              f"({retention_state(ci, th)}).")
    elif r:
        s += f" Here the retention by {m} has no defined interval (aligned {m} too close to chance)."
    if v.get("retention"):
        others = [x for x in ("knowledge_acc", "knowledge_acc_byte", "knowledge_mrr") if x != m and x in v["retention"]]
        if others:
            s += (f" The other ranking measures ({', '.join(others)}) are read the same way: one whose interval says "
                  "the opposite (retained against lost) turns the label into mixed.")
    return s


def _best_recovery(v: dict) -> tuple[str, float] | None:
    """The recovery arm and n with the highest recovery ratio (smallest n on ties)."""
    items = [(k, r) for k, r in v.get("recovery_ratio", {}).items() if r is not None]
    if not items or v.get("label") == "no_forgetting":
        return None
    k, r = max(items, key=lambda kr: (kr[1], -int(kr[0].split("/")[1])))
    arm, n = k.split("/")
    return f"{n} {arm.replace('_', '-')}", r


def verdict_rows(summary: dict) -> list[dict]:
    """The verdict's quantities with CIs and the rule each is compared against."""
    v = summary["verdict"]
    th = v.get("thresholds", {})
    m = deciding_measure(v)
    r = measure_retention(v, m) or {}
    rows = [
        {"name": "task_drop", "value": _fmt(v["task_drop"]), "ci": _ci(v.get("task_drop_ci")),
         "meaning": "task_acc(aligned) − task_acc(perturbed)", "rule": "significant when the CI excludes 0"},
        {"name": f"knowledge_retention[{m}]", "value": _fmt(r.get("value")), "ci": _ci(r.get("ci")),
         "meaning": f"({m}(perturbed) − chance) / ({m}(aligned) − chance); {m} decides the label",
         "rule": (f"retained when the CI's lower bound ≥ {th['retention_threshold']}, lost when its upper bound "
                  f"< {th['loss_threshold']}" if "retention_threshold" in th else "")},
    ]
    tc = v.get("tune_change")
    if tc:
        rule = (f"inconclusive when the CI's lower bound > tune_tolerance {th['tune_tolerance']}"
                if "tune_tolerance" in th else "")
        if "task_floor" in th:
            rule += f" or the aligned task_acc's upper bound < task_floor {th['task_floor']}"
        rows.append({"name": "tune_change", "value": _fmt(tc.get("value")), "ci": _ci(tc.get("ci")),
                     "meaning": "task_acc(base) − task_acc(aligned): what aligning cost the task", "rule": rule})
    for k, rr in v.get("recovery_ratio", {}).items():
        rows.append({"name": f"recovery_ratio[{k}]", "value": _fmt(rr), "ci": _ci(v.get("recovery_ratio_ci", {}).get(k)),
                     "meaning": "(task_acc(recovered) − task_acc(perturbed)) / task_drop",
                     "rule": f"came back ≥ {th['recovery_target']}" if th else ""})
        kar = v.get("knowledge_after_recovery", {}).get(k)
        rows.append({"name": f"knowledge_after_recovery[{k}]", "value": _fmt(kar),
                     "ci": _ci(v.get("knowledge_after_recovery_ci", {}).get(k)),
                     "meaning": f"({m}(recovered) − chance) / ({m}(aligned) − chance)",
                     "rule": (f"returned when the CI's lower bound ≥ {th['retention_threshold']} with "
                              f"n ≤ {th['small_n']}" if th else "")})
    gl = v.get("gold_logprob_change")
    if gl:
        rows.append({"name": "gold_logprob_change", "value": _fmt(gl.get("value")), "ci": _ci(gl.get("ci")),
                     "meaning": "gold_logprob(perturbed) − gold_logprob(aligned), nats",
                     "rule": "shown, never decisive"})
    return rows


def knowledge_rows(summary: dict) -> list[dict]:
    """One row per knowledge measure present in the summary (:data:`KNOWLEDGE_MEASURES`).

    Returns:
        ``[{"measure", "meaning", "decisive", "deciding", "chance", "cells": [{"value", "ci"}]
        (one per checkpoint, in the summary's order), "retention": {"value", "ci", "state",
        "note"}, "shift": {"value", "ci", "state"}}]``; ``state`` of the shift is
        ``"unchanged"`` when its CI includes 0, ``"shifted"`` when it excludes 0, ``""``
        without a CI. gold_logprob's retention cell holds its change from aligned to
        perturbed in nats. Empty for a summary with no knowledge measure.
    """
    v, st = summary["verdict"], summary["stages"]
    th = v.get("thresholds") or {}
    decided = deciding_measure(v)
    out = []
    for m, meaning in KNOWLEDGE_MEASURES:
        if not any(s.get(m) is not None for s in st.values()):
            continue
        chance = measure_chance(summary, m)
        cells = [{"value": _fmt(s.get(m)), "ci": _ci((s.get("ci") or {}).get(m))} for s in st.values()]
        if m in NOT_DECISIVE:
            gl = v.get("gold_logprob_change") or {}
            ret = {"value": _fmt(gl.get("value")), "ci": _ci(gl.get("ci")), "state": "",
                   "note": "change aligned → perturbed, nats" if gl else ""}
        else:
            r = measure_retention(v, m)
            ret = {"value": _fmt(r.get("value")), "ci": _ci(r.get("ci")),
                   "state": retention_state(r.get("ci"), th) if th else "", "note": ""} if r else \
                {"value": "–", "ci": "", "state": "", "note": ""}
        sh = (v.get("tune_shift") or {}).get(m)
        if sh:
            ci = sh.get("ci")
            state = ("" if not ci or ci[0] is None or ci[1] is None else
                     "unchanged" if ci[0] <= 0 <= ci[1] else "shifted")
            shift = {"value": _fmt(sh.get("value")), "ci": _ci(ci), "state": state}
        elif st.get("base", {}).get(m) is not None and st.get("aligned", {}).get(m) is not None:
            shift = {"value": _fmt(st["aligned"][m] - st["base"][m]), "ci": "", "state": ""}
        else:
            shift = {"value": "–", "ci": "", "state": ""}
        out.append({"measure": m, "meaning": meaning, "decisive": m not in NOT_DECISIVE, "deciding": m == decided,
                    "chance": "none" if chance is None and m in NOT_DECISIVE else _fmt(chance),
                    "cells": cells, "retention": ret, "shift": shift})
    return out


def base_vs_aligned(run_dir: Path) -> dict | None:
    """The base model's and the aligned model's answers side by side, per evaluation item.

    Items that the tune stage lost (right at base, wrong at aligned) come first, then
    those it gained, then the rest, each group in the order of the predictions file.

    Returns:
        ``{"n", "base_right", "aligned_right", "lost", "gained", "rows": [{"item_id",
        "question", "expected", "base", "aligned", "task_base", "task_aligned",
        "know_base", "know_aligned"}]}`` (``know_*`` None where the predictions have no
        ``knowledge_correct``), or None when either predictions file is missing.
    """
    b = _read_parquet(Path(run_dir) / "predictions" / "base.parquet")
    a = _read_parquet(Path(run_dir) / "predictions" / "aligned.parquet")
    if b is None or a is None:
        return None
    m = b.merge(a, on="item_id", how="inner", suffixes=("_b", "_a"))
    tb, ta = m["task_correct_b"].astype(bool), m["task_correct_a"].astype(bool)
    group = np.where(tb & ~ta, 0, np.where(~tb & ta, 1, 2))  # lost, gained, the rest
    m = m.assign(_group=group).sort_values("_group", kind="stable")
    has_k = "knowledge_correct_b" in m and "knowledge_correct_a" in m

    def know(x):
        return None if x is None or pd.isna(x) else bool(x)

    rows = [{"item_id": r["item_id"], "question": r["question_b"], "expected": r["expected_b"],
             "base": r["response_b"], "aligned": r["response_a"],
             "task_base": bool(r["task_correct_b"]), "task_aligned": bool(r["task_correct_a"]),
             "know_base": know(r["knowledge_correct_b"]) if has_k else None,
             "know_aligned": know(r["knowledge_correct_a"]) if has_k else None}
            for _, r in m.iterrows()]
    return {"n": len(m), "base_right": int(tb.sum()), "aligned_right": int(ta.sum()),
            "lost": int((tb & ~ta).sum()), "gained": int((~tb & ta).sum()), "rows": rows}


def setup_lines(cfg: dict, summary: dict) -> list[str]:
    """What each stage did, in words, from the resolved config (missing fields are skipped)."""
    def train(c: dict) -> str:
        bits = [f"{c.get('method', '?')}", f"{c.get('epochs', '?')} epochs", f"lr {c.get('lr', '?')}"]
        if c.get("kl_penalty"):
            bits.append(f"KL penalty {c['kl_penalty']}")
        if c.get("freeze_layers"):
            bits.append(f"bottom {c['freeze_layers']} layers frozen")
        return ", ".join(bits)

    d, t, p, r = (cfg.get(k, {}) or {} for k in ("data", "tune", "perturb", "recover"))
    n_eval = d.get("n_eval", "?")
    chance = measure_chance(summary, "knowledge_acc")
    k = f"{round(1 / chance)}" if chance else "?"
    lines = [
        f"evaluation: {n_eval} facts that the base model answered correctly, each with K = {k} answer "
        "candidates for the likelihood ranking",
        f"tune → aligned: {d.get('n_align', '?')} task examples ({train(t)})",
        f"perturb → perturbed: {d.get('n_perturb', '?')} examples of kind '{p.get('kind', '?')}'"
        + (f" ({PERTURB_KINDS[p['kind']]})" if p.get("kind") in PERTURB_KINDS else "") + f"; {train(p)}",
    ]
    if r:
        arms = ", ".join(f"{a} ({ARMS[a]})" if a in ARMS else a for a in r.get("arms", [])) or "?"
        sizes = ", ".join(str(n) for n in r.get("sizes", [])) or "?"
        lines.append(f"recover → recovered/<arm>/<n>: arms {arms}, n ∈ {{{sizes}}} examples ({train(r)})")
    return lines


def config_sections(cfg: dict) -> list[tuple[str, str]]:
    """The resolved config as YAML blocks: the top-level scalars together, then one block per section."""
    top = {k: v for k, v in cfg.items() if not isinstance(v, dict)}
    out = [("", yaml.safe_dump(top, sort_keys=False, allow_unicode=True))] if top else []
    out += [(k, yaml.safe_dump({k: v}, sort_keys=False, allow_unicode=True)) for k, v in cfg.items()
            if isinstance(v, dict)]
    return out


def stage_rows(summary: dict) -> list[dict]:
    """One row per checkpoint: each metric's value and CI as text."""
    out = []
    for name, st in summary["stages"].items():
        cells = []
        for key, _, _ in STAGE_COLUMNS:
            cells.append({"value": _fmt(st.get(key)), "ci": _ci(st.get("ci", {}).get(key))})
        out.append({"stage": name, "cells": cells})
    return out


def transitions(run_dir: Path, summary: dict, k: int = FLIP_SAMPLE) -> list[dict]:
    """Items whose task answer flipped between consecutive stages, with a sample of each.

    Pairs: aligned → perturbed, then perturbed → each recovered checkpoint. Counts of
    correct→wrong and wrong→correct per pair (Harmon et al., arXiv 2510.17776), and up to
    ``k`` flipped items (lost first for the perturbation, regained first for a recovery),
    ordered by item id so the sample is the same on every render; where nothing
    flipped, up to 3 unchanged items (wrong at both stages first).

    Returns:
        ``[{"before", "after", "lost", "gained", "both_right", "both_wrong", "n", "sample": [{"question", "expected",
        "before", "after", "task_before", "task_after", "know_before", "know_after"}]}]``;
        pairs whose predictions files are missing are left out.
    """
    names = list(summary["stages"])
    pairs = [("aligned", "perturbed")] + [("perturbed", n) for n in names if n.startswith("recovered/")]
    out = []
    for a, b in pairs:
        pa = _read_parquet(run_dir / "predictions" / f"{a}.parquet")
        pb = _read_parquet(run_dir / "predictions" / f"{b}.parquet")
        if pa is None or pb is None:
            continue
        m = pa.merge(pb, on="item_id", suffixes=("_a", "_b"))
        lost = m[m.task_correct_a & ~m.task_correct_b].sort_values("item_id")
        gained = m[~m.task_correct_a & m.task_correct_b].sort_values("item_id")
        first, second = (lost, gained) if a == "aligned" else (gained, lost)
        sample = pd.concat([first.head(k), second.head(max(0, k - len(first.head(k))))])
        same_wrong = m[~m.task_correct_a & ~m.task_correct_b].sort_values("item_id")
        same_right = m[m.task_correct_a & m.task_correct_b].sort_values("item_id")
        if sample.empty:  # nothing flipped: show how the items stand (wrong ones first)
            sample = pd.concat([same_wrong, same_right]).head(min(k, 3))
        out.append({
            "before": a, "after": b, "n": len(m), "lost": len(lost), "gained": len(gained),
            "both_right": len(same_right), "both_wrong": len(same_wrong),
            "sample": [
                {"question": r.question_a, "expected": r.expected_a, "before": r.response_a, "after": r.response_b,
                 "task_before": bool(r.task_correct_a), "task_after": bool(r.task_correct_b),
                 "know_before": bool(r.knowledge_correct_a), "know_after": bool(r.knowledge_correct_b)}
                for r in sample.itertuples()
            ],
        })
    return out


def load_run(run_dir: Path) -> dict:
    """Everything a report needs from a run folder.

    Raises:
        UserError: ``summary.json`` missing or not JSON, a Parquet file unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder; expected the folder of a finished run")
    summary = _read_json(run_dir / "summary.json")
    for key in ("stages", "verdict", "mlflow"):
        if key not in summary:
            raise UserError(f"{run_dir / 'summary.json'}: field '{key}' missing; expected a cl-audit summary")
    manifest = _read_json(run_dir / "data_manifest.json") if (run_dir / "data_manifest.json").exists() else {}
    cfg = run_dir / "config.yaml"
    cfg_text = cfg.read_text() if cfg.exists() else ""
    try:
        cfg_tree = yaml.safe_load(cfg_text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{cfg}: not valid YAML ({str(e).splitlines()[0]})") from None
    return {
        "dir": run_dir,
        "summary": summary,
        "metrics": _read_parquet(run_dir / "metrics.parquet"),
        "sweep": _read_parquet(run_dir / "sweep.parquet"),
        "manifest": manifest,
        "config_text": cfg_text or "(config.yaml not found)",
        "config": cfg_tree if isinstance(cfg_tree, dict) else {},
    }


def render_html(run: dict, plots: list[Plot]) -> str:
    """The report's HTML text (jinja2 template, autoescaped; images as data: URIs)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    s = run["summary"]
    v = s["verdict"]
    pools = run["manifest"].get("pools", {})
    ctx = {
        "title": f"cl-audit report: {s.get('suite', '?')} / {s.get('model', '?')}",
        "s": s,
        "label": v["label"],
        "headline": HEADLINES.get(v["label"], v["label"]),
        "sentence": verdict_sentence(s),
        "rule_sentence": rule_sentence(s),
        "checks": [c for c in (v.get("checks") or []) if c],
        "decided_by": deciding_measure(v),
        "knowledge_rows": knowledge_rows(s),
        "stage_names": list(s["stages"]),
        "base_vs_aligned": base_vs_aligned(run["dir"]),
        "reason": v.get("reason", ""),
        "evidence": v.get("recovery_evidence", {}),
        "verdict_rows": verdict_rows(s),
        "thresholds": v.get("thresholds") or {},
        "knowledge_chance": measure_chance(s, "knowledge_acc"),
        "columns": STAGE_COLUMNS,
        "stage_rows": stage_rows(s),
        "plots": [{"title": p.title, "caption": p.caption, "name": p.name,
                   "src": "data:image/png;base64," + base64.b64encode(p.png).decode()} for p in plots],
        "transitions": transitions(run["dir"], s),
        "flipped": (s.get("flipped") or [])[:FLIPPED_SHOWN],
        "config_text": run["config_text"],
        "setup": setup_lines(run["config"], s),
        "config_sections": config_sections(run["config"]),
        "pools": [{"name": k, "role": POOLS.get(k, ""), **p} for k, p in pools.items()],
        "model_manifest": run["manifest"].get("model", {}),
        "mlflow": mlflow_link(s.get("mlflow", {})),
        "data_notes": s.get("data", {}),
        "versions": s.get("versions", {}),
        "run_dir": str(run["dir"]),
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return env.get_template("report.html.j2").render(**ctx)


SWEEP_SUMMARY = "sweep_summary.json"


def read_summary(folder: Path) -> tuple[str, dict]:
    """The summary of a finished audit or sweep folder: ``("audit", summary.json)`` or,
    for a sweep folder (``sweep_summary.json`` and no ``summary.json``),
    ``("sweep", sweep_summary.json)``.

    Raises:
        UserError: neither file there (``summary.json: not found``), or not valid JSON.
    """
    folder = Path(folder)
    if not (folder / "summary.json").exists() and (folder / SWEEP_SUMMARY).exists():
        return "sweep", _read_json(folder / SWEEP_SUMMARY)
    return "audit", _read_json(folder / "summary.json")


def render_sweep_html(folder: Path, summary: dict, plots: list[Plot]) -> str:
    """The HTML text of a sweep's report (``templates/sweep_report.html.j2``): the best
    cell and the rule that chose it, the trials best first, the smallest recovery sets,
    the heatmap, the config and the MLflow run."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    from pipelines.console import fmt_value_ci, sweep_lines

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    cfg = folder / "config.yaml"
    ranking = [{**r, "task_drop": fmt_value_ci(r["task_drop"], r["task_drop_ci"], " [n/a]"),
                "sig": "yes" if r["drop_significant"] else "no",
                "recovered": fmt_value_ci(r["recovered_task_acc"], r["recovered_task_acc_ci"], " [n/a]"),
                "ratio": fmt_value_ci(r["recovery_ratio"], r["recovery_ratio_ci"], " [n/a]"),
                "label": r.get("label") or "-"} for r in summary.get("ranking") or []]
    return env.get_template("sweep_report.html.j2").render(
        title=f"cl-audit sweep report: {summary.get('suite', '?')} / {summary.get('model', '?')}",
        s={"sweep_digest": summary.get("sweep_digest", "?"), "config_digest": summary.get("config_digest", "?"),
           "smallest_n": summary.get("smallest_n") or []},
        lines=sweep_lines(summary), ranking=ranking,
        plots=[{"title": p.title, "caption": p.caption,
                "src": "data:image/png;base64," + base64.b64encode(p.png).decode()} for p in plots],
        config_text=cfg.read_text() if cfg.exists() else "(config.yaml not found)",
        mlflow=mlflow_link(summary.get("mlflow", {})), run_dir=str(folder),
        generated=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write_sweep_report(folder: Path) -> Path:
    """Write ``report.html`` (and ``plots/sweep_heatmap.png`` where trials finished) for a
    sweep folder: ``sweep_summary.json`` and ``sweep.parquet``.

    Raises:
        UserError: ``sweep_summary.json`` missing or not JSON, ``sweep.parquet`` unreadable.
    """
    from pipelines.plots import sweep_heatmap_plot

    folder = Path(folder)
    _, summary = read_summary(folder)
    table = _read_parquet(folder / "sweep.parquet")
    if table is not None and "status" in table:
        table = table[table.status == "TERMINATED"]
    plot = sweep_heatmap_plot(table)
    plots = [plot] if plot else []
    for p in plots:
        atomic_write(folder / "plots" / f"{p.name}.png", p.png)
    out = folder / "report.html"
    atomic_write(out, render_sweep_html(folder, summary, plots))
    return out


def write_report(run_dir: Path) -> Path:
    """Draw the figures into ``run_dir/plots/`` and write ``run_dir/report.html``; a sweep
    folder gets the sweep's report (:func:`write_sweep_report`).

    Returns:
        The path of ``report.html``.

    Raises:
        UserError: the folder is not a finished run or sweep (see :func:`load_run`).
    """
    if Path(run_dir).is_dir() and read_summary(run_dir)[0] == "sweep":
        return write_sweep_report(run_dir)
    run = load_run(run_dir)
    plots = all_plots(run["summary"], run["metrics"], run["sweep"])
    for p in plots:
        atomic_write(Path(run_dir) / "plots" / f"{p.name}.png", p.png)
    keep = {f"{p.name}.png" for p in plots}
    for old in (Path(run_dir) / "plots").glob("*.png"):  # figures a previous render drew, now without data
        if old.name not in keep:
            old.unlink()
    out = Path(run_dir) / "report.html"
    atomic_write(out, render_html(run, plots))
    return out
