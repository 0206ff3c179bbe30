"""Analysis of a sweep's trials: the table, the ranking, the best cell, the smallest
recovery set per perturbation, the Pareto set and the recovery heatmap.

Everything here turns the trials of a finished (or stopped) Tune experiment into what
``sweep.parquet``, ``sweep_summary.json`` and ``recovery_heatmap.png`` hold; running
the sweep is :mod:`pipelines.sweep`.

"Best" never ranks cells by a recovery metric alone: a cell whose task drop is not
significant (its CI includes 0) has nothing to recover, and its ``recovery_ratio``
divides by a drop indistinguishable from noise. Every row carries ``drop_significant``
(the verdict's ``task_drop_significant``), the task drop with its CI and the absolute
``recovered_task_acc`` with its CI; under a recovery metric (:data:`RECOVERY_METRICS`)
cells whose drop is significant rank first (:func:`rank_trials`), and
``sweep_summary.json`` says so in ``best_rule``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CELL_COLUMNS = ["kl_penalty", "n", "arm", "freeze_layers"]
METRIC_COLUMNS = [
    "task_drop", "task_drop_ci_low", "task_drop_ci_high", "knowledge_retention", "perturb_acc",
    "kl_to_aligned", "aligned_task_acc", "perturbed_task_acc", "perturbed_knowledge_acc",
    "recovery_ratio", "recovery_ratio_ci_low", "recovery_ratio_ci_high", "knowledge_after_recovery",
    "recovered_task_acc", "recovered_task_acc_ci_low", "recovered_task_acc_ci_high", "recovered_knowledge_acc",
    "recovered_kl_to_aligned",
]
TABLE_COLUMNS = [
    "trial_id", "status", *CELL_COLUMNS, *METRIC_COLUMNS, "drop_significant", "label", "iterations",
    "stopped_early", "stages_computed", "seconds", "mlflow_run_id", "error",
]
# The objectives measured after the recover stage. Under one of them, cells whose task
# drop is significant rank before every cell whose drop CI includes 0 (rank_trials).
# The perturbation's own metrics (task_drop, knowledge_retention, perturb_acc,
# kl_to_aligned) rank alone: under task_drop/min, a drop that is not significant is
# exactly what the search looks for.
RECOVERY_METRICS = ("recovery_ratio", "knowledge_after_recovery", "recovered_task_acc", "recovered_knowledge_acc",
                    "recovered_kl_to_aligned")


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def sweep_table(exp_dir: Path) -> pd.DataFrame:
    """A row per trial of the Tune experiment in ``exp_dir`` (read from its saved state),
    with :data:`TABLE_COLUMNS`; rows sorted by the cell (arm, freeze_layers,
    kl_penalty, n). ``drop_significant`` is a bool column: False where the task drop's
    CI includes 0 and where the trial never reported its drop."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(exp_dir))
    rows = []
    for t in analysis.trials:
        r = t.last_result or {}
        row = {"trial_id": t.trial_id, "status": t.status}
        for k in CELL_COLUMNS:
            row[k] = t.config.get(k)
        for k in METRIC_COLUMNS:
            row[k] = _num(r.get(k)) if isinstance(r.get(k), (int, float)) or r.get(k) is None else float("nan")
        sig = r.get("drop_significant")
        if not isinstance(sig, (bool, np.bool_)):  # a trial reported before the column existed
            sig = math.isfinite(row["task_drop_ci_low"]) and row["task_drop_ci_low"] > 0
        row["drop_significant"] = bool(sig)
        row["label"] = r.get("label")
        row["iterations"] = int(r.get("training_iteration", 0) or 0)
        row["stopped_early"] = bool(t.status == "TERMINATED" and row["iterations"] < 2)
        row["stages_computed"] = r.get("stages_computed")
        row["seconds"] = _num(r.get("time_total_s"))
        row["mlflow_run_id"] = r.get("mlflow_run_id")
        err = t.get_error() if t.status == "ERROR" else None
        row["error"] = str(err).strip().splitlines()[-1][:500] if err else None
        rows.append(row)
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    df["kl_penalty"] = df["kl_penalty"].astype(float)
    df["n"] = df["n"].astype("Int64")
    df["freeze_layers"] = df["freeze_layers"].astype("Int64")
    df["drop_significant"] = df["drop_significant"].astype(bool)
    df[METRIC_COLUMNS] = df[METRIC_COLUMNS].astype(float)
    return df.sort_values(["arm", "freeze_layers", "kl_penalty", "n", "trial_id"]).reset_index(drop=True)


