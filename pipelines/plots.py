"""The audit's figures (matplotlib, PNG): what a reader looks at before the numbers.

Every function takes what the run folder holds (``summary.json`` as a dict, the long-form
``metrics.parquet`` as a DataFrame, a sweep table where a sweep ran) and returns a
:class:`Plot` (PNG bytes, title, caption), or ``None`` when the run has no data for it,
so a run without per-layer probes simply has no per-layer probe figure.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas (no
pyplot, no global state, no display): safe in a Ray worker or a test process.

Figures (DESIGN.md, "Metrics"):

- ``decomposition``: ``task_acc`` and ``knowledge_acc`` per checkpoint with their
  bootstrap CIs and the knowledge chance level (task performance = alignment +
  knowledge; Zheng et al. 2025, arXiv 2501.13453).
- ``recovery``: ``task_acc`` and ``knowledge_acc`` against the number n of recovery
  examples, one line per arm, n = 0 being the perturbed checkpoint, with the aligned and
  perturbed levels as reference lines.
- ``kl_drift``: ``kl_to_base`` and ``kl_to_aligned`` per checkpoint (nats/token; Shenfeld
  et al. 2025, arXiv 2509.04259).
- ``probe_layers``: ``probe_acc`` per layer for each checkpoint (Zhang, Choshen & Andreas
  2024, arXiv 2409.02228), when ``metrics.parquet`` has per-layer ``probe_acc`` rows.
- ``weight_drift``: ‖ΔW‖_F / ‖W‖_F per layer for each stage's update, when it has
  per-layer ``weight_drift`` rows.
- ``sweep_heatmap``: recovery ratio over ``perturb.kl_penalty`` × recovery size n, when a
  sweep table with those columns is given.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

TASK_COLOR = "#1f6fb4"
KNOW_COLOR = "#e07b00"
ALIGNED_COLOR = "#2a9d4b"
PERTURBED_COLOR = "#c0392b"
CHANCE_COLOR = "#777777"
ARM_COLORS = ["#6a3d9a", "#b15928", "#1b9e77", "#e7298a", "#66a61e", "#a6761d"]
DPI = 110


@dataclass
class Plot:
    """One figure: ``name`` (file stem), ``title``, ``caption`` (how to read it), PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No timestamp in the PNG metadata: the same data gives the same bytes.
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _ci_err(values, cis) -> np.ndarray:
    """(2, n) asymmetric error-bar lengths from values and ``[low, high]`` CIs (0 where absent)."""
    lo, hi = [], []
    for v, ci in zip(values, cis):
        if v is None or not ci or ci[0] is None or ci[1] is None:
            lo.append(0.0)
            hi.append(0.0)
        else:
            lo.append(max(0.0, v - ci[0]))
            hi.append(max(0.0, ci[1] - v))
    return np.array([lo, hi])


def _val(x) -> float:
    return np.nan if x is None else float(x)


def recovered_stages(summary: dict) -> dict[str, list[tuple[int, str]]]:
    """``{arm: [(n, stage name), ...]}`` sorted by n, from ``recovered/<arm>/<n>`` stages."""
    arms: dict[str, list[tuple[int, str]]] = {}
    for name in summary["stages"]:
        if name.startswith("recovered/"):
            _, arm, n = name.split("/")
            arms.setdefault(arm, []).append((int(n), name))
    return {a: sorted(v) for a, v in arms.items()}


