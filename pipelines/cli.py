"""The ``cl-audit`` command line (typer). Thin: parse, call the library, print.

A user mistake (:class:`components.errors.UserError`) prints one line on stderr and
exits with code 2; nothing else is printed for it.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich import box
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
            cell = _fmt(st.get(c))
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
            name, _fmt(_layer_mean(st.get("probe_acc")), 2), _argmax_layer(st.get("probe_acc")),
            _fmt(st.get("probe_chance"), 2), _fmt(_layer_mean(st.get("weight_drift"), False), 4),
            _argmax_layer(st.get("weight_drift"), 4),
            *[_fmt(st.get(k), 0) for k in ("task_correct_to_wrong", "task_wrong_to_correct",
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
        f"  task_drop = {_fmt(v['task_drop'])} CI {_fmt_ci(v.get('task_drop_ci'))}",
        f"  knowledge_retention = {_fmt(v['knowledge_retention'])} CI {_fmt_ci(v.get('knowledge_retention_ci'))}"
        f" (decided by {v.get('decided_by', 'knowledge_acc')}; knowledge chance level {_fmt(ch, 2)})",
    ]
    chances = v.get("knowledge_chances", {})
    for m, r in v.get("retention", {}).items():
        shift = v.get("tune_shift", {}).get(m)
        lines.append(
            f"  retention by {m} = {_fmt(r['value'])} CI {_fmt_ci(r['ci'])}"
            + (f" (chance {_fmt(chances.get(m))})" if chances.get(m) is not None else "")
            + (f"; base -> aligned {_fmt(shift['value'])} CI {_fmt_ci(shift['ci'])}" if shift else "")
        )
    if v.get("gold_logprob_change"):
        g = v["gold_logprob_change"]
        lines.append(f"  gold_logprob change, aligned -> perturbed = {_fmt(g['value'])} nats CI {_fmt_ci(g['ci'])}"
                     " (moves with any refusal: shown, not decisive)")
    if v.get("tune_change"):
        g = v["tune_change"]
        lines.append(f"  task_acc base - aligned = {_fmt(g['value'])} CI {_fmt_ci(g['ci'])}"
                     f" (tune check: at most {th.get('tune_tolerance')})")
    for k, r in v["recovery_ratio"].items():
        kar = v.get("knowledge_after_recovery", {}).get(k)
        lines.append(
            f"  recovery_ratio[{k}] = {_fmt(r)} CI {_fmt_ci(v.get('recovery_ratio_ci', {}).get(k))}   "
            f"knowledge_after_recovery[{k}] = {_fmt(kar)} CI {_fmt_ci(v.get('knowledge_after_recovery_ci', {}).get(k))}"
        )
    if v.get("probe_retention") is not None or v.get("probe_chance") is not None:
        lines.append(
            f"  probe_retention = {_fmt(v.get('probe_retention'))} CI {_fmt_ci(v.get('probe_retention_ci'))}"
            f" (linear probes, mean over layers; probe chance level {_fmt(v.get('probe_chance'), 2)};"
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


@app.command()
def run(
    suite: Optional[str] = typer.Argument(None, help="Suite name (default: capitals, or the config's suite)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file to merge over the suite's."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: --set perturb.kl_penalty=0.1"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/audits/<suite>-<config digest>)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: sqlite in runs/)."),
    quick: bool = typer.Option(False, "--quick", help="A small version of the same audit (smoke test)."),
    register: Optional[str] = typer.Option(
        None, "--register", metavar="NAME",
        help="Register the aligned, perturbed and recovered checkpoints as versions of this MLflow registered model."),
    model: Optional[str] = typer.Option(
        None, "--model", help="The model: a local transformers directory, a .gguf file, or a hub id (owner/name; "
        "downloaded only with HF_HUB_OFFLINE=0). Sets model.id."),
    data: list[Path] = typer.Option(
        [], "--data", help="A data file of the custom suite (JSONL, CSV or Parquet; repeat for more). Sets data.files."),
    allow_leakage: bool = typer.Option(
        False, "--allow-leakage", help="Run even if an evaluation item also occurs in a training set."),
) -> None:
    """Run one audit: tune -> perturb -> recover -> probe, then the verdict.

    Example: cl-audit run capitals --quick --set perturb.kl_penalty=0.1

    Example: cl-audit run custom --model ./my-model --data items.jsonl
    """
    from components.config import load_config
    from pipelines.audit import default_home, run_audit, stage_order
    from pipelines.tracking import check_model_name

    if register is not None:
        check_model_name(register)
    extra = []
    if model is not None:
        extra.append(f"model.id={json.dumps(str(model))}")
    if data:
        extra.append(f"data.files={json.dumps([str(p) for p in data])}")
    if allow_leakage:
        extra.append("data.allow_leakage=true")
    cfg = load_config(suite or ("custom" if data else None), config, [*extra, *set_], quick)
    home = default_home()
    out_dir = out or home / "audits" / f"{cfg.suite}-{cfg.digest()[:12]}"
    t0 = time.time()
    n_ckpt = len(stage_order(cfg))
    with AuditProgress(console, n_tasks=2 * n_ckpt - 1) as display:
        summary = run_audit(cfg, out_dir, home, tracking_uri, display.message, display.update, register=register)
    console.print(stage_table(summary))
    console.print(layers_table(summary))
    for line in verdict_lines(summary):
        console.print(line, highlight=False, markup=False)
    reg = summary.get("registered_model")
    if reg:
        vers = ", ".join(f"{st} v{v}" for st, v in reg["versions"].items())
        console.print(f"Registered model {reg['name']}: {vers}", highlight=False, markup=False)
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
        lines.append(f"best by {b['metric']} ({b['mode']}): {_fmt(b['value'])} at {cfg} (verdict {b['label']})")
        if "drop_significant" in b:
            m = b["metrics"]
            lines.append(
                f"  task_drop {_fmt(m['task_drop'])} {_fmt_ci([m['task_drop_ci_low'], m['task_drop_ci_high']])}"
                f" ({'significant' if b['drop_significant'] else 'NOT significant: its CI includes 0'}),"
                f" task_acc after recovery {_fmt(m['recovered_task_acc'])}"
                f" {_fmt_ci([m['recovered_task_acc_ci_low'], m['recovered_task_acc_ci_high']])}")
    if s.get("best_rule"):
        lines.append(f"  rule: {s['best_rule']}")
    if s.get("ranking"):
        # the finished trials, best first: beside the ratio, the drop and the absolute task_acc
        head = (f"{'#':>3} {'kl_penalty':>10} {'n':>4} {'arm':<10} {'frz':>3} {'task_drop [CI]':<22} {'sig':<3} "
                f"{'task_acc after rec. [CI]':<24} {'recovery_ratio [CI]':<23} verdict")
        lines += ["trials, best first:", head]

        def vci(v, ci):
            return "-" if v is None else f"{v:.3f} " + ("[n/a]" if ci[0] is None else f"[{ci[0]:.2f},{ci[1]:.2f}]")

        for i, r in enumerate(s["ranking"], 1):
            c = r["config"]
            lines.append(
                f"{i:>3} {c['kl_penalty']:>10.4g} {c['n']:>4} {c['arm']:<10} {c['freeze_layers']:>3} "
                f"{vci(r['task_drop'], r['task_drop_ci']):<22} {'yes' if r['drop_significant'] else 'no':<3} "
                f"{vci(r['recovered_task_acc'], r['recovered_task_acc_ci']):<24} "
                f"{vci(r['recovery_ratio'], r['recovery_ratio_ci']):<23} {r['label'] or '-'}")
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
    console.print(layers_table(summary))
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


def _store_uri(tracking_uri: Optional[str]) -> str:
    from pipelines.audit import default_home
    from pipelines.tracking import resolve_tracking_uri

    return resolve_tracking_uri(tracking_uri, default_home())


URI_HELP = "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in runs/)."


@app.command()
def verify(
    target: str = typer.Argument(..., metavar="RUN_DIR_OR_MLFLOW_RUN_ID", help="A run folder or an audit's MLflow run id."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=URI_HELP),
) -> None:
    """Check every artifact of an audit against its manifest (sha256 and size).

    A run folder is read from disk (stage artifacts from the stage store); a run id is
    downloaded from the tracking store. Exits 1 and prints one line per mismatching
    file when anything differs.

    Example: cl-audit verify runs/audits/capitals-0123abcd
    """
    from pipelines.trail import classify, verify as do_verify

    uri = tracking_uri if classify(target) == "folder" else _store_uri(tracking_uri)
    report = do_verify(target, uri)
    for path, why in report.mismatches:
        console.print(f"MISMATCH {path}: {why}", highlight=False, markup=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    if report.ok:
        console.print(f"OK: {report.checked} files of {report.where} match the manifest (sha256 and size)",
                      highlight=False, markup=False, soft_wrap=True)
        return
    console.print(f"FAILED: {len(report.mismatches)} of {report.checked} files of {report.where} do not match",
                  highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def sync(
    run_dir: Path = typer.Argument(..., help="The folder of an audit run."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: the one the audit used."),
) -> None:
    """Send the MLflow records an audit kept locally while its tracking server was down.

    An audit never stops for an unreachable server: what it could not log is kept, in
    order, in RUN_DIR/.mlflow-journal.jsonl and sent when the server answers again, by
    the audit itself or by this command. Sending twice logs nothing twice.

    Example: cl-audit sync runs/audits/capitals-0123abcd
    """
    from pipelines.tracking import sync as do_sync

    sent, _ = do_sync(run_dir, tracking_uri)
    console.print(f"sent {sent} records to MLflow" if sent else f"{run_dir}: nothing to send",
                  highlight=False, markup=False, soft_wrap=True)


@app.command()
def history(
    suite: Optional[str] = typer.Option(None, "--suite", help="Only audits of this suite."),
    model: Optional[str] = typer.Option(None, "--model", help="Only audits of this model id (model.id)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=URI_HELP),
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many audits."),
) -> None:
    """Past audits in the tracking store, newest first.

    Example: cl-audit history --suite capitals
    """
    from pipelines.trail import history as do_history

    uri = _store_uri(tracking_uri)
    rows = do_history(uri, suite, model, limit)
    if not rows:
        console.print(f"no finished audits in {uri}" + (f" for suite {suite}" if suite else "")
                      + (f" and model {model}" if model else ""), highlight=False, markup=False)
        return
    t = Table(title=f"audits in {uri}, newest first", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col, kw in (("date", {"no_wrap": True}), ("run", {"no_wrap": True}), ("model", {}), ("suite", {}),
                    ("settings", {}), ("verdict", {"no_wrap": True}), ("task drop", {"justify": "right"}),
                    ("retention", {"justify": "right"}), ("best recovery", {"no_wrap": True})):
        t.add_column(col, **kw)
    for r in rows:
        t.add_row(r["date"], r["run_id"], r["model"], r["suite"], r["settings"], r["verdict"],
                  _fmt(r["task_drop"], 2), _fmt(r["knowledge_retention"], 2), r["best_recovery"])
    console.print(t, highlight=False)


@app.command()
def compare(
    run_a: str = typer.Argument(..., help="Audit A: a run folder or an MLflow run id."),
    run_b: str = typer.Argument(..., help="Audit B: a run folder or an MLflow run id."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=URI_HELP),
) -> None:
    """Two audits side by side: config differences, every metric with its CI, and which
    differences (B - A) are significant.

    Example: cl-audit compare runs/audits/capitals-aaaa runs/audits/capitals-bbbb
    """
    from pipelines.trail import compare as do_compare, fmt_ci, rule_text

    c = do_compare(run_a, run_b, _store_uri(tracking_uri))
    for tag, au in (("A", c.a), ("B", c.b)):
        what = f"run {au.run_id}" if au.name == au.run_id else f"{au.name} (run {au.run_id})"
        console.print(f"{tag}: {what}  {au.date}  {au.summary['model']} / {au.summary['suite']}"
                      f"  verdict {au.summary['verdict']['label']}", highlight=False, markup=False, soft_wrap=True)
    if c.config_diff:
        t = Table(title="config differences", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for col in ("field", "A", "B"):
            t.add_column(col)
        for k, va, vb in c.config_diff:
            t.add_row(k, str(va), str(vb))
        console.print(t, highlight=False)
    else:
        console.print("config: identical", highlight=False)
    t = Table(title="metrics (B - A)", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col, kw in (("stage", {"no_wrap": True}), ("metric", {"no_wrap": True}), ("A", {"justify": "right"}),
                    ("B", {"justify": "right"}), ("B - A", {"justify": "right"}), ("sig", {}), ("rule", {})):
        t.add_column(col, **kw)
    for r in c.rows:
        sig = {True: "*", False: "", None: "?"}[r["significant"]]
        t.add_row(r["stage"], r["metric"], fmt_ci(r["a"], r["a_ci"]), fmt_ci(r["b"], r["b_ci"]),
                  fmt_ci(r["diff"], r["diff_ci"]), sig, r["rule"])
    console.print(t, highlight=False)
    n_sig = sum(1 for r in c.rows if r["significant"])
    console.print(f"verdict: A {c.a.summary['verdict']['label']} -> B {c.b.summary['verdict']['label']}; "
                  f"{n_sig} of {len(c.rows)} differences significant", highlight=False, markup=False)
    console.print(rule_text(c), highlight=False, markup=False, soft_wrap=True)


@app.command()
def suites() -> None:
    """List the built-in suites.

    Example: cl-audit suites
    """
    from components.data import SUITES

    # the default suite first, then the others by name
    for name, s in sorted(SUITES.items(), key=lambda kv: (kv[0] != "capitals", kv[0])):
        console.print(f"{name:10s} {s.description} [model: {s.default_model}]", highlight=False, markup=False)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def main() -> None:
    """Entry point: run the typer app, turning user mistakes into one line and exit 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # the first failing stage is reported (one line for a user mistake); Ray's extra
    # report of the downstream tasks that could not run would only repeat it
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        rc = app(standalone_mode=False)  # a command's typer.Exit(code) comes back as its return value
    except UserError as e:
        err_console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        err_console.print(f"error: {e.filename or 'a file'}: {e.strerror}; nothing half-written, earlier results kept",
                          highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except Exception as e:  # click usage errors come through here with standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code if e.exit_code else 2)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