def pareto_front(df: pd.DataFrame) -> list[dict]:
    """The perturbation settings not dominated in (``perturb_acc`` up, ``task_drop`` down).

    ``perturb_acc`` (how well the new task was learned) and ``task_drop`` (alignment
    lost) depend on the perturbed checkpoint only, so the front is taken over the
    distinct ``(kl_penalty, freeze_layers)`` of the finished trials.
    """
    pts = (
        df.dropna(subset=["perturb_acc", "task_drop"])
        .groupby(["kl_penalty", "freeze_layers"], as_index=False)
        .first()[["kl_penalty", "freeze_layers", "perturb_acc", "task_drop", "kl_to_aligned"]]
    )
    front = []
    for _, p in pts.iterrows():
        dominated = (
            (pts.perturb_acc >= p.perturb_acc) & (pts.task_drop <= p.task_drop)
            & ((pts.perturb_acc > p.perturb_acc) | (pts.task_drop < p.task_drop))
        ).any()
        if not dominated:
            front.append({"kl_penalty": float(p.kl_penalty), "freeze_layers": int(p.freeze_layers),
                          "perturb_acc": float(p.perturb_acc), "task_drop": float(p.task_drop),
                          "kl_to_aligned": _none(p.kl_to_aligned)})
    return sorted(front, key=lambda d: d["kl_penalty"])


