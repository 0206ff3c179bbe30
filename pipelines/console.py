"""What the ``cl-audit`` commands print: rich tables, text lines and progress bars,
and the number formats of the pipelines layer (:func:`fmt`, :func:`fmt_ci`,
:func:`fmt_value_ci`; the HTML report uses them with its own placeholders).

Nothing here reads or writes files: each function takes what a command loaded
(a ``summary.json``, a sweep summary, history rows, a comparison) and returns what
it prints.
"""

from __future__ import annotations

import time

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table


def fmt(x, nd: int = 3, none: str = "-") -> str:
    """``x`` with ``nd`` decimals; ``none`` when it is None."""
    return none if x is None else f"{x:.{nd}f}"


def fmt_ci(ci, nd: int = 3, none: str = "n/a") -> str:
    """A confidence interval ``[low, high]`` with ``nd`` decimals; ``none`` when it or
    either bound is missing."""
    return none if not ci or ci[0] is None or ci[1] is None else f"[{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def fmt_value_ci(v, ci, no_ci: str = "") -> str:
    """A value and its CI in a narrow column: ``0.812 [0.62,0.94]``; ``-`` without a
    value, the value and ``no_ci`` without a CI."""
    if v is None:
        return "-"
    if not ci or ci[0] is None:
        return f"{v:.3f}{no_ci}"
    return f"{v:.3f} [{ci[0]:.2f},{ci[1]:.2f}]"


def stage_table(summary: dict) -> Table:
    """The per-stage metrics table (value and 95% CI) of a summary."""
    t = Table(title=f"{summary['suite']} / {summary['model']}", show_lines=False)
    t.add_column("stage")
    cols = ["task_acc", "knowledge_acc", "knowledge_mrr", "knowledge_margin", "gold_logprob", "perturb_acc",
            "kl_to_base", "kl_to_aligned"]
    # a suite's own scalar metrics (refusal: refusal_rate, benign_answer_rate) after those
    first = next(iter(summary["stages"].values()), {})
    cols += [k for k in first.get("ci", {}) if k not in cols and k != "probe_acc" and isinstance(first.get(k), float)
             and not k.startswith(("task_", "knowledge_")) and k != "first_token_prob"]
    for c in cols:
        t.add_column(c, justify="right")
    for name, st in summary["stages"].items():
        cells = []
        for c in cols:
            ci = st.get("ci", {}).get(c)
            cell = fmt(st.get(c))
            if ci and ci[0] is not None and c in ("task_acc", "knowledge_acc", "knowledge_mrr"):
                cell += f" [{ci[0]:.2f},{ci[1]:.2f}]"
            cells.append(cell)
        t.add_row(name, *cells)
    return t


def _layer_mean(by_layer: dict | None, skip_embeddings: bool = True) -> float | None:
    vals = [v for lay, v in (by_layer or {}).items() if v is not None and (int(lay) >= 1 or not skip_embeddings)]
    return sum(vals) / len(vals) if vals else None


def _argmax_layer(by_layer: dict | None, nd: int = 2) -> str:
    vals = {int(lay): v for lay, v in (by_layer or {}).items() if v is not None}
    if not vals:
        return "-"
    best = max(vals, key=lambda k: vals[k])
    return f"{vals[best]:.{nd}f}@{best}"


def layers_table(summary: dict) -> Table:
    """Per stage: linear probes (over layers), weight drift of the stage's update, and
    per-item transitions from the stage it was trained from."""
    t = Table(title="probes, weight drift, transitions (layers 1..L = decoder blocks)")
    for c in ("stage", "probe_acc mean", "probe_acc best", "probe chance", "drift mean", "drift max",
              "task c>w", "task w>c", "know c>w", "know w>c"):
        t.add_column(c, justify="left" if c == "stage" else "right")
    for name, st in summary["stages"].items():
        t.add_row(
            name, fmt(_layer_mean(st.get("probe_acc")), 2), _argmax_layer(st.get("probe_acc")),
            fmt(st.get("probe_chance"), 2), fmt(_layer_mean(st.get("weight_drift"), False), 4),
            _argmax_layer(st.get("weight_drift"), 4),
            *[fmt(st.get(k), 0) for k in ("task_correct_to_wrong", "task_wrong_to_correct",
                                             "knowledge_correct_to_wrong", "knowledge_wrong_to_correct")],
        )
    return t


