"""The one bootstrap of the project: resample weights over items (or clusters of items),
weighted means, percentile intervals that keep undefined resamples, and ratios that are
undefined where their denominator is not positive. Used by every per-checkpoint metric
(:func:`summarise`), every verdict quantity (:mod:`components.verdict`) and
``cl-audit compare`` (:func:`components.verdict.bootstrap_diff`).
"""

from __future__ import annotations

import numpy as np


def resample_weights(n: int, n_boot: int, seed: int, groups: list | None = None) -> np.ndarray:
    """Bootstrap resamples of ``n`` items as (n_boot, n) weights: how often each item is
    drawn. With ``groups`` (a cluster label per item: one person's several questions),
    whole clusters are drawn with replacement and every item of a drawn cluster counts
    once per draw (the cluster bootstrap; Field & Welsh 2007, "Bootstrapping clustered
    data", JRSS B 69(3)). The same weights serve every checkpoint of an audit, so
    differences between checkpoints are item-matched (a paired bootstrap)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, n, size=(n_boot, n))
        w = np.zeros((n_boot, n))
        np.add.at(w, (np.arange(n_boot)[:, None], idx), 1.0)
        return w
    labels, member = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    c = len(labels)
    idx = rng.integers(0, c, size=(n_boot, c))
    counts = np.zeros((n_boot, c))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
    return counts[:, member]


def wmean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted means of ``x`` (N,) under resample weights ``w`` (R, N) -> (R,)."""
    return w @ np.asarray(x, float) / w.sum(1)


def percentile_ci(samples: np.ndarray, level: float) -> tuple[float | None, float | None]:
    """Percentile CI of bootstrap ``samples`` (R,), which may hold undefined values
    (NaN: a ratio whose denominator was <= 0 in that resample).

    Undefined resamples are not dropped (that would narrow the CI): they sit below every
    value for the lower bound and above every value for the upper one. When more than
    (1 - level) / 2 of them are undefined, no bound is defined: (None, None).
    """
    s = np.asarray(samples, float)
    bad = ~np.isfinite(s)
    a = (1 - level) / 2
    if len(s) == 0 or bad.mean() > a:
        return None, None
    lo = float(np.quantile(np.where(bad, -1e300, s), a))
    hi = float(np.quantile(np.where(bad, 1e300, s), 1 - a))
    if abs(lo) >= 1e299 or abs(hi) >= 1e299:
        return None, None
    return lo, hi


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` where ``den > 0``, NaN (undefined) elsewhere: a retention is only
    defined when the reference lies above chance."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 1e-9, num / np.where(den > 1e-9, den, 1.0), np.nan)


def bootstrap_ci(values: np.ndarray, n_boot: int, level: float, seed: int,
                 groups: list | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (N,), resampling items (or
    whole clusters of items, ``groups``: :func:`resample_weights`)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    lo, hi = percentile_ci(wmean(v, resample_weights(len(v), n_boot, seed, groups)), level)
    return (float("nan") if lo is None else lo), (float("nan") if hi is None else hi)


def summarise(values: np.ndarray, n_boot: int, level: float, seed: int, groups: list | None = None) -> dict:
    """``{"value", "ci_low", "ci_high"}`` of the mean of per-item ``values``."""
    lo, hi = bootstrap_ci(values, n_boot, level, seed, groups)
    return {"value": float(np.mean(values)) if len(values) else float("nan"), "ci_low": lo, "ci_high": hi}


def bootstrap_p(samples: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the statistic is 0" from the resampled differences
    ``samples`` (R,): twice the smaller share of resamples on either side of 0 (each
    share counting 0 itself), with one added to counts and total so it is never 0
    (Davison & Hinkley 1997, eq. 4.11); at most 1. It is the p-value that inverts the
    percentile CI: p < 1 - level exactly when that CI excludes 0 (up to the +1).

    Undefined resamples (NaN, a ratio whose denominator was <= 0) count on both sides,
    as :func:`percentile_ci` keeps them: they can only raise p. Resolution: the smallest
    p is 2 / (R + 1).
    """
    s = np.asarray(samples, float)
    if len(s) == 0:
        return 1.0
    bad = ~np.isfinite(s)
    below = int(np.sum(bad | (s <= 0)))
    above = int(np.sum(bad | (s >= 0)))
    return float(min(1.0, 2 * (min(below, above) + 1) / (len(s) + 1)))


def normal_p(diff: float, ci_a, ci_b, level: float) -> float | None:
    """Two-sided p-value of ``diff`` = b - a from the two estimates' ``level`` CIs alone
    (no per-item values): each CI's half width over the normal quantile is its standard
    error, the two independent (Wald test). None when a CI is missing; 0 or 1 when both
    CIs have zero width (a difference without noise, or none)."""
    from statistics import NormalDist

    if diff is None or not ci_a or not ci_b or None in (*ci_a, *ci_b):
        return None
    z = NormalDist().inv_cdf(0.5 + level / 2)
    se = float(np.hypot((ci_a[1] - ci_a[0]) / (2 * z), (ci_b[1] - ci_b[0]) / (2 * z)))
    if se <= 0:
        return 1.0 if diff == 0 else 0.0
    return float(2 * (1 - NormalDist().cdf(abs(diff) / se)))


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given; None stays None
    and is not counted as a test. Rejecting where the adjusted p < alpha controls the
    family-wise error rate at alpha over all the tests, under any dependence."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out