def decomposition_plot(summary: dict) -> Plot:
    """Task accuracy against knowledge accuracy for every checkpoint, with CIs and chance."""
    st = summary["stages"]
    names = list(st)
    x = np.arange(len(names))
    chance = st["base"].get("knowledge_chance")
    fig = Figure(figsize=(max(6.5, 1.15 * len(names) + 2.5), 4.2))
    ax = fig.add_subplot()
    main = [i for i, n in enumerate(names) if not n.startswith("recovered/")]
    for metric, color, marker, dx, label in (
        ("task_acc", TASK_COLOR, "o", -0.09, "task_acc (greedy answer correct)"),
        ("knowledge_acc", KNOW_COLOR, "s", 0.09, "knowledge_acc (gold ranked first of K)"),
    ):
        vals = [st[n].get(metric) for n in names]
        err = _ci_err(vals, [st[n].get("ci", {}).get(metric) for n in names])
        y = np.array([_val(v) for v in vals])
        ax.errorbar(x + dx, y, yerr=err, fmt=marker, color=color, capsize=4, ms=7, label=label, zorder=3)
        ax.plot(x[main] + dx, y[main], "-", color=color, alpha=0.6, zorder=2)
        for xi, yi in zip(x + dx, y):
            if np.isfinite(yi):
                ax.annotate(f"{yi:.2f}", (xi, yi), textcoords="offset points", xytext=(7 if dx > 0 else -7, -3),
                            ha="left" if dx > 0 else "right", fontsize=8, color=color)
    if chance is not None:
        ax.axhline(chance, ls="--", color=CHANCE_COLOR, lw=1, zorder=1)
        ax.text(-0.45, chance + 0.01, f"knowledge chance 1/K = {chance:.2f}", ha="left", va="bottom",
                fontsize=8, color=CHANCE_COLOR)
    if len(main) < len(names):
        ax.axvspan(len(main) - 0.5, len(names) - 0.5, color="#f2f2f2", zorder=0)
        ax.text(len(main) - 0.4, 1.16, "after recovery (rec/<arm>/<n>)", fontsize=8, color="#555", va="top")
    ax.set_xticks(x, [n.replace("recovered/", "rec/") for n in names], rotation=20 if len(names) > 5 else 0)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(-0.05, 1.2)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("accuracy on the evaluation facts")
    ax.set_title("Task performance vs knowledge across the stages (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2 if len(names) > 5 else -0.1), ncol=2, fontsize=8,
              frameon=False)
    caption = (
        "Blue circles: how often the model's own greedy answer is right (the aligned behaviour). "
        "Orange squares: how often the right answer is ranked first among K candidates by likelihood "
        "(knowledge, whatever the model chooses to say). Bars are bootstrap 95% CIs over the evaluation items. "
        "If blue falls at 'perturbed' while orange stays well above the chance line, the facts are still "
        "stored and only the alignment was lost (spurious forgetting)."
    )
    return Plot("decomposition", "Decomposition: task vs knowledge", caption, _png(fig))