def verdict_lines(summary: dict) -> list[str]:
    v = summary["verdict"]
    ch = summary["stages"]["base"].get("knowledge_chance")
    th = v.get("thresholds", {})
    lines = [f"CHECK FAILED: {c}" for c in v.get("checks", [])]
    lines += [
        f"VERDICT: {v['label']}",
        f"  {v.get('reason', '')}",
        f"  task_drop = {fmt(v['task_drop'])} CI {fmt_ci(v.get('task_drop_ci'))}",
        f"  knowledge_retention = {fmt(v['knowledge_retention'])} CI {fmt_ci(v.get('knowledge_retention_ci'))}"
        f" (decided by {v.get('decided_by', 'knowledge_acc')}; knowledge chance level {fmt(ch, 2)})",
    ]
    chances = v.get("knowledge_chances", {})
    for m, r in v.get("retention", {}).items():
        shift = v.get("tune_shift", {}).get(m)
        lines.append(
            f"  retention by {m} = {fmt(r['value'])} CI {fmt_ci(r['ci'])}"
            + (f" (chance {fmt(chances.get(m))})" if chances.get(m) is not None else "")
            + (f"; base -> aligned {fmt(shift['value'])} CI {fmt_ci(shift['ci'])}" if shift else "")
        )
    if v.get("gold_logprob_change"):
        g = v["gold_logprob_change"]
        lines.append(f"  gold_logprob change, aligned -> perturbed = {fmt(g['value'])} nats CI {fmt_ci(g['ci'])}"
                     " (moves with any refusal: shown, not decisive)")
    if v.get("tune_change"):
        g = v["tune_change"]
        lines.append(f"  task_acc base - aligned = {fmt(g['value'])} CI {fmt_ci(g['ci'])}"
                     f" (tune check: at most {th.get('tune_tolerance')})")
    for k, r in v["recovery_ratio"].items():
        kar = v.get("knowledge_after_recovery", {}).get(k)
        lines.append(
            f"  recovery_ratio[{k}] = {fmt(r)} CI {fmt_ci(v.get('recovery_ratio_ci', {}).get(k))}   "
            f"knowledge_after_recovery[{k}] = {fmt(kar)} CI {fmt_ci(v.get('knowledge_after_recovery_ci', {}).get(k))}"
        )
    if v.get("probe_retention") is not None or v.get("probe_chance") is not None:
        lines.append(
            f"  probe_retention = {fmt(v.get('probe_retention'))} CI {fmt_ci(v.get('probe_retention_ci'))}"
            f" (linear probes, mean over layers; probe chance level {fmt(v.get('probe_chance'), 2)};"
            " evidence beside the label, not part of its rule)"
        )
    angles = summary["stages"].get("perturbed", {}).get("principal_angle_mean")
    if angles:
        lines.append(f"  principal angles, perturb vs tune update: mean {_layer_mean(angles):.1f} deg over layers"
                     f" (min {min(summary['stages']['perturbed']['principal_angle_min'].values()):.1f} deg)")
    for arm, ev in v.get("recovery_evidence", {}).items():
        lines.append(f"  recovery evidence, {arm}: {ev}")
    if th:
        lines.append(
            f"  thresholds: retention >= {th['retention_threshold']}, loss < {th['loss_threshold']}, "
            f"recovery target {th['recovery_target']}, small n <= {th['small_n']}"
        )
    m = summary["mlflow"]
    lines.append(f"  MLflow: {m['tracking_uri']}  run {m['run_id']}")
    return lines


FINAL = ("done", "reused", "error")


