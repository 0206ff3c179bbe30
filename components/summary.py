"""The summary of an audit's checkpoints: every per-stage metric, its CI, the per-item
transitions, the per-layer probes and weight drift, and the verdict, from the probe
results. The one implementation behind ``cl-audit run`` (``summary.json``,
``metrics.parquet``), each ``cl-audit sweep`` cell and the Kubeflow pipeline's last
step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components.config import VerdictConfig
from components.verdict import STAGE_METRICS, verdict_of, verdict_rows

# per-item transitions from the stage a checkpoint was trained from (Harmon et al. 2025)
TRANSITION_METRICS = ("task_correct_to_wrong", "task_wrong_to_correct",
                      "knowledge_correct_to_wrong", "knowledge_wrong_to_correct")


def assess(probes: dict[str, dict], order: list[str], cfg: VerdictConfig, n_boot: int = 1000,
           level: float = 0.95, seed: int = 0, drift: dict | None = None) -> dict:
    """Per-checkpoint metrics, drift and the verdict from the probe results of one audit.

    Args:
        probes: checkpoint name -> the probe stage's result (``metrics``, ``per_item``,
            ``knowledge_chance``, ``answer_tokens``, ``probe_acc`` and ``dir`` holding
            ``ref_logprobs.safetensors``); must hold ``base``, ``aligned`` and
            ``perturbed``.
        order: the checkpoint names to report, in DAG order (``base``, ``aligned``,
            ``perturbed``, then any ``recovered/<arm>/<n>``).
        cfg: the verdict's thresholds and deciding measure.
        drift: the weight-drift report (:func:`components.drift.weight_drift_report`),
            or None.

    Returns:
        ``{"stages": {name: {metric: value, "knowledge_chance", "ci": {metric: [lo, hi]},
        per-layer dicts}}, "verdict": compute_verdict(...), "rows": [long-form metric rows:
        stage, metric, layer, value, ci_low, ci_high], "stage_metrics": {name: {metric:
        value}} (the drift and transition scalars and per-layer dicts a tracker logs)}``.
        ``kl_to_base`` / ``kl_to_aligned`` are the mean per-token KL(pi_ref || pi) over
        the gold answers' tokens (nats/token; Shenfeld et al. 2025, arXiv 2509.04259).

    Raises:
        KeyError: a checkpoint of ``order`` (or base/aligned/perturbed) has no probe.
    """
    # torch (through components.metrics and components.probe) is imported here: a
    # driver that only orchestrates does not hold it while the stage workers run.
    from components.metrics import drift_kl_files, summarise, transitions
    from components.runner import parent_stage

    boot = dict(n_boot=n_boot, level=level, seed=seed)
    chance = probes["base"]["knowledge_chance"]
    # The (P, V) log-probs of base and aligned are the KL references; every checkpoint's
    # rows are read against them a block of items at a time (never P x vocabulary floats).
    refs = [Path(probes[name]["dir"]) / "ref_logprobs.safetensors" for name in ("base", "aligned")]
    lengths = np.array(probes["base"]["answer_tokens"])
    stages, rows, logged = {}, [], {}

    def row(stage: str, metric: str, value, ci=(None, None), layer=None) -> None:
        rows.append({"stage": stage, "metric": metric, "layer": layer, "value": value,
                     "ci_low": ci[0], "ci_high": ci[1]})

    for name in order:
        p = probes[name]
        m = dict(p["metrics"])
        kl_base, kl_aligned = drift_kl_files(refs, Path(p["dir"]) / "ref_logprobs.safetensors", lengths)
        m["kl_to_base"] = summarise(kl_base, **boot)
        m["kl_to_aligned"] = summarise(kl_aligned, **boot)
        parent = parent_stage(name)
        if parent is not None and parent in probes:
            before, after = probes[parent]["per_item"], p["per_item"]
            for what in ("task", "knowledge"):
                tr = transitions(before[f"{what}_correct"], after[f"{what}_correct"], **boot)
                m.update({f"{what}_{k}": v for k, v in tr.items()})
        # the suite's own metrics (refusal_rate, benign_answer_rate) follow the standard ones
        own = [k for k in p["metrics"] if k not in STAGE_METRICS]
        scalars = [k for k in (*STAGE_METRICS, *own, *TRANSITION_METRICS) if k in m]
        st = {k: m[k]["value"] for k in scalars}
        st["knowledge_chance"] = chance
        if p.get("knowledge_chances"):
            st["knowledge_chances"] = p["knowledge_chances"]
        st["ci"] = {k: [m[k]["ci_low"], m[k]["ci_high"]] for k in scalars}
        if parent is not None and parent in probes:
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
        if drift is not None and name in drift["weight_drift"]:
            per_layer["weight_drift"] = drift["weight_drift"][name]
        if drift is not None and name == "perturbed":
            for k in ("principal_angle_mean", "principal_angle_min"):
                if drift[k]:
                    per_layer[k] = drift[k]
        for k, by_layer in per_layer.items():
            st[k] = by_layer
            if k != "probe_acc":
                for lay, v in by_layer.items():
                    row(name, k, v, layer=int(lay))
        stages[name] = st
        logged[name] = ({k: m[k]["value"] for k in ("kl_to_base", "kl_to_aligned", *TRANSITION_METRICS) if k in m},
                        per_layer)

    verdict = verdict_of(probes, order, cfg, **boot)
    rows += verdict_rows(verdict)
    return {"stages": stages, "verdict": verdict, "rows": rows, "stage_metrics": logged}


FLIP_NEIGHBOURS = 3


def flipped_items(eval_items: list, perturb_items: list, before: dict, after: dict,
                  k: int = FLIP_NEIGHBOURS) -> list[dict]:
    """The evaluated items that flipped from right on ``before`` (the aligned checkpoint)
    to wrong on ``after`` (the perturbed one), each with the perturbation examples whose
    text is nearest to it: the per-item view of Harmon et al. (2025, arXiv 2510.17776),
    pointing at the training rows that most plausibly moved each item.

    Text overlap is the cosine similarity of TF-IDF vectors (scikit-learn's
    ``TfidfVectorizer``, word unigrams and bigrams, sublinear tf, fitted on the
    perturbation examples and the flipped items) of ``prompt + answer`` (a chat row's
    earlier turns included); 1.0 is the same text, 0 no shared word.

    Args:
        eval_items: the N evaluation items (:class:`components.data.Item`), in probe order.
        perturb_items: the perturbation examples (``data.perturb``).
        before, after: the probes' ``per_item`` dicts (``task_correct``,
            ``knowledge_correct``: (N,) 0/1).
        k: nearest examples kept per item.

    Returns:
        ``[{"id", "question", "expected", "task": bool, "knowledge": bool, "nearest":
        [{"id", "prompt", "answer", "score"}, ...k]}]``: ``task`` / ``knowledge`` say
        which measure flipped (at least one did), in evaluation order; empty when nothing
        flipped.
    """
    import numpy as np

    task = np.asarray(before["task_correct"], bool) & ~np.asarray(after["task_correct"], bool)
    know = (np.asarray(before["knowledge_correct"], float) >= 0.5) & (np.asarray(after["knowledge_correct"], float) < 0.5)
    idx = [i for i in range(len(eval_items)) if task[i] or know[i]]
    if not idx:
        return []
    out = [{"id": eval_items[i].id, "question": eval_items[i].question, "expected": eval_items[i].answer,
            "task": bool(task[i]), "knowledge": bool(know[i]), "nearest": []} for i in idx]
    if not perturb_items:
        return out
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import linear_kernel

    def text(it) -> str:
        return " ".join([*(t["content"] for t in it.context or []), it.question, it.response()])

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    try:
        vec.fit([text(p) for p in perturb_items] + [text(eval_items[i]) for i in idx])
    except ValueError:  # no word in any text (punctuation only)
        return out
    P = vec.transform(text(p) for p in perturb_items)
    sims = linear_kernel(vec.transform([text(eval_items[i]) for i in idx]), P)  # (F, M), rows L2-normalised
    for row, o in zip(sims, out):
        top = np.argsort(-row, kind="stable")[:k]
        o["nearest"] = [{"id": perturb_items[j].id, "prompt": perturb_items[j].question,
                         "answer": perturb_items[j].answer, "score": round(float(row[j]), 4)} for j in top]
    return out