def recovery_plot(summary: dict) -> Plot | None:
    """Task and knowledge accuracy against recovery size n per arm (n = 0: perturbed)."""
    arms = recovered_stages(summary)
    if not arms:
        return None
    st = summary["stages"]
    chance = st["base"].get("knowledge_chance")
    fig = Figure(figsize=(10, 4.0))
    axes = fig.subplots(1, 2, sharey=True)
    all_n = sorted({0, *(n for v in arms.values() for n, _ in v)})
    for ax, metric, what in (
        (axes[0], "task_acc", "task_acc (greedy answer correct)"),
        (axes[1], "knowledge_acc", "knowledge_acc (gold ranked first)"),
    ):
        al, pe = _val(st["aligned"].get(metric)), _val(st["perturbed"].get(metric))
        ax.axhline(al, ls="--", color=ALIGNED_COLOR, lw=1.2, label=f"aligned level {al:.2f}")
        ax.axhline(pe, ls=":", color=PERTURBED_COLOR, lw=1.5, label=f"perturbed level {pe:.2f}")
        if metric == "knowledge_acc" and chance is not None:
            ax.axhline(chance, ls="-.", color=CHANCE_COLOR, lw=1, label=f"chance {chance:.2f}")
        for i, (arm, pts) in enumerate(sorted(arms.items())):
            names = ["perturbed"] + [name for _, name in pts]
            ns = [0] + [n for n, _ in pts]
            vals = [st[n].get(metric) for n in names]
            err = _ci_err(vals, [st[n].get("ci", {}).get(metric) for n in names])
            dx = (i - (len(arms) - 1) / 2) * 0.08 * max(1, max(all_n)) / 4
            ax.errorbar(np.array(ns) + dx, [_val(v) for v in vals], yerr=err, fmt="o-",
                        color=ARM_COLORS[i % len(ARM_COLORS)], capsize=3, label=f"arm: {arm}")
        ax.set_xticks(all_n)
        ax.set_xlabel("n recovery examples (0 = perturbed checkpoint)")
        ax.set_title(what, fontsize=10)
        ax.set_ylim(-0.05, 1.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    axes[0].set_ylabel("accuracy on the evaluation facts")
    fig.suptitle("Recovery curves: does a little training on other items bring it back?", fontsize=11)
    caption = (
        "Each arm trains the perturbed model on n examples that never include an evaluated fact: "
        "'in_task' = the same task on other facts, 'irrelevant' = an unrelated task ('in_context': the in_task "
        "examples as few-shot turns, no training). A curve that climbs "
        "back to the green aligned line with small n means the evaluated facts were still stored "
        "(recovery on disjoint or unrelated items cannot re-teach them; Zheng et al. 2025)."
    )
    return Plot("recovery", "Recovery curves", caption, _png(fig))


def kl_plot(summary: dict) -> Plot | None:
    """KL drift from the base and from the aligned model per checkpoint (nats/token)."""
    st = summary["stages"]
    names = list(st)
    if not any(st[n].get("kl_to_base") is not None for n in names):
        return None
    x = np.arange(len(names))
    w = 0.38
    fig = Figure(figsize=(max(6.5, 1.15 * len(names) + 2.5), 3.8))
    ax = fig.add_subplot()
    for metric, color, dx, label in (
        ("kl_to_base", "#8c6bb1", -w / 2, "KL(base ‖ checkpoint)"),
        ("kl_to_aligned", ALIGNED_COLOR, w / 2, "KL(aligned ‖ checkpoint)"),
    ):
        vals = [st[n].get(metric) for n in names]
        err = _ci_err(vals, [st[n].get("ci", {}).get(metric) for n in names])
        bars = ax.bar(x + dx, [_val(v) if v is not None else 0 for v in vals], w, yerr=err, color=color,
                      capsize=3, label=label, alpha=0.85)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(x, [n.replace("recovered/", "rec/") for n in names], rotation=20 if len(names) > 5 else 0)
    ax.set_ylabel("mean KL per answer token (nats)")
    ax.set_title("Drift: KL divergence from the reference models (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.12)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2 if len(names) > 5 else -0.1), ncol=2, fontsize=8,
              frameon=False)
    caption = (
        "Mean per-token forward KL(reference ‖ checkpoint) over the gold answers' tokens, teacher-forced: how far "
        "each checkpoint's next-token distribution moved from the base model (purple) and from the aligned "
        "model (green). Larger drift from the aligned model predicts more forgetting (Shenfeld et al. 2025, "
        "arXiv 2509.04259)."
    )
    return Plot("kl_drift", "KL drift per stage", caption, _png(fig))


def _layer_rows(metrics: pd.DataFrame | None, metric: str) -> pd.DataFrame:
    if metrics is None or metrics.empty or "layer" not in metrics:
        return pd.DataFrame()
    rows = metrics[(metrics["metric"] == metric) & metrics["layer"].notna()]
    return rows.sort_values(["stage", "layer"])


def _per_layer_plot(summary: dict, rows: pd.DataFrame, fig_title: str, ylabel: str) -> Figure:
    order = {n: i for i, n in enumerate(summary["stages"])}
    stages = sorted(rows["stage"].unique(), key=lambda s: (order.get(s, len(order)), s))
    fig = Figure(figsize=(8, 4.0))
    ax = fig.add_subplot()
    fixed = {"base": "#555555", "aligned": ALIGNED_COLOR, "perturbed": PERTURBED_COLOR}
    k = 0
    for s in stages:
        r = rows[rows["stage"] == s]
        layers = r["layer"].astype(int).to_numpy()
        vals = r["value"].astype(float).to_numpy()
        color = fixed.get(s)
        if color is None:
            color = ARM_COLORS[k % len(ARM_COLORS)]
            k += 1
        has_ci = {"ci_low", "ci_high"} <= set(r.columns) and r["ci_low"].notna().all() and r["ci_high"].notna().all()
        if has_ci:
            ax.fill_between(layers, r["ci_low"].astype(float), r["ci_high"].astype(float), color=color, alpha=0.15)
        ax.plot(layers, vals, "o-", ms=3.5, color=color, label=s)
    ax.set_xlabel("layer (0 = embeddings side)")
    ax.set_ylabel(ylabel)
    ax.set_title(fig_title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def probe_layers_plot(summary: dict, metrics: pd.DataFrame | None) -> Plot | None:
    """Linear-probe accuracy per layer for each checkpoint (drawn when per-layer rows exist)."""
    rows = _layer_rows(metrics, "probe_acc")
    if rows.empty:
        return None
    fig = _per_layer_plot(summary, rows, "Linear probe accuracy per layer", "probe accuracy (cross-validated)")
    ax = fig.axes[0]
    ch = metrics[metrics["metric"] == "probe_chance"]["value"].dropna() if metrics is not None else pd.Series()
    if len(ch):
        ax.axhline(float(ch.iloc[0]), ls="--", color=CHANCE_COLOR, lw=1, label=f"probe chance {float(ch.iloc[0]):.2f}")
        ax.legend(fontsize=7, ncol=2)
    caption = (
        "A logistic-regression probe reads an attribute of each item from the checkpoint's hidden states, layer "
        "by layer (cross-validated; shaded: CI where computed). Curves that stay together across checkpoints "
        "mean the information is still in the representation even where the task answer changed "
        "(Zhang, Choshen & Andreas 2024, arXiv 2409.02228)."
    )
    return Plot("probe_layers", "Per-layer probe accuracy", caption, _png(fig))


def weight_drift_plot(summary: dict, metrics: pd.DataFrame | None) -> Plot | None:
    """Relative weight change ‖ΔW‖_F / ‖W‖_F per layer for each stage's update (when computed)."""
    rows = _layer_rows(metrics, "weight_drift")
    if rows.empty:
        return None
    fig = _per_layer_plot(summary, rows, "Where the update went: relative weight change per layer",
                          "‖ΔW‖_F / ‖W‖_F")
    caption = (
        "Relative Frobenius norm of each stage's weight update, per transformer layer. Updates concentrated in "
        "a few layers, or in the bottom layers, locate where a fine-tune changed the model (Zheng et al. 2025 "
        "freeze the bottom layers to prevent spurious forgetting)."
    )
    return Plot("weight_drift", "Per-layer weight drift", caption, _png(fig))


def _find_col(cols, *cands: str) -> str | None:
    for c in cands:
        for col in cols:
            if col == c or col.endswith("." + c) or col.endswith("/" + c):
                return col
    return None


def sweep_heatmap_plot(sweep: pd.DataFrame | None, value: str = "recovery_ratio") -> Plot | None:
    """Heatmap of ``value`` (default the recovery ratio) over KL penalty × recovery size n.

    Expects one row per trial with a column ending in ``kl_penalty``, one ending in
    ``size`` (or named ``n``), and ``value``; an ``arm`` column gives one panel per arm.
    Returns ``None`` when the table lacks them.
    """
    if sweep is None or sweep.empty:
        return None
    cols = list(sweep.columns)
    pen = _find_col(cols, "kl_penalty")
    size = _find_col(cols, "size", "sizes", "n")
    val = _find_col(cols, value)
    if not (pen and size and val):
        return None
    arm_col = _find_col(cols, "arm")
    groups = sorted(sweep[arm_col].dropna().unique()) if arm_col else [None]
    fig = Figure(figsize=(4.6 * len(groups) + 1, 3.9))
    axes = np.atleast_1d(fig.subplots(1, len(groups), squeeze=False)[0])
    img = None
    for ax, g in zip(axes, groups):
        df = sweep if g is None else sweep[sweep[arm_col] == g]
        table = df.pivot_table(index=pen, columns=size, values=val, aggfunc="mean").sort_index().sort_index(axis=1)
        data = table.to_numpy(dtype=float)
        img = ax.imshow(data, cmap="viridis", vmin=0, vmax=max(1.0, np.nanmax(data) if np.isfinite(data).any() else 1),
                        aspect="auto", origin="lower")
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if np.isfinite(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if data[i, j] < 0.6 else "black")
        ax.set_xticks(range(data.shape[1]), [str(c) for c in table.columns])
        ax.set_yticks(range(data.shape[0]), [f"{v:g}" for v in table.index])
        ax.set_xlabel("recovery size n")
        ax.set_ylabel("perturb.kl_penalty")
        ax.set_title(f"arm: {g}" if g is not None else value, fontsize=10)
    fig.colorbar(img, ax=list(axes), label=value, shrink=0.9)
    fig.suptitle(f"Sweep: {value} over KL penalty × recovery size", fontsize=11)
    caption = (
        f"Each cell is one sweep trial: {value} after recovering with n examples from a model perturbed with "
        "that KL penalty. 1.0 means the task came all the way back to the aligned level."
    )
    return Plot("sweep_heatmap", "Sweep heatmap", caption, _png(fig))


def all_plots(summary: dict, metrics: pd.DataFrame | None = None, sweep: pd.DataFrame | None = None) -> list[Plot]:
    """Every figure the run has data for, in reading order."""
    out = [
        decomposition_plot(summary),
        recovery_plot(summary),
        kl_plot(summary),
        probe_layers_plot(summary, metrics),
        weight_drift_plot(summary, metrics),
        sweep_heatmap_plot(sweep),
    ]
    return [p for p in out if p is not None]