class AuditProgress:
    """The progress of an audit or a sweep: a counter over the stage tasks (or the
    trials), and per running task or step its count (optimiser steps of a training
    stage, items scored by a probe or by the known-fact filter).

    Two renderings, chosen by whether ``console`` is a terminal (``lines`` forces one):

    - a terminal: rich bars (a spinner, the counter, one bar per running task), and one
      line above them per finished step or task;
    - anything else (stdout piped to a file): plain lines, one when a task or step
      starts and one when it ends, each with the time since the start, and one every
      ``every_s`` seconds per running task with its count; no spinner, no carriage return.

    ``update(state)`` takes the task state of :func:`pipelines.dag.run_dag`'s
    ``on_progress``: ``{key: {"kind", "name", "status", "done", "total", "unit",
    "seconds"?, "prefix"?}}``; ``kind`` ``step`` is a preparation step, ``trial`` a sweep
    trial, any other kind a stage task. The counter counts the tasks of kind ``count``
    (``None``: every kind but ``step`` and ``trial``) that are done or reused, of
    ``n_tasks`` (or of as many as ``state`` holds, when it holds more).
    ``message(msg)`` prints a line.
    """

    def __init__(self, console: Console, n_tasks: int, lines: bool | None = None, every_s: float = 30.0,
                 count: str | None = None, unit: str = "stage tasks", title: str = "audit: stage tasks finished"):
        self.console = console
        self.lines = (not console.is_terminal or console.is_dumb_terminal) if lines is None else lines
        self.n_tasks, self.every_s, self.count, self.unit, self.title = n_tasks, every_s, count, unit, title
        self.t0 = time.monotonic()
        self.seen: dict[str, dict] = {}  # key -> {"status", "start", "printed"}
        self.finished = 0
        self.bars: dict[str, int] = {}
        self.progress = None
        if not self.lines:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description:<40}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), console=console,
            )
            self.overall = self.progress.add_task("preparing the model and the facts", total=n_tasks, unit=unit)

    def __enter__(self) -> "AuditProgress":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _print(self, msg: str) -> None:
        self.console.print(f"[{time.monotonic() - self.t0:7.1f} s] {msg}", highlight=False, markup=False,
                           soft_wrap=True)

    def message(self, msg: str) -> None:
        """A line of its own (with the time since the start)."""
        self._print(msg)

    def _counted(self, st: dict) -> bool:
        return st["kind"] == self.count if self.count else st["kind"] not in ("step", "trial")

    @staticmethod
    def label(st: dict) -> str:
        """``known-fact filter``, ``train aligned``, ``trial 2/4 probe perturbed``, ..."""
        if st["kind"] == "step":
            name = st["name"]
        elif st["kind"] == "prepare":
            name = "prepare the model and the facts"
        elif st["kind"] == "trial":
            name = st["name"]
        elif st["kind"] == "drift":
            name = "weight drift"
        else:
            name = f"{st['kind']} {st['name']}"
        return st.get("prefix", "") + name

    @staticmethod
    def count_text(st: dict) -> str:
        """``40/80 items`` (a count), the step's description (the model step), or ''."""
        if st.get("total") is not None:
            return f"{st['done']}/{st['total']} {st['unit']}"
        if st["kind"] == "step" and st.get("unit") and st["unit"] != "items":
            return st["unit"]
        return ""

    def update(self, state: dict[str, dict]) -> None:
        """Show the changes since the last call (see the class docstring)."""
        now = time.monotonic()
        total = max(self.n_tasks, sum(1 for st in state.values() if self._counted(st)))
        for key, st in state.items():
            seen = self.seen.setdefault(key, {"status": "waiting", "start": None, "printed": now})
            old, new = seen["status"], st["status"]
            if new == "running" and old == "waiting":
                seen.update(status="running", start=now, printed=now)
                if self.lines:
                    c = self.count_text(st) if not st["done"] else ""
                    self._print(f"{self.label(st)}: started" + (f" ({c})" if c else ""))
            elif new == "running" and self.lines and st.get("total") and now - seen["printed"] >= self.every_s:
                seen["printed"] = now
                self._print(f"{self.label(st)}: {self.count_text(st)}")
            if new in FINAL and old not in FINAL:
                seen["status"] = new
                secs = st.get("seconds")
                if secs is None and seen["start"] is not None:
                    secs = now - seen["start"]
                c = self.count_text(st)
                what = {"done": "done", "reused": "reused from the store", "error": "FAILED"}[new]
                detail = (f", {c}" if c else "") + (f" in {secs:.1f} s" if secs is not None and new != "reused" else "")
                if self._counted(st):
                    self.finished += new != "error"
                    self._print(f"[{self.unit} {self.finished}/{total}] {what}: {self.label(st)}{detail}")
                else:
                    self._print(f"{self.label(st)}: {what}{detail}")
        if self.progress is None:
            return
        preparing = any(st["kind"] == "prepare" and st["status"] not in FINAL for st in state.values())
        self.progress.update(self.overall, completed=self.finished, total=total,
                             description="preparing the model and the facts" if preparing else self.title)
        for key, st in state.items():
            if st["status"] == "running" and key not in self.bars and st["kind"] not in ("prepare",):
                self.bars[key] = self.progress.add_task(f"  {self.label(st)}", total=st["total"],
                                                        unit=st["unit"] if st.get("total") is not None
                                                        or st["kind"] == "step" else "")
            if key not in self.bars:
                continue
            if st["status"] in FINAL:
                self.progress.remove_task(self.bars.pop(key))
            else:
                self.progress.update(self.bars[key], completed=st["done"], total=st["total"],
                                     description=f"  {self.label(st)}")


