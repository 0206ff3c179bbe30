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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from components.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "Audit a fine-tuning run for spurious forgetting: lost task alignment vs lost knowledge.\n\n"
        "Example: cl-audit run capitals --quick, then open the report.html it names, or "
        "cl-audit show RUN_DIR / cl-audit report RUN_DIR on a finished run."
    ),
)
console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def _fmt(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _fmt_ci(ci) -> str:
    return "n/a" if not ci or ci[0] is None or ci[1] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


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
        f"  task_drop = {_fmt(v['task_drop'])} CI {_fmt_ci(v.get('task_drop_ci'))}",
        f"  knowledge_retention = {_fmt(v['knowledge_retention'])} CI {_fmt_ci(v.get('knowledge_retention_ci'))}"
        f" (knowledge chance level {_fmt(ch, 2)})",
    ]
    for k, r in v["recovery_ratio"].items():
        kar = v.get("knowledge_after_recovery", {}).get(k)
        rci = _fmt_ci(v.get("recovery_ratio_ci", {}).get(k))
        lines.append(f"  recovery_ratio[{k}] = {_fmt(r)} CI {rci}   knowledge_after_recovery[{k}] = {_fmt(kar)}")
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
    from pipelines.audit import default_home, run_audit, stage_order

    cfg = load_config(suite, config, set_, quick)
    home = default_home()
    out_dir = out or home / "audits" / f"{cfg.suite}-{cfg.digest()[:12]}"
    t0 = time.time()
    n_ckpt = len(stage_order(cfg))
    with AuditProgress(console, n_tasks=2 * n_ckpt - 1) as display:
        summary = run_audit(cfg, out_dir, home, tracking_uri, display.message, display.update)
    console.print(stage_table(summary))
    for line in verdict_lines(summary):
        console.print(line, highlight=False, markup=False)
    console.print(f"Wrote {out_dir}/summary.json in {time.time() - t0:.0f} s", highlight=False)
    console.print(f"Report: {out_dir / 'report.html'}", highlight=False)


class AuditProgress:
    """Rich progress bars for one audit: an overall bar over the stage tasks, and one
    bar per running task (optimiser steps of a training stage, scored items of a probe).

    ``message`` prints a line above the bars; ``update`` takes the task state of
    :func:`pipelines.dag.run_dag`'s ``on_progress``.
    """

    def __init__(self, console: Console, n_tasks: int):
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), console=console,
        )
        self.overall = self.progress.add_task("preparing the model and the facts", total=n_tasks, unit="stage tasks")
        self.bars: dict[str, int] = {}

    def __enter__(self) -> "AuditProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def message(self, msg: str) -> None:
        self.progress.console.log(msg)

    def update(self, state: dict[str, dict]) -> None:
        finished = sum(st["status"] in ("done", "reused") for st in state.values())
        self.progress.update(self.overall, completed=finished, description="audit: stage tasks finished")
        for key, st in state.items():
            if st["status"] == "running" and key not in self.bars:
                self.bars[key] = self.progress.add_task(f"  {key}", total=st["total"], unit=st["unit"])
            if key not in self.bars:
                continue
            if st["status"] in ("done", "reused"):
                self.progress.remove_task(self.bars.pop(key))
            else:
                self.progress.update(self.bars[key], completed=st["done"], total=st["total"])


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
    if (run_dir / "report.html").exists():
        console.print(f"Report: {run_dir / 'report.html'}", highlight=False)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder with summary.json (what cl-audit run wrote).")) -> None:
    """Write report.html and plots/ for a finished run.

    The report holds the verdict and its evidence, the metrics per stage, the figures,
    items that flipped, the config, digests and the MLflow run. The HTML file is
    self-contained (figures embedded, no network).

    Example: cl-audit report runs/audits/capitals-0123abcd
    """
    from pipelines.report import write_report

    path = write_report(run_dir)
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    console.print(f"Wrote {path} ({len(plots)} figures: {', '.join(plots)})", highlight=False)


@app.command("compile")
def compile_(
    suite: Optional[str] = typer.Argument(None, help="Suite name (default: capitals, or the config's suite)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file to merge over the suite's."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: --set perturb.kl_penalty=0.1"),
    quick: bool = typer.Option(False, "--quick", help="Compile the small version of the audit."),
    out: Path = typer.Option(Path("infra/kubeflow/audit-pipeline.yaml"), "--out", help="Pipeline YAML to write."),
    image: Optional[str] = typer.Option(None, "--image", help="Image of every component (default: cl-audit:<version>)."),
    tracking_uri: str = typer.Option(
        "", "--tracking-uri", help="Default MLflow tracking URI of the pipeline run (empty: the pod's MLFLOW_TRACKING_URI)."
    ),
) -> None:
    """Compile the audit to a Kubeflow Pipelines (kfp v2) pipeline YAML.

    The config becomes the pipeline's default parameters; a run can override
    fields with its `overrides` parameter (the names of --set).

    Example: cl-audit compile capitals --image REGISTRY/cl-audit:0.1.0 --out pipeline.yaml
    """
    from components.config import load_config
    from pipelines.kubeflow import compile_pipeline, default_image

    cfg = load_config(suite, config, set_, quick)
    path = compile_pipeline(cfg, out, image, tracking_uri)
    console.print(
        f"Wrote {path}: pipeline cl-audit ({cfg.suite}, config {cfg.digest()[:12]}), image {image or default_image()}",
        highlight=False,
    )


@app.command()
def submit(
    args: Optional[list[str]] = typer.Argument(None, help="The cl-audit command to run, after --."),
    address: str = typer.Option(
        ..., "--address", envvar="RAY_API_SERVER_ADDRESS", help="Ray dashboard address, e.g. http://HOST:8265."
    ),
    env: list[str] = typer.Option([], "--env", help="Environment variable of the job: --env CL_AUDIT_HOME=/data/runs"),
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="The cl-audit checkout to upload."),
) -> None:
    """Run a cl-audit command on a Ray cluster through the Ray Jobs API.

    Packages this checkout, submits, streams the logs and exits with the
    job's status. A cluster's token is read from RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. Paths in the command (--out,
    --config) are resolved on the cluster, relative to the uploaded checkout.

    Example: cl-audit submit --address http://127.0.0.1:8265 -- run capitals --quick
    """
    from pipelines.submit import parse_env
    from pipelines.submit import submit as submit_job

    args = list(args or [])
    if args and args[0] not in {c.name or c.callback.__name__ for c in app.registered_commands}:
        raise UserError(f"submit: '{args[0]}' is not a cl-audit command; e.g. -- run capitals --quick")
    _, _, code = submit_job(address, args, working_dir, parse_env(env))
    if code:
        sys.exit(code)


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
