"""The verdict: spurious forgetting (alignment loss) or knowledge loss (DESIGN.md, "Verdict").

Quantities (K = knowledge_acc, c = its chance level 1/K_candidates):

- ``task_drop`` = task_acc(aligned) - task_acc(perturbed)
- ``knowledge_retention`` = (K(perturbed) - c) / (K(aligned) - c)
- ``knowledge_after_recovery[arm/n]`` = (K(recovered) - c) / (K(aligned) - c); the
  recovery items never include the evaluated facts, so a return to the aligned level
  shows the facts were still stored (Zheng et al. 2025, arXiv 2501.13453).
- ``recovery_ratio[arm/n]`` = (task_acc(recovered) - task_acc(perturbed)) / task_drop
- ``probe_retention`` = (P(perturbed) - c_P) / (P(aligned) - c_P), P = the linear
  probes' accuracy averaged over the decoder layers (1..L), c_P its majority-class
  chance level: knowledge in the representation (Zhang, Choshen & Andreas 2024, arXiv
  2409.02228). Reported beside the label as independent evidence; it does not decide
  the label, because the probed attribute (e.g. a country's continent) is not the
  evaluated fact (its capital): a model whose capitals were overwritten still knows
  continents.

Every quantity carries a paired bootstrap CI: the same resampled evaluation items are
used for every checkpoint, so the differences are item-matched. :func:`bootstrap_diff`
does the same across two audits (``cl-audit compare``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from components.config import VerdictConfig


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 1e-9, num / np.where(den > 1e-9, den, 1.0), np.nan)


def _ci(samples: np.ndarray, level: float) -> tuple[float | None, float | None]:
    s = samples[np.isfinite(samples)]
    if len(s) < max(10, len(samples) // 2):
        return None, None
    a = (1 - level) / 2
    return float(np.quantile(s, a)), float(np.quantile(s, 1 - a))


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def compute_verdict(
    per_item: dict[str, dict[str, list[float]]],
    chance: float,
    cfg: VerdictConfig,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    probe_chance: float | None = None,
) -> dict:
    """Label an audit from the per-item results of its checkpoints.

    Args:
        per_item: stage name -> ``{"task_correct": (N,), "knowledge_correct": (N,)}``
            for ``aligned``, ``perturbed`` and each ``recovered/<arm>/<n>`` (the same N
            evaluation items in the same order); optionally ``"probe_correct":
            {layer: (M,)}`` over the M probed items.
        chance: chance level of ``knowledge_acc`` (1/K).
        cfg: thresholds (printed beside the label).
        probe_chance: chance level of the probes (majority-class share); None: no
            ``probe_retention``.

    Returns:
        A dict with ``label``, ``reason``, ``task_drop``, ``knowledge_retention``,
        ``recovery_ratio`` and ``knowledge_after_recovery`` (``"arm/n"`` -> value), each
        also with ``*_ci`` ``[low, high]``, ``probe_retention`` (+ ``_ci``, None without
        probes), ``recovery_evidence`` per arm, and ``thresholds``.

    Raises:
        KeyError: ``aligned`` or ``perturbed`` missing from ``per_item``.
    """
    T = {k: np.asarray(v["task_correct"], float) for k, v in per_item.items()}
    K = {k: np.asarray(v["knowledge_correct"], float) for k, v in per_item.items()}
    N = len(T["aligned"])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, N, size=(n_boot, N))

    def stat(fn):
        point = fn(np.arange(N)[None, :])[0]
        boot = fn(idx)
        return _num(point), _ci(boot, level)

    def mean(x, ix):
        return x[ix].mean(-1)

    drop, drop_ci = stat(lambda ix: mean(T["aligned"], ix) - mean(T["perturbed"], ix))
    ret, ret_ci = stat(lambda ix: _ratio(mean(K["perturbed"], ix) - chance, mean(K["aligned"], ix) - chance))
    recovered = sorted(
        (k for k in per_item if k.startswith("recovered/")),
        key=lambda k: (k.split("/")[1], int(k.split("/")[2])),
    )
    rr, rr_ci, kar, kar_ci = {}, {}, {}, {}
    for k in recovered:
        key = k.removeprefix("recovered/")
        rr[key], rr_ci[key] = stat(
            lambda ix, k=k: _ratio(mean(T[k], ix) - mean(T["perturbed"], ix), mean(T["aligned"], ix) - mean(T["perturbed"], ix))
        )
        kar[key], kar_ci[key] = stat(
            lambda ix, k=k: _ratio(mean(K[k], ix) - chance, mean(K["aligned"], ix) - chance)
        )

    pret, pret_ci = None, (None, None)
    P = {
        k: np.mean([np.asarray(c, float) for layer, c in v["probe_correct"].items() if int(layer) >= 1], axis=0)
        for k, v in per_item.items() if v.get("probe_correct") and len(v["probe_correct"]) > 1
    }
    if probe_chance is not None and "aligned" in P and "perturbed" in P:
        M = len(P["aligned"])
        pidx = np.random.default_rng(seed + 1).integers(0, M, size=(n_boot, M))
        point = _ratio(np.array([P["perturbed"].mean() - probe_chance]), np.array([P["aligned"].mean() - probe_chance]))[0]
        boot = _ratio(P["perturbed"][pidx].mean(-1) - probe_chance, P["aligned"][pidx].mean(-1) - probe_chance)
        pret, pret_ci = _num(point), _ci(boot, level)

    evidence = {}
    for arm in sorted({k.split("/")[0] for k in rr}):
        sizes = sorted(int(k.split("/")[1]) for k in rr if k.startswith(arm + "/"))
        hit = next(
            (n for n in sizes if (rr[f"{arm}/{n}"] or -1) >= cfg.recovery_target), None
        )
        evidence[arm] = (
            f"recovery ratio >= {cfg.recovery_target} at n={hit}" if hit is not None
            else f"not within n <= {max(sizes)}"
        )

    small = [k for k in kar if int(k.split("/")[1]) <= cfg.small_n]
    retained = ret is not None and ret >= cfg.retention_threshold
    returned = [k for k in small if (kar[k] or -1) >= cfg.retention_threshold]
    task_back = [k for k in small if (rr[k] or -1) >= cfg.recovery_target]
    lost = (ret is None or ret < cfg.loss_threshold) and not returned

    if drop_ci[0] is None or drop is None or drop_ci[0] <= 0:
        label = "no_forgetting"
        reason = f"the task drop {_fmt(drop)} has a CI {_fmt_ci(drop_ci)} that includes 0"
    elif retained or returned:
        label = "spurious"
        why = []
        if retained:
            why.append(f"knowledge retention {_fmt(ret)} {_fmt_ci(ret_ci)} >= {cfg.retention_threshold}")
        elif returned:
            why.append(f"knowledge returns after recovery on disjoint items ({', '.join(returned)})")
        if task_back:
            why.append(f"task performance returns with a few examples ({', '.join(task_back)})")
        reason = f"the task dropped by {_fmt(drop)} {_fmt_ci(drop_ci)} but " + "; ".join(why)
    elif lost and not task_back:
        label = "knowledge_loss"
        reason = (
            f"the task dropped by {_fmt(drop)} {_fmt_ci(drop_ci)}, knowledge retention is {_fmt(ret)} "
            f"{_fmt_ci(ret_ci)} < {cfg.loss_threshold}, and neither knowledge nor the task returns "
            f"with recovery (n <= {cfg.small_n})"
        )
    else:
        label = "mixed"
        reason = (
            f"the task dropped by {_fmt(drop)} {_fmt_ci(drop_ci)}; knowledge retention {_fmt(ret)} "
            f"{_fmt_ci(ret_ci)} lies between the thresholds or the measures disagree"
        )
    return {
        "label": label,
        "reason": reason,
        "task_drop": drop if drop is not None else 0.0,
        "task_drop_ci": list(drop_ci),
        "knowledge_retention": ret,
        "knowledge_retention_ci": list(ret_ci),
        "recovery_ratio": rr,
        "recovery_ratio_ci": {k: list(v) for k, v in rr_ci.items()},
        "knowledge_after_recovery": kar,
        "knowledge_after_recovery_ci": {k: list(v) for k, v in kar_ci.items()},
        "probe_retention": pret,
        "probe_retention_ci": list(pret_ci),
        "probe_chance": probe_chance,
        "recovery_evidence": evidence,
        "knowledge_chance": chance,
        "thresholds": cfg.model_dump(),
    }


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
        ``{"diff", "ci_low", "ci_high", "significant"}``: significant when the percentile
        CI of the difference excludes 0; CI bounds are None when fewer than half the
        resamples give a finite value (a ratio with a zero denominator).

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
    fin = diffs[np.isfinite(diffs)]
    if not np.isfinite(point) or len(fin) < max(10, n_boot // 2):
        return {"diff": point if np.isfinite(point) else None, "ci_low": None, "ci_high": None,
                "significant": None}
    q = (1 - level) / 2
    lo, hi = float(np.quantile(fin, q)), float(np.quantile(fin, 1 - q))
    return {"diff": point, "ci_low": lo, "ci_high": hi, "significant": bool(lo > 0 or hi < 0)}


STAGE_METRICS = ("task_acc", "knowledge_acc", "first_token_prob", "perturb_acc", "kl_to_base", "kl_to_aligned")


def assess(probes: dict[str, dict], order: list[str], cfg: VerdictConfig,
           n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Per-checkpoint metrics, drift and the verdict from the probe results of one audit.

    Args:
        probes: checkpoint name -> the probe stage's result (``metrics``, ``per_item``,
            ``knowledge_chance``, ``answer_tokens`` and ``dir`` holding
            ``ref_logprobs.safetensors``); must hold ``base``, ``aligned`` and
            ``perturbed``.
        order: the checkpoint names to report, in DAG order (``base``, ``aligned``,
            ``perturbed``, then any ``recovered/<arm>/<n>``).
        cfg: the verdict thresholds.

    Returns:
        ``{"stages": {name: {metric: value, "knowledge_chance", "ci": {metric: [lo, hi]}}},
        "verdict": compute_verdict(...), "rows": [long-form metric rows: stage, metric,
        layer, value, ci_low, ci_high]}``. ``kl_to_base`` / ``kl_to_aligned`` are the
        mean per-token KL(pi_ref || pi) over the gold answers' tokens (nats/token;
        Shenfeld et al. 2025, arXiv 2509.04259), with bootstrap CIs over items.

    Raises:
        KeyError: a checkpoint of ``order`` (or base/aligned/perturbed) has no probe.
    """
    from components.metrics import drift_kl, summarise
    from components.probe import load_ref_logprobs

    boot = dict(n_boot=n_boot, level=level, seed=seed)
    chance = probes["base"]["knowledge_chance"]
    lp = {name: load_ref_logprobs(probes[name]["dir"]) for name in order}
    lengths = np.array(probes["base"]["answer_tokens"])
    stages, rows = {}, []
    for name in order:
        m = dict(probes[name]["metrics"])
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

    per_item = {name: probes[name]["per_item"] for name in order if name != "base"}
    verdict = compute_verdict(per_item, chance, cfg, **boot)
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
    return {"stages": stages, "verdict": verdict, "rows": rows}