def sweep_lines(s: dict) -> list[str]:
    """The closing lines of ``cl-audit sweep``: trials, best cell (with its task drop, whether
    that drop is significant, and the task accuracy after recovery), the rule that chose
    it, the finished trials best first, smallest n, Pareto set."""
    t = s["trials"]
    lines = [f"trials: {t['finished']} of {t['total']} finished {t['by_status']}"
             + (f", {t['stopped_early']} stopped early by ASHA" if t["stopped_early"] else "")]
    b = s.get("best")
    if b:
        cfg = ", ".join(f"{k}={v}" for k, v in b["config"].items())
        lines.append(f"best by {b['metric']} ({b['mode']}): {fmt(b['value'])} at {cfg} (verdict {b['label']})")
        if "drop_significant" in b:
            m = b["metrics"]
            lines.append(
                f"  task_drop {fmt(m['task_drop'])} {fmt_ci([m['task_drop_ci_low'], m['task_drop_ci_high']])}"
                f" ({'significant' if b['drop_significant'] else 'NOT significant: its CI includes 0'}),"
                f" task_acc after recovery {fmt(m['recovered_task_acc'])}"
                f" {fmt_ci([m['recovered_task_acc_ci_low'], m['recovered_task_acc_ci_high']])}")
    if s.get("best_rule"):
        lines.append(f"  rule: {s['best_rule']}")
    if s.get("ranking"):
        # the finished trials, best first: beside the ratio, the drop and the absolute task_acc
        head = (f"{'#':>3} {'kl_penalty':>10} {'n':>4} {'arm':<10} {'frz':>3} {'task_drop [CI]':<22} {'sig':<3} "
                f"{'task_acc after rec. [CI]':<24} {'recovery_ratio [CI]':<23} verdict")
        lines += ["trials, best first:", head]

        def vci(v, ci):  # a missing CI shows as [n/a]
            return fmt_value_ci(v, ci, no_ci=" [n/a]")

        for i, r in enumerate(s["ranking"], 1):
            c = r["config"]
            lines.append(
                f"{i:>3} {c['kl_penalty']:>10.4g} {c['n']:>4} {c['arm']:<10} {c['freeze_layers']:>3} "
                f"{vci(r['task_drop'], r['task_drop_ci']):<22} {'yes' if r['drop_significant'] else 'no':<3} "
                f"{vci(r['recovered_task_acc'], r['recovered_task_acc_ci']):<24} "
                f"{vci(r['recovery_ratio'], r['recovery_ratio_ci']):<23} {r['label'] or '-'}")
    for r in s["smallest_n"]:
        fz = f" freeze={r['freeze_layers']}" if r["freeze_layers"] else ""
        lines.append(f"  kl_penalty={r['kl_penalty']:g} {r['arm']}{fz}: {r['note']} (task_drop {fmt(r['task_drop'])})")
    front = "; ".join(f"kl={p['kl_penalty']:g}: perturb_acc {fmt(p['perturb_acc'])}, task_drop {fmt(p['task_drop'])}"
                      for p in s["pareto_perturb_acc_vs_task_drop"])
    lines.append(f"Pareto set (perturb_acc up, task_drop down): {front or '-'}")
    if s["stages_computed"]:
        lines.append("stages computed: " + ", ".join(f"{k} {v}" for k, v in sorted(s["stages_computed"].items())))
    m = s["mlflow"]
    lines.append(f"MLflow: {m['tracking_uri']}  parent run {m['run_id']}")
    return lines