def _none(x: Any) -> Any:
    """NaN -> None, numpy scalars -> Python (for JSON)."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA:
        return None
    if isinstance(x, np.generic):
        x = x.item()
        return None if isinstance(x, float) and math.isnan(x) else x
    return x


def smallest_n(df: pd.DataFrame, target: float) -> list[dict]:
    """Per (kl_penalty, arm, freeze_layers) of the finished trials in ``df``: the
    smallest n whose recovery ratio reaches ``target`` (``n`` None when no tried size
    does, or when the ratio is undefined because the task did not drop), and whether
    the group's task drop (one perturbed checkpoint) is significant; the note says when
    it is not (the ratio then divides by a drop indistinguishable from 0)."""
    out = []
    for (p, arm, fz), g in df.groupby(["kl_penalty", "arm", "freeze_layers"]):
        g = g.sort_values("n")
        tried = g.dropna(subset=["recovery_ratio"])
        hit = tried[tried.recovery_ratio >= target]
        if len(hit):
            note = f"recovery ratio >= {target} at n={int(hit.n.iloc[0])}"
        elif len(tried):
            note = f"not within n <= {int(tried.n.max())}"
        else:
            note = "recovery ratio undefined: the task did not drop"
        sig = bool(g.drop_significant.all())
        if len(tried) and not sig:
            note += " (the task drop is not significant: the ratio is not meaningful)"
        out.append({"kl_penalty": float(p), "arm": arm, "freeze_layers": int(fz), "target": target,
                    "n": int(hit.n.iloc[0]) if len(hit) else None,
                    "recovery_ratio": _none(hit.recovery_ratio.iloc[0]) if len(hit) else None,
                    "task_drop": _none(g.task_drop.iloc[0]), "drop_significant": sig, "note": note})
    return out


def rank_trials(df: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """The finished trials of ``df``, best first.

    Under a recovery metric (:data:`RECOVERY_METRICS`) the trials whose task drop is
    significant come first, then those whose drop CI includes 0; within each, ``metric``
    by ``mode`` (``max``: highest first). Under another metric, ``metric`` alone. Trials
    without a value of ``metric`` come last; ties keep the table order (arm,
    freeze_layers, kl_penalty, n: the smaller n first).
    """
    ok = df[df.status == "TERMINATED"]
    keys, ascending = [], []
    if metric in RECOVERY_METRICS:
        keys.append("drop_significant")
        ascending.append(False)
    keys.append(metric)
    ascending.append(mode == "min")
    return ok.sort_values(keys, ascending=ascending, kind="stable", na_position="last")


def best_rule(metric: str, mode: str, level: float, any_significant: bool) -> str:
    """The sentence of ``sweep_summary.json`` (``best_rule``) saying how "best" was chosen."""
    most = "highest" if mode == "max" else "lowest"
    pct = f"{level * 100:g}%"
    if metric not in RECOVERY_METRICS:
        return (f"Best is the finished trial with the {most} {metric}, ranked by {metric} alone: it is measured "
                "before recovery, so whether the task drop is significant does not decide; ties go to the first "
                "cell in table order (arm, freeze_layers, kl_penalty, n).")
    text = (f"Best is the finished trial with the {most} {metric} among those whose task drop is significant "
            f"(the lower bound of its {pct} CI is above 0); trials whose task-drop CI includes 0 rank after every "
            f"significant one, because after a drop indistinguishable from 0 there is nothing to recover and "
            f"the recovery ratio divides by noise; ties go to the first cell in table order (arm, freeze_layers, "
            f"kl_penalty, n).")
    if not any_significant:
        text += (f" No finished trial's task drop was significant, so this best is chosen among trials whose "
                 f"{metric} does not measure a recovery.")
    return text


def best_trial(df: pd.DataFrame, metric: str, mode: str) -> dict | None:
    """The first trial of :func:`rank_trials` with a value of ``metric``, as a dict
    (its cell, metric value, every metric column, ``drop_significant``, verdict)."""
    ok = rank_trials(df, metric, mode).dropna(subset=[metric])
    if ok.empty:
        return None
    row = ok.iloc[0]
    return {
        "trial_id": row.trial_id,
        "config": {k: _none(row[k]) for k in CELL_COLUMNS},
        "metric": metric, "mode": mode, "value": _none(row[metric]),
        "drop_significant": bool(row.drop_significant),
        "metrics": {k: _none(row[k]) for k in METRIC_COLUMNS},
        "label": row.label, "mlflow_run_id": row.mlflow_run_id,
    }


def ranking(df: pd.DataFrame, metric: str, mode: str) -> list[dict]:
    """The finished trials in :func:`rank_trials` order, with what decides the rank
    beside the recovery ratio: the task drop and its CI, whether it is significant, the
    absolute task accuracy after recovery and its CI (``sweep_summary.json``
    ``ranking``)."""
    def ci(row, k):
        return [_none(row[f"{k}_ci_low"]), _none(row[f"{k}_ci_high"])]

    return [{
        "trial_id": row.trial_id,
        "config": {k: _none(row[k]) for k in CELL_COLUMNS},
        "value": _none(row[metric]),
        "drop_significant": bool(row.drop_significant),
        "task_drop": _none(row.task_drop), "task_drop_ci": ci(row, "task_drop"),
        "recovered_task_acc": _none(row.recovered_task_acc),
        "recovered_task_acc_ci": ci(row, "recovered_task_acc"),
        "recovery_ratio": _none(row.recovery_ratio), "recovery_ratio_ci": ci(row, "recovery_ratio"),
        "label": row.label,
    } for _, row in rank_trials(df, metric, mode).iterrows()]


def recovery_heatmap(df: pd.DataFrame, title: str) -> bytes:
    """PNG: recovery ratio over kl_penalty (rows) x n (columns), one panel per
    (arm, freeze_layers); cells without a value are grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(df.groupby(["arm", "freeze_layers"])) or [(("-", 0), df)]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups) + 1, 3.6), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#cccccc")
    im = None
    for ax, ((arm, fz), g) in zip(axes[0], groups):
        piv = g.pivot_table(index="kl_penalty", columns="n", values="recovery_ratio", aggfunc="mean", dropna=False)
        vals = piv.to_numpy(dtype=float)
        top = float(np.nanmax(vals)) if np.isfinite(vals).any() else 1.0
        low = float(np.nanmin(vals)) if np.isfinite(vals).any() else 0.0
        im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=min(0.0, low), vmax=max(1.0, top),
                       aspect="auto", origin="lower")
        ax.set_xticks(range(len(piv.columns)), [str(c) for c in piv.columns])
        ax.set_yticks(range(len(piv.index)), [f"{p:.3g}" for p in piv.index])
        ax.set_xlabel("recovery-set size n")
        ax.set_ylabel("perturb.kl_penalty")
        ax.set_title(f"{arm}" + (f", freeze {fz}" if fz else ""))
        for i in range(vals.shape[0]):
            for j in range(vals.shape[1]):
                ok = np.isfinite(vals[i, j])
                ax.text(j, i, f"{vals[i, j]:.2f}" if ok else "n/a", ha="center", va="center", fontsize=9,
                        color="white" if ok and vals[i, j] < 0.6 else "black")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="recovery ratio")
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
