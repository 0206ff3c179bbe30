"""The verdict: spurious forgetting (alignment loss) or knowledge loss (DESIGN.md, "Verdict").

Quantities, for each knowledge measure M of :mod:`components.knowledge` with chance c
(``knowledge_acc``: 1/K; ``knowledge_mrr``: H_M/M; ``knowledge_margin``: 0):

- ``task_drop`` = task_acc(aligned) - task_acc(perturbed)
- ``retention[M]`` = (M(perturbed) - c) / (M(aligned) - c); ``knowledge_retention`` is
  the retention of the deciding measure (``verdict.knowledge_measure``)
- ``after_recovery[M][arm/n]`` = (M(recovered) - c) / (M(aligned) - c); the recovery
  items never include the evaluated facts, so a return to the aligned level shows the
  facts were still stored (Zheng et al. 2025, arXiv 2501.13453)
- ``recovery_ratio[arm/n]`` = (task_acc(recovered) - task_acc(perturbed)) / task_drop
- ``tune_change`` = task_acc(base) - task_acc(aligned) and ``tune_shift[M]`` =
  M(aligned) - M(base): did the tune stage break the task, did aligning to a format move
  the knowledge measure (it should not)
- ``gold_logprob_change`` (nats): shown, never decisive
- ``probe_retention`` = (P(perturbed) - c_P) / (P(aligned) - c_P), P = the linear
  probes' accuracy averaged over the decoder layers (1..L), c_P its majority-class
  chance level (Zhang, Choshen & Andreas 2024, arXiv 2409.02228): beside the label,
  not part of its rule (the probed attribute is not the evaluated fact).

Every quantity carries a paired bootstrap CI (:func:`resample_weights`: the same
resampled items, or clusters of items that share a subject, for every checkpoint), and
the label's rule reads the intervals (:func:`compute_verdict`). :func:`quantities` is
the one definition of them, used by the verdict and by ``cl-audit compare``
(:func:`bootstrap_diff` across two audits).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from components.config import VerdictConfig
from components.stats import bootstrap_p, percentile_ci, ratio, resample_weights, wmean

# The knowledge measures a verdict can be decided by (components.knowledge); gold_logprob
# is reported as a change in nats, never decisive (it moves with any refusal).
KNOWLEDGE_MEASURES = ("knowledge_acc", "knowledge_acc_token", "knowledge_acc_byte", "knowledge_mrr",
                      "knowledge_margin")
RANKING_MEASURES = ("knowledge_acc", "knowledge_acc_byte", "knowledge_mrr")


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


# --- the verdict's quantities --------------------------------------------------------

def quantities(recovered: list[str], chances: dict[str, float | None], measures=KNOWLEDGE_MEASURES) -> dict:
    """Every verdict quantity as a function of a ``mean(stage, metric) -> (R,)`` callable
    (R resamples, or R = 1 for the point): the one definition used by the verdict
    (:func:`compute_verdict`) and by ``cl-audit compare``.

    Keys: ``("verdict", "task_drop")``, ``("verdict", "tune_change")`` (task_acc(base)
    - task_acc(aligned)), per measure m ``("verdict", "retention:m")`` =
    (m(perturbed) - c) / (m(aligned) - c), ``("verdict", "above_chance:m")`` =
    m(aligned) - c, ``("verdict", "tune_shift:m")`` = m(aligned) - m(base),
    ``("verdict", "gold_logprob_change")`` (nats, perturbed - aligned), and per
    recovered checkpoint ``(stage, "recovery_ratio")`` and ``(stage, "after_recovery:m")``.
    """
    q: dict = {
        ("verdict", "task_drop"): lambda mean: mean("aligned", "task_correct") - mean("perturbed", "task_correct"),
        ("verdict", "tune_change"): lambda mean: mean("base", "task_correct") - mean("aligned", "task_correct"),
        ("verdict", "gold_logprob_change"): lambda mean: mean("perturbed", "gold_logprob") - mean("aligned", "gold_logprob"),
    }
    for m in measures:
        c = chances.get(m) or 0.0
        q[("verdict", f"retention:{m}")] = lambda mean, m=m, c=c: ratio(mean("perturbed", m) - c, mean("aligned", m) - c)
        q[("verdict", f"above_chance:{m}")] = lambda mean, m=m, c=c: mean("aligned", m) - c
        q[("verdict", f"tune_shift:{m}")] = lambda mean, m=m: mean("aligned", m) - mean("base", m)
    for st in recovered:
        q[(st, "recovery_ratio")] = lambda mean, st=st: ratio(
            mean(st, "task_correct") - mean("perturbed", "task_correct"),
            mean("aligned", "task_correct") - mean("perturbed", "task_correct"))
        for m in measures:
            c = chances.get(m) or 0.0
            q[(st, f"after_recovery:{m}")] = lambda mean, st=st, m=m, c=c: ratio(mean(st, m) - c, mean("aligned", m) - c)
    return q


def retention_state(ci, thresholds: dict) -> str:
    """Where a retention interval ``[lo, hi]`` lies against the thresholds (a verdict's
    ``thresholds``, or ``VerdictConfig.model_dump()``): ``retained`` (lo >= the retention
    threshold), ``lost`` (hi < the loss threshold), ``between`` (wholly between them),
    ``straddles``, or ``undefined`` (no interval)."""
    if not ci or ci[0] is None or ci[1] is None or not thresholds:
        return "undefined"
    lo, hi = ci
    if lo >= thresholds["retention_threshold"]:
        return "retained"
    if hi < thresholds["loss_threshold"]:
        return "lost"
    if lo >= thresholds["loss_threshold"] and hi < thresholds["retention_threshold"]:
        return "between"
    return "straddles"


def compute_verdict(
    per_item: dict[str, dict[str, list[float]]],
    chance: float | dict[str, float | None],
    cfg: VerdictConfig,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    probe_chance: float | None = None,
    groups: list | None = None,
) -> dict:
    """Label an audit from the per-item results of its checkpoints (DESIGN "Verdict").

    Every quantity is a paired bootstrap over the evaluation items (clusters of items
    where ``groups`` is given): the same resamples for every checkpoint. The label's
    rule reads intervals, never points, in this order:

    1. ``inconclusive`` when the tune stage broke the task: the lower bound of
       task_acc(base) - task_acc(aligned) exceeds ``tune_tolerance``, or the aligned
       model's task_acc (upper bound) is below ``task_floor``;
    2. ``inconclusive`` when the aligned model's knowledge (the deciding measure,
       ``cfg.knowledge_measure``) does not clear chance with its CI;
    3. with no significant task drop (its CI includes 0): ``no_forgetting`` only when
       knowledge is retained (retention CI >= ``retention_threshold``); knowledge that
       fell while the task held is ``knowledge_loss`` (CI below ``loss_threshold``) or
       ``mixed``, never hidden;
    4. with a task drop: ``spurious`` when the retention CI lies above the threshold, or
       knowledge after recovery on disjoint items (n <= ``small_n``) does, or (unless
       the retention CI lies below the loss threshold) the ``in_context`` arm brings the
       task back (recovery-ratio CI >= ``recovery_target`` at n <= ``small_n``): the
       examples changed no weight, so the facts were still in the weights and only the
       disposition was lost (Fast-Slow Training's reading: transient adaptation in
       context, persistent behaviour in the weights);
       ``knowledge_loss`` when it lies below the loss threshold and neither knowledge nor
       the task returns; ``mixed`` when it lies between the thresholds;
    5. ``inconclusive`` when the retention interval straddles a threshold.

    A ranking measure whose retention interval says the opposite of the deciding one
    (retained against lost) turns ``spurious``/``no_forgetting``/``knowledge_loss``
    into ``mixed``: the measures disagree.

    Args:
        per_item: stage name -> ``{"task_correct": (N,), <knowledge measure>: (N,), ...}``
            for ``aligned``, ``perturbed``, each ``recovered/<arm>/<n>`` and (for the
            tune check) ``base``; the same N items in the same order. An older layout
            with only ``knowledge_correct`` is read as ``knowledge_acc``.
        chance: measure -> chance level (``knowledge_acc``: 1/K), or the chance of
            ``knowledge_acc`` alone.
        cfg: thresholds and the deciding measure.
        probe_chance: chance level of the linear probes (None: no ``probe_retention``).
        groups: cluster label per item (None: items resampled independently).

    Returns:
        A dict with ``label``, ``reason``, ``checks`` (the reasons of an inconclusive
        verdict, first), ``decided_by``, ``task_drop``, ``knowledge_retention``,
        ``knowledge_after_recovery``, ``recovery_ratio`` (each with ``*_ci``),
        ``retention`` / ``after_recovery`` / ``tune_shift`` per measure (value and
        ci), ``gold_logprob_change``, ``tune_change``, ``probe_retention``,
        ``recovery_evidence``, ``knowledge_chance``, ``knowledge_chances`` and
        ``thresholds``.

    Raises:
        KeyError: ``aligned`` or ``perturbed`` missing from ``per_item``.
    """
    data = {}
    for st, v in per_item.items():
        d = {k: np.asarray(x, float) for k, x in v.items()
             if k not in ("probe_correct", "groups") and x is not None and not isinstance(x, dict)}
        if "knowledge_acc" not in d and "knowledge_correct" in d:
            d["knowledge_acc"] = d["knowledge_correct"]
        data[st] = d
    chances = dict(chance) if isinstance(chance, dict) else {"knowledge_acc": float(chance)}
    measures = [m for m in KNOWLEDGE_MEASURES if m in data["aligned"] and m in data["perturbed"]]
    decide = cfg.knowledge_measure if cfg.knowledge_measure in measures else "knowledge_acc"
    N = len(data["aligned"]["task_correct"])
    W = resample_weights(N, n_boot, seed, groups)
    point_w = np.ones((1, N))
    recovered = sorted((k for k in data if k.startswith("recovered/")),
                       key=lambda k: (k.split("/")[1], int(k.split("/")[2])))
    has_base = "base" in data
    has_lp = all("gold_logprob" in data[s] for s in ("aligned", "perturbed"))

    def evaluate(fn):
        def mean_with(w):
            return lambda st, m: wmean(data[st][m], w)
        point = _num(np.asarray(fn(mean_with(point_w)))[0])
        return point, percentile_ci(np.asarray(fn(mean_with(W))), level)

    Q = quantities(recovered, chances, measures)
    val: dict = {}
    for key, fn in Q.items():
        st, name = key
        if name == "tune_change" and not has_base or name.startswith("tune_shift") and not has_base:
            continue
        if name == "gold_logprob_change" and not has_lp:
            continue
        val[key] = evaluate(fn)

    drop, drop_ci = val[("verdict", "task_drop")]
    ret = {m: val[("verdict", f"retention:{m}")] for m in measures}
    kar = {m: {st.removeprefix("recovered/"): val[(st, f"after_recovery:{m}")] for st in recovered} for m in measures}
    rr = {st.removeprefix("recovered/"): val[(st, "recovery_ratio")] for st in recovered}

    # recovery evidence per arm: the smallest n whose recovery-ratio interval reaches the
    # target with its lower bound (as the label reads it, not the point estimate)
    evidence = {}
    for arm in sorted({k.split("/")[0] for k in rr}):
        sizes = sorted(int(k.split("/")[1]) for k in rr if k.startswith(arm + "/"))
        hit = next((n for n in sizes if (rr[f"{arm}/{n}"][1][0] or -1) >= cfg.recovery_target), None)
        evidence[arm] = (f"recovery ratio lower bound >= {cfg.recovery_target} at n={hit}" if hit is not None
                         else f"not within n <= {max(sizes)}")

    small = [k for k in rr if int(k.split("/")[1]) <= cfg.small_n]
    r_point, r_ci = ret[decide]
    th = cfg.model_dump()
    state = retention_state(r_ci, th)
    returned = [k for k in small if (kar[decide][k][1][0] or -np.inf) >= cfg.retention_threshold]
    task_back = [k for k in small if (rr[k][1][0] or -np.inf) >= cfg.recovery_target]
    drop_sig = drop_ci[0] is not None and drop_ci[0] > 0
    # in context: the task came back with no weight update, so the facts it needs were in the weights
    in_context_back = [k for k in task_back if k.startswith("in_context/")]

    checks = []
    if has_base:
        tc, tc_ci = val[("verdict", "tune_change")]
        a_task = wmean(data["aligned"]["task_correct"], point_w)[0]
        a_task_ci = percentile_ci(wmean(data["aligned"]["task_correct"], W), level)
        if tc_ci[0] is not None and tc_ci[0] > cfg.tune_tolerance:
            checks.append(f"the tune stage broke the task: task_acc fell from base to aligned by {_fmt(tc)} "
                          f"{_fmt_ci(tc_ci)}, more than tune_tolerance {cfg.tune_tolerance}")
        elif a_task_ci[1] is not None and a_task_ci[1] < cfg.task_floor:
            checks.append(f"the aligned model does not do the task: task_acc {_fmt(a_task)} {_fmt_ci(a_task_ci)} "
                          f"is below task_floor {cfg.task_floor}")
    ac, ac_ci = val[("verdict", f"above_chance:{decide}")]
    if ac_ci[0] is None or ac_ci[0] <= 0:
        checks.append(f"aligned knowledge ({decide}) does not clear chance {_fmt(chances.get(decide))}: "
                      f"aligned minus chance is {_fmt(ac)} {_fmt_ci(ac_ci)}")

    rtxt = f"knowledge retention ({decide}) {_fmt(r_point)} {_fmt_ci(r_ci)}"
    dtxt = f"the task dropped by {_fmt(drop)} {_fmt_ci(drop_ci)}"
    if checks:
        label, reason = "inconclusive", "; ".join(checks)
    elif not drop_sig:
        held = f"the task drop {_fmt(drop)} {_fmt_ci(drop_ci)} includes 0"
        if state == "retained":
            label, reason = "no_forgetting", f"{held} and {rtxt} >= {cfg.retention_threshold}"
        elif state == "lost":
            label, reason = "knowledge_loss", (f"knowledge fell while the task held: {rtxt} < {cfg.loss_threshold} "
                                               f"({held})")
        elif state == "between":
            label, reason = "mixed", f"knowledge fell partly while the task held: {rtxt} lies between the thresholds ({held})"
        else:
            label, reason = "inconclusive", f"{held}, but {rtxt} straddles a threshold"
    elif state == "retained" or returned or in_context_back and state != "lost":
        label = "spurious"
        why = [f"{rtxt} >= {cfg.retention_threshold}" if state == "retained" else
               f"knowledge returns after recovery on disjoint items ({', '.join(returned)}: lower bound >= "
               f"{cfg.retention_threshold})" if returned else
               f"the task returns in context with no weight update ({', '.join(in_context_back)}: recovery ratio "
               f"lower bound >= {cfg.recovery_target}), so the knowledge was in the weights"]
        if task_back:
            why.append(f"task performance returns with a few examples ({', '.join(task_back)})")
        reason = f"{dtxt} but " + "; ".join(why)
    elif state == "lost" and not task_back:
        label = "knowledge_loss"
        tried = sorted({int(k.split("/")[1]) for k in small})
        sizes = f"n = {', '.join(map(str, tried))}" if tried else f"no recovery size tried <= {cfg.small_n}"
        reason = (f"{dtxt}, {rtxt} < {cfg.loss_threshold}, and neither knowledge nor the task returns with "
                  f"recovery ({sizes})")
    elif state in ("lost", "between"):
        label = "mixed"
        reason = (f"{dtxt}; {rtxt} lies between the thresholds" if state == "between" else
                  f"{dtxt}; {rtxt} < {cfg.loss_threshold} but the task returns ({', '.join(task_back)})")
    else:
        label, reason = "inconclusive", (f"{dtxt}, but {rtxt} straddles a threshold" if state == "straddles"
                                         else f"{dtxt}, but {rtxt} has no interval")

    # the other ranking measures: an interval that says the opposite makes the label mixed
    if label in ("spurious", "no_forgetting", "knowledge_loss"):
        against = []
        for m in RANKING_MEASURES:
            if m == decide or m not in ret:
                continue
            st_m = retention_state(ret[m][1], th)
            if label == "knowledge_loss" and st_m == "retained" or label != "knowledge_loss" and st_m == "lost" and not returned:
                against.append(f"{m} {_fmt(ret[m][0])} {_fmt_ci(ret[m][1])}")
        if against:
            reason = f"the measures disagree: {reason}; but retention by {', '.join(against)}"
            label = "mixed"

    pret, pret_ci = None, (None, None)
    P = {
        k: np.mean([np.asarray(c, float) for layer, c in v["probe_correct"].items() if int(layer) >= 1], axis=0)
        for k, v in per_item.items() if v.get("probe_correct") and len(v["probe_correct"]) > 1
    }
    if probe_chance is not None and "aligned" in P and "perturbed" in P:
        M = len(P["aligned"])
        pw = resample_weights(M, n_boot, seed + 1)
        pret = _num(ratio(np.array([P["perturbed"].mean() - probe_chance]), np.array([P["aligned"].mean() - probe_chance]))[0])
        pret_ci = percentile_ci(ratio(wmean(P["perturbed"], pw) - probe_chance, wmean(P["aligned"], pw) - probe_chance), level)

    def vc(x):
        return {"value": x[0], "ci": list(x[1])}

    out = {
        "label": label,
        "reason": reason,
        "checks": checks,
        "decided_by": decide,
        "task_drop": drop if drop is not None else 0.0,
        "task_drop_ci": list(drop_ci),
        "task_drop_significant": drop_sig,
        "knowledge_retention": r_point,
        "knowledge_retention_ci": list(r_ci),
        "recovery_ratio": {k: v[0] for k, v in rr.items()},
        "recovery_ratio_ci": {k: list(v[1]) for k, v in rr.items()},
        "knowledge_after_recovery": {k: v[0] for k, v in kar[decide].items()},
        "knowledge_after_recovery_ci": {k: list(v[1]) for k, v in kar[decide].items()},
        "retention": {m: vc(ret[m]) for m in measures},
        "after_recovery": {m: {k: vc(v) for k, v in kar[m].items()} for m in measures},
        "probe_retention": pret,
        "probe_retention_ci": list(pret_ci),
        "probe_chance": probe_chance,
        "recovery_evidence": evidence,
        "knowledge_chance": chances.get("knowledge_acc"),
        "knowledge_chances": chances,
        "thresholds": cfg.model_dump(),
    }
    if has_base:
        out["tune_change"] = vc(val[("verdict", "tune_change")])
        out["tune_shift"] = {m: vc(val[("verdict", f"tune_shift:{m}")]) for m in measures}
    if has_lp:
        out["gold_logprob_change"] = vc(val[("verdict", "gold_logprob_change")])
    return out


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _fmt_ci(ci) -> str:
    return "[CI n/a]" if ci[0] is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def bootstrap_diff(
    stat: Callable[[dict, np.ndarray], np.ndarray],
    a: dict,
    b: dict,
    n_a: int,
    n_b: int,
    paired: bool,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Bootstrap CI of the difference ``stat(b) - stat(a)`` of two audits, resampling items.

    Args:
        stat: ``stat(arrays, ix)`` -> (R,) values of the statistic on resample rows
            ``ix`` (R, N) of item indices; ``ix = arange(N)[None]`` gives the point estimate.
        a, b: each audit's per-item arrays (e.g. ``"perturbed/task_correct"`` -> (N,)) and
            scalars the statistic needs (e.g. ``"chance"``).
        n_a, n_b: evaluation items of each audit.
        paired: both audits scored the same items in the same order: the same resampled
            items are used for both (a paired bootstrap, Efron & Tibshirani 1993, ch. 16),
            which cancels the between-item variance. Otherwise each is resampled on its own.
        n_boot, level, seed: resamples, two-sided level, RNG seed.

    Returns:
        ``{"diff", "ci_low", "ci_high", "significant", "p"}``: significant when the
        percentile CI of the difference excludes 0 (one test, uncorrected); ``p`` its
        two-sided bootstrap p-value (:func:`components.stats.bootstrap_p`), for a
        multiple-comparison correction across several differences; CI bounds, ``p`` and
        ``significant`` are None when more resamples than the CI's tail are undefined
        (:func:`percentile_ci`).

    Raises:
        ValueError: ``paired`` with ``n_a != n_b``.
    """
    if paired and n_a != n_b:
        raise ValueError(f"a paired bootstrap needs the same items; got {n_a} and {n_b}")
    rng = np.random.default_rng(seed)
    ix_a = rng.integers(0, n_a, size=(n_boot, n_a))
    ix_b = ix_a if paired else rng.integers(0, n_b, size=(n_boot, n_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(stat(b, np.arange(n_b)[None, :])[0] - stat(a, np.arange(n_a)[None, :])[0])
        diffs = np.asarray(stat(b, ix_b) - stat(a, ix_a), dtype=float)
    lo, hi = percentile_ci(diffs, level)
    if not np.isfinite(point) or lo is None:
        return {"diff": point if np.isfinite(point) else None, "ci_low": None, "ci_high": None,
                "significant": None, "p": None}
    return {"diff": point, "ci_low": lo, "ci_high": hi, "significant": bool(lo > 0 or hi < 0),
            "p": bootstrap_p(diffs)}


STAGE_METRICS = ("task_acc", "knowledge_acc", "knowledge_acc_token", "knowledge_acc_byte", "knowledge_mrr",
                 "knowledge_margin", "gold_logprob", "first_token_prob", "perturb_acc", "kl_to_base", "kl_to_aligned")


def verdict_of(probes: dict[str, dict], order: list[str], cfg: VerdictConfig, n_boot: int = 1000,
               level: float = 0.95, seed: int = 0) -> dict:
    """:func:`compute_verdict` from the probe results of an audit's checkpoints (every
    name of ``order``, ``base`` included): their per-item values, the chance level of
    each knowledge measure, the items' clusters and the probes' chance level."""
    base = probes["base"]
    probe_info = base.get("probe")
    return compute_verdict(
        {name: probes[name]["per_item"] for name in order},
        base.get("knowledge_chances") or base["knowledge_chance"], cfg, n_boot, level, seed,
        probe_chance=probe_info["chance"] if probe_info else None,
        groups=base["per_item"].get("groups"),
    )


def verdict_rows(verdict: dict) -> list[dict]:
    """The verdict's quantities as long-form rows (stage, metric, layer, value, ci_low,
    ci_high) for ``metrics.parquet``."""
    rows = []

    def row(stage, metric, value, ci):
        rows.append({"stage": stage, "metric": metric, "layer": None, "value": value,
                     "ci_low": ci[0], "ci_high": ci[1]})

    for k in ("task_drop", "knowledge_retention", "probe_retention"):
        row("verdict", k, verdict[k], verdict[f"{k}_ci"])
    for m, v in verdict.get("retention", {}).items():
        row("verdict", f"retention:{m}", v["value"], v["ci"])
    for m, v in verdict.get("tune_shift", {}).items():
        row("verdict", f"tune_shift:{m}", v["value"], v["ci"])
    for k in ("tune_change", "gold_logprob_change"):
        if k in verdict:
            row("verdict", k, verdict[k]["value"], verdict[k]["ci"])
    for key, v in verdict["recovery_ratio"].items():
        row(f"recovered/{key}", "recovery_ratio", v, verdict["recovery_ratio_ci"][key])
        row(f"recovered/{key}", "knowledge_after_recovery", verdict["knowledge_after_recovery"][key],
            verdict["knowledge_after_recovery_ci"][key])
        for m, by in verdict.get("after_recovery", {}).items():
            row(f"recovered/{key}", f"after_recovery:{m}", by[key]["value"], by[key]["ci"])
    return rows