def history_table(uri: str, rows: list[dict]) -> Table:
    """``cl-audit history``: one row per past audit or sweep (:func:`pipelines.trail.history`),
    with the seed and a column per setting that differs between the listed runs."""
    t = Table(title=f"audits and sweeps in {uri}, newest first", box=box.SIMPLE_HEAD, pad_edge=False,
              collapse_padding=True)
    differs = list(rows[0]["differs"]) if rows else []
    for col, kw in (("date", {"no_wrap": True}), ("run", {"no_wrap": True}), ("kind", {}), ("model", {}),
                    ("suite", {}), ("seed", {"justify": "right"}), *((k, {}) for k in differs),
                    ("verdict", {"no_wrap": True}), ("task drop", {"justify": "right"}),
                    ("retention", {"justify": "right"}), ("best recovery", {"no_wrap": True})):
        t.add_column(col, **kw)
    for r in rows:
        t.add_row(r["date"], r["run_id"], r["kind"], r["model"], r["suite"], str(r["seed"]),
                  *("-" if r["differs"][k] is None else str(r["differs"][k]) for k in differs), r["verdict"],
                  fmt(r["task_drop"], 2), fmt(r["knowledge_retention"], 2), r["best_recovery"])
    return t


def config_diff_table(config_diff: list[tuple]) -> Table:
    """``cl-audit compare``: the config fields that differ, ``(field, A, B)`` rows."""
    t = Table(title="config differences", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("field", "A", "B"):
        t.add_column(col)
    for k, va, vb in config_diff:
        t.add_row(k, str(va), str(vb))
    return t


def compare_table(rows: list[dict]) -> Table:
    """``cl-audit compare``: every metric of A and B with its CI, B - A, whether it is
    significant and by which rule (the rows of :func:`pipelines.trail.compare`)."""
    t = Table(title="metrics (B - A)", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col, kw in (("stage", {"no_wrap": True}), ("metric", {"no_wrap": True}), ("A", {"justify": "right"}),
                    ("B", {"justify": "right"}), ("B - A", {"justify": "right"}), ("p", {"justify": "right"}),
                    ("p Holm", {"justify": "right"}), ("sig", {}), ("rule", {})):
        t.add_column(col, **kw)
    for r in rows:
        sig = {True: "*", False: "", None: "?"}[r["significant"]]
        t.add_row(r["stage"], r["metric"], fmt_value_ci(r["a"], r["a_ci"]), fmt_value_ci(r["b"], r["b_ci"]),
                  fmt_value_ci(r["diff"], r["diff_ci"]), fmt(r.get("p"), 4), fmt(r.get("p_adjusted"), 4), sig,
                  r["rule"])
    return t
