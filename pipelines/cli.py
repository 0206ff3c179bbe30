"""The ``cl-audit`` command line (typer). Thin: parse, call the library, print.

A user mistake (:class:`components.errors.UserError`) prints one line on stderr and
exits with code 2; nothing else is printed for it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from components.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Audit a fine-tuning run for spurious forgetting: lost task alignment vs lost knowledge.",
)
console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def _fmt(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def stage_table(summary: dict) -> Table:
    """The per-stage metrics table (value and 95% CI) of a summary."""
    t = Table(title=f"{summary['suite']} / {summary['model']}", show_lines=False)
    t.add_column("stage")
    cols = ["task_acc", "knowledge_acc", "first_token_prob", "perturb_acc", "kl_to_base", "kl_to_aligned"]
    for c in cols:
        t.add_column(c, justify="right")
    for name, st in summary["stages"].items():
        cells = []
        for c in cols:
            ci = st.get("ci", {}).get(c)
            cell = _fmt(st.get(c))
            if ci and ci[0] is not None and c in ("task_acc", "knowledge_acc"):
                cell += f" [{ci[0]:.2f},{ci[1]:.2f}]"
            cells.append(cell)
        t.add_row(name, *cells)
    return t


def verdict_lines(summary: dict) -> list[str]:
    v = summary["verdict"]
    ch = summary["stages"]["base"].get("knowledge_chance")
    th = v.get("thresholds", {})
    lines = [
        f"VERDICT: {v['label']}",
        f"  {v.get('reason', '')}",
        f"  task_drop = {_fmt(v['task_drop'])} CI {v.get('task_drop_ci')}",
        f"  knowledge_retention = {_fmt(v['knowledge_retention'])} CI {v.get('knowledge_retention_ci')}"
        f" (knowledge chance level {_fmt(ch, 2)})",
    ]
    for k, r in v["recovery_ratio"].items():
        kar = v.get("knowledge_after_recovery", {}).get(k)
        lines.append(f"  recovery_ratio[{k}] = {_fmt(r)}   knowledge_after_recovery[{k}] = {_fmt(kar)}")
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


@app.command()
def run(
    suite: Optional[str] = typer.Argument(None, help="Suite name (default: capitals, or the config's suite)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file to merge over the suite's."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: --set perturb.kl_penalty=0.1"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/audits/<suite>-<config digest>)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: sqlite in runs/)."),
    quick: bool = typer.Option(False, "--quick", help="A small version of the same audit (smoke test)."),
) -> None:
    """Run one audit: tune -> perturb -> recover -> probe, then the verdict.

    Example: cl-audit run capitals --quick --set perturb.kl_penalty=0.1
    """
    from components.config import load_config
    from pipelines.audit import default_home, run_audit

    cfg = load_config(suite, config, set_, quick)
    home = default_home()
    out_dir = out or home / "audits" / f"{cfg.suite}-{cfg.digest()[:12]}"
    t0 = time.time()
    with console.status("[bold]auditing[/bold]") as status:
        def progress(msg: str) -> None:
            console.log(msg)
            status.update(f"[bold]auditing[/bold] ({time.time() - t0:.0f} s)")

        summary = run_audit(cfg, out_dir, home, tracking_uri, progress)
    console.print(stage_table(summary))
    for line in verdict_lines(summary):
        console.print(line, highlight=False, markup=False)
    console.print(f"Wrote {out_dir}/summary.json in {time.time() - t0:.0f} s", highlight=False)


def sweep_lines(s: dict) -> list[str]:
    """The closing lines of ``cl-audit sweep``: trials, best cell, smallest n, Pareto set."""
    t = s["trials"]
    lines = [f"trials: {t['finished']} of {t['total']} finished {t['by_status']}"
             + (f", {t['stopped_early']} stopped early by ASHA" if t["stopped_early"] else "")]
    b = s.get("best")
    if b:
        cfg = ", ".join(f"{k}={v}" for k, v in b["config"].items())
        lines.append(f"best by {b['metric']} ({b['mode']}): {_fmt(b['value'])} at {cfg} (verdict {b['label']})")
    for r in s["smallest_n"]:
        fz = f" freeze={r['freeze_layers']}" if r["freeze_layers"] else ""
        lines.append(f"  kl_penalty={r['kl_penalty']:g} {r['arm']}{fz}: {r['note']} (task_drop {_fmt(r['task_drop'])})")
    front = "; ".join(f"kl={p['kl_penalty']:g}: perturb_acc {_fmt(p['perturb_acc'])}, task_drop {_fmt(p['task_drop'])}"
                      for p in s["pareto_perturb_acc_vs_task_drop"])
    lines.append(f"Pareto set (perturb_acc up, task_drop down): {front or '-'}")
    if s["stages_computed"]:
        lines.append("stages computed: " + ", ".join(f"{k} {v}" for k, v in sorted(s["stages_computed"].items())))
    m = s["mlflow"]
    lines.append(f"MLflow: {m['tracking_uri']}  parent run {m['run_id']}")
    return lines


@app.command()
def sweep(
    suite: Optional[str] = typer.Argument(None, help="Suite name (default: capitals, or the config's suite)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file to merge over the suite's."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: --set sweep.kl_penalty=[0,0.1,1]"),
    out: Optional[Path] = typer.Option(None, "--out", help="Sweep folder (default: runs/sweeps/<suite>-<sweep digest>)."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="Trials at once (sweep.max_concurrent)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: sqlite in runs/)."),
    quick: bool = typer.Option(False, "--quick", help="A small version of the same sweep (smoke test)."),
) -> None:
    """Sweep perturb.kl_penalty x recover.size (config section `sweep`) with Ray Tune.

    Writes sweep.parquet, sweep_summary.json and recovery_heatmap.png. Run the same
    command again to resume an interrupted sweep (Ctrl-C) without redoing finished trials.

    Example: cl-audit sweep capitals --quick --set "sweep.kl_penalty=[0,0.1,1]" --set "sweep.sizes=[2,4]"
    """
    from components.config import load_config
    from pipelines.audit import default_home
    from pipelines.sweep import run_sweep, sweep_digest

    if max_concurrent is not None:
        if max_concurrent < 1:
            raise UserError(f"--max-concurrent {max_concurrent}: expected an integer >= 1")
        set_ = [*set_, f"sweep.max_concurrent={max_concurrent}"]
    cfg = load_config(suite, config, set_, quick)
    home = default_home()
    out_dir = out or home / "sweeps" / f"{cfg.suite}-{sweep_digest(cfg)[:12]}"
    t0 = time.time()
    with console.status("[bold]sweeping[/bold]") as status:
        def progress(msg: str) -> None:
            console.log(msg, highlight=False, markup=False)
            status.update(f"[bold]sweeping[/bold] ({time.time() - t0:.0f} s)")

        summary = run_sweep(cfg, out_dir, home, tracking_uri, progress)
    for line in sweep_lines(summary):
        console.print(line, highlight=False, markup=False)
    if summary["interrupted"]:
        err_console.print(
            f"sweep interrupted after {summary['trials']['finished']} of {summary['trials']['total']} trials; "
            f"run the same command again to resume ({out_dir})", highlight=False, markup=False)
        raise typer.Exit(130)
    files = ["sweep.parquet", "sweep_summary.json"] + (["recovery_heatmap.png"] if (out_dir / "recovery_heatmap.png").exists() else [])
    console.print(f"Wrote {', '.join(f'{out_dir}/{f}' for f in files)} in {time.time() - t0:.0f} s", highlight=False)


@app.command()
def show(run_dir: Path = typer.Argument(..., help="A run folder with summary.json.")) -> None:
    """Print the table and verdict of a finished run.

    Example: cl-audit show runs/audits/capitals-0123abcd
    """
    path = run_dir / "summary.json"
    if not path.exists():
        raise UserError(f"{path}: not found; expected the folder of a finished run")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    console.print(stage_table(summary))
    for line in verdict_lines(summary):
        console.print(line, highlight=False, markup=False)


@app.command()
def suites() -> None:
    """List the built-in suites.

    Example: cl-audit suites
    """
    from components.data import SUITES

    for name, s in sorted(SUITES.items()):
        console.print(f"{name:12s} {s.description}", highlight=False)


def main() -> None:
    """Entry point: run the typer app, turning user mistakes into one line and exit 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        app(standalone_mode=False)
    except UserError as e:
        err_console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # click usage errors come through here with standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code if e.exit_code else 2)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
