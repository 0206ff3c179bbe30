"""The ``cl-audit`` command line (typer). Thin: parse, call the library, print (what is
printed is rendered by :mod:`pipelines.console`).

A user mistake (:class:`components.errors.UserError`) prints one line on stderr and
exits with code 2; nothing else is printed for it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from components.errors import UserError
from pipelines.console import (AuditProgress, compare_table, config_diff_table, history_table, layers_table,
                               stage_table, sweep_lines, verdict_lines)
from pipelines.mlflow_env import absolute_env, absolute_uri

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help=(
        "Audit a fine-tuning run for spurious forgetting: lost task alignment vs lost knowledge.\n\n"
        "Example: cl-audit run capitals --quick, then open the report.html it names, or "
        "cl-audit show RUN_DIR / cl-audit report RUN_DIR on a finished run."
    ),
)
# log_path=False: a log line ends with its message, not with the source line that printed it
console = Console(stderr=False, width=None if sys.stdout.isatty() else 160, log_path=False)
err_console = Console(stderr=True, log_path=False)
QUIET = Console(quiet=True)  # what progress and log lines go to with --quiet
_verbosity = {"level": 0}  # -1: --quiet, 0: default, 1: -v, 2: -vv (set by the global options)


def _progress_console() -> Console:
    """Where progress bars and log lines go: stdout's console, or nowhere with --quiet."""
    return QUIET if _verbosity["level"] < 0 else console


def _version(value: bool) -> None:
    if value:
        from components.artifacts import package_version

        console.print(f"cl-audit {package_version()}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def global_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the cl-audit version (package metadata) and exit."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="Log lines on stderr: -v info, -vv debug (also the libraries')."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print results and errors only: no progress or log lines."),
) -> None:
    """Options of every command, given before it: cl-audit -v run capitals."""
    import logging

    if verbose and quiet:
        raise UserError("-v/--verbose and -q/--quiet: choose one")
    _verbosity["level"] = -1 if quiet else min(verbose, 2)
    if quiet or verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        level = logging.ERROR if quiet else logging.INFO if verbose == 1 else logging.DEBUG
        logging.basicConfig(level=level, handlers=[handler], force=True)
    if verbose:
        from components.artifacts import package_version
        from pipelines.audit import default_home

        logging.getLogger("cl_audit").info(f"cl-audit {package_version()} (python {sys.version.split()[0]}), "
                                           f"home {default_home()}")


def _suite_arg():
    """The optional SUITE argument of the commands that resolve a config."""
    return typer.Argument(None, help="Suite name (default: capitals, or the config's suite).")


def _config_option():
    """``--config/-c`` of the commands that resolve a config."""
    return typer.Option(None, "--config", "-c", help="YAML config file to merge over the suite's.")


def _set_option(example: str = "perturb.kl_penalty=0.1"):
    """``--set`` (repeatable) of the commands that resolve a config."""
    return typer.Option([], "--set", help=f"Override a config field: --set {example}")


def _home_option():
    """``--home`` of every command that reads or writes the cache, the store or MLflow."""
    from pipelines.mlflow_env import DEFAULT_HOME, HOME_ENV

    return typer.Option(
        None, "--home", envvar=HOME_ENV, show_envvar=True, show_default=f"./{DEFAULT_HOME}",
        help="Root of everything cl-audit keeps: model cache (cache/), stage store (store/), MLflow store "
        "(mlflow.db) and default run folders (audits/, sweeps/).")


def _use_home(home: Optional[Path]) -> Path:
    """Make ``--home`` the root of this process and of the processes it starts; returns
    the absolute root (``CL_AUDIT_HOME``, else ./runs, when ``--home`` is not given)."""
    from pipelines.mlflow_env import default_home, set_home

    return set_home(home) if home is not None else default_home()


FORCE_HELP = "Replace what --out holds when it is a run of another config (refused otherwise)."

JSON_HELP = "Print JSON on stdout (machine-readable) instead of tables."


def _print_json(data) -> None:
    """``data`` as JSON on stdout, nothing else (NaN as null; numpy and paths as text)."""
    def clean(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if hasattr(x, "item") and callable(x.item):  # numpy scalars
            return clean(x.item())
        return x

    sys.stdout.write(json.dumps(clean(data), indent=1, default=str) + "\n")
    sys.stdout.flush()


@app.command()
def run(
    suite: Optional[str] = _suite_arg(),
    config: Optional[Path] = _config_option(),
    set_: list[str] = _set_option(),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: HOME/audits/<suite>-<config digest>)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: sqlite in HOME)."),
    quick: bool = typer.Option(False, "--quick", help="A small version of the same audit (smoke test)."),
    register: Optional[str] = typer.Option(
        None, "--register", metavar="NAME",
        help="Register the aligned, perturbed and recovered checkpoints as versions of this MLflow registered model."),
    model: Optional[str] = typer.Option(
        None, "--model", help="The model: a local transformers directory, a .gguf file, or a hub id (owner/name; "
        "downloaded only with HF_HUB_OFFLINE=0). Sets model.id."),
    data: list[Path] = typer.Option(
        [], "--data", help="A data file of the custom suite (JSONL, CSV or Parquet; repeat for more). Sets data.files."),
    aligned: Optional[str] = typer.Option(
        None, "--aligned", metavar="REF", help="Audit this checkpoint as the aligned model instead of tuning one: a "
        "transformers directory, a peft adapter of --model, a .gguf file, an MLflow model URI (runs:/..., models:/...) "
        "or a hub id. Sets stages.aligned.from."),
    perturbed: Optional[str] = typer.Option(
        None, "--perturbed", metavar="REF", help="Audit this checkpoint as the fine-tuned (perturbed) model instead of "
        "training one; an adapter applies to --aligned if given, else to --model (then the aligned stage is the model "
        "itself). Sets stages.perturbed.from."),
    allow_leakage: bool = typer.Option(
        False, "--allow-leakage", help="Run even if an evaluation item also occurs in a training set."),
    home_dir: Optional[Path] = _home_option(),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved config and the run folder, then stop: nothing runs or is written."),
) -> None:
    """Run one audit: tune -> perturb -> recover -> probe, then the verdict.

    Example: cl-audit run capitals --quick --set perturb.kl_penalty=0.1

    Example: cl-audit run custom --model ./my-model --data items.jsonl

    Example: cl-audit run capitals --perturbed ./my-lora-adapter
    """
    from components.registry import absolute_paths, load_config
    from pipelines.audit import run_audit
    from pipelines.dag import dag_tasks
    from pipelines.tracking import check_model_name

    home = _use_home(home_dir)
    if register is not None:
        check_model_name(register)
    # --config is read here, once, before anything changes folder: it keeps the user's
    # spelling, which the one-line messages about it name
    out, tracking_uri = _abs(out), absolute_uri(tracking_uri)
    extra = []
    if model is not None:
        extra.append(f"model.id={json.dumps(str(model))}")
    if data:
        extra.append(f"data.files={json.dumps([str(p) for p in data])}")
    if allow_leakage:
        extra.append("data.allow_leakage=true")
    for stage, ref in (("aligned", aligned), ("perturbed", perturbed)):
        if ref is not None:
            extra.append(f"stages.{stage}.from={json.dumps(str(ref))}")
    cfg = absolute_paths(load_config(suite or ("custom" if data else None), config, [*extra, *set_], quick))
    out_dir = out or home / "audits" / f"{cfg.suite}-{cfg.digest()[:12]}"
    if dry_run:
        _print_config(cfg, f"# run folder {out_dir}\n")
        return
    t0 = time.time()
    with AuditProgress(_progress_console(), n_tasks=len(dag_tasks(cfg))) as display:
        summary = run_audit(cfg, out_dir, home, tracking_uri, display.message, display.update, register=register,
                            force=force)
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


@app.command()
def sweep(
    suite: Optional[str] = _suite_arg(),
    config: Optional[Path] = _config_option(),
    set_: list[str] = _set_option("sweep.kl_penalty=[0,0.1,1]"),
    out: Optional[Path] = typer.Option(None, "--out", help="Sweep folder (default: HOME/sweeps/<suite>-<sweep digest>)."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="Trials at once (sweep.max_concurrent)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: sqlite in HOME)."),
    quick: bool = typer.Option(False, "--quick", help="A small version of the same sweep (smoke test)."),
    home_dir: Optional[Path] = _home_option(),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Sweep perturb.kl_penalty x recover.size (config section `sweep`) with Ray Tune.

    Writes sweep.parquet, sweep_summary.json and recovery_heatmap.png. Run the same
    command again to resume an interrupted sweep (Ctrl-C) without redoing finished trials.

    Example: cl-audit sweep capitals --quick --set "sweep.kl_penalty=[0,0.1,1]" --set "sweep.sizes=[2,4]"
    """
    from components.registry import absolute_paths, load_config
    from pipelines.sweep import expected_trials, run_sweep, sweep_digest

    home = _use_home(home_dir)
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise UserError(f"--max-concurrent {max_concurrent}: expected an integer >= 1")
        set_ = [*set_, f"sweep.max_concurrent={max_concurrent}"]
    # --config is read here, once, before anything changes folder: it keeps the user's
    # spelling, which the one-line messages about it name
    out, tracking_uri = _abs(out), absolute_uri(tracking_uri)
    cfg = absolute_paths(load_config(suite, config, set_, quick))
    out_dir = out or home / "sweeps" / f"{cfg.suite}-{sweep_digest(cfg)[:12]}"
    t0 = time.time()
    with AuditProgress(_progress_console(), n_tasks=expected_trials(cfg), count="trial", unit="trials",
                       title="sweep: trials finished") as display:
        summary = run_sweep(cfg, out_dir, home, tracking_uri, display.message, on_progress=display.update,
                            force=force)
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
def show(
    run_dir: Path = typer.Argument(..., help="A run folder with summary.json, or a sweep folder (sweep_summary.json)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Print the table and verdict of a finished run, or the trials and best cell of a sweep.

    Example: cl-audit show runs/audits/capitals-0123abcd
    """
    from pipelines.report import read_summary

    run_dir = _abs(run_dir)
    kind, summary = read_summary(run_dir)
    if as_json:
        _print_json({"kind": kind, "folder": str(run_dir), "summary": summary})
        return
    if kind == "sweep":
        console.print(f"sweep {summary.get('suite', '?')} / {summary.get('model', '?')} in {run_dir}",
                      highlight=False, markup=False, soft_wrap=True)
        for line in sweep_lines(summary):
            console.print(line, highlight=False, markup=False)
    else:
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

    run_dir = _abs(run_dir)
    path = write_report(run_dir)
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    console.print(f"Wrote {path} ({len(plots)} figures: {', '.join(plots)})", highlight=False)


@app.command("compile")
def compile_(
    suite: Optional[str] = _suite_arg(),
    config: Optional[Path] = _config_option(),
    set_: list[str] = _set_option(),
    quick: bool = typer.Option(False, "--quick", help="Compile the small version of the audit."),
    out: Optional[Path] = typer.Option(None, "--out", help="Pipeline YAML to write (default: to stdout)."),
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
    from components.registry import load_config
    from pipelines.kubeflow import compile_pipeline, default_image, pipeline_yaml

    cfg = load_config(suite, config, set_, quick)  # paths inside the config name files on the cluster
    if out is None:  # only the YAML on stdout: cl-audit compile > pipeline.yaml
        sys.stdout.write(pipeline_yaml(cfg, image, tracking_uri))
        sys.stdout.flush()
        return
    path = compile_pipeline(cfg, _abs(out), image, tracking_uri)
    console.print(
        f"Wrote {path}: pipeline cl-audit ({cfg.suite}, config {cfg.digest()[:12]}), image {image or default_image()}",
        highlight=False,
    )


@app.command("config")
def config_(
    suite: Optional[str] = _suite_arg(),
    config: Optional[Path] = _config_option(),
    set_: list[str] = _set_option(),
    quick: bool = typer.Option(False, "--quick", help="The small version of the audit."),
) -> None:
    """Print the resolved config (YAML) an audit of these arguments would run; runs nothing.

    The suite's config, then --config, then --set, checked as `run` checks them. The
    output is itself a config file: `--config` of it resolves to the same config digest.

    Example: cl-audit config capitals --set seed=3
    """
    from components.registry import absolute_paths, load_config

    _print_config(absolute_paths(load_config(suite, config, set_, quick)))


def _print_config(cfg, header: str = "") -> None:
    """Print ``cfg`` (an AuditConfig) as YAML after comment lines naming its digest."""
    from components.config import dump_yaml

    console.print(f"# cl-audit config of suite {cfg.suite}\n# config digest {cfg.digest()}\n{header}{dump_yaml(cfg)}",
                  highlight=False, markup=False, soft_wrap=True, end="")


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
    if args and args[0] not in {c.name or c.callback.__name__ for c in app.registered_commands} | {
            g.name for g in app.registered_groups}:
        raise UserError(f"submit: '{args[0]}' is not a cl-audit command; e.g. -- run capitals --quick")
    _, _, code = submit_job(address, args, working_dir, parse_env(env))
    if code:
        sys.exit(code)


def _store_uri(tracking_uri: Optional[str]) -> str:
    from pipelines.mlflow_env import default_home
    from pipelines.tracking import resolve_tracking_uri

    return resolve_tracking_uri(absolute_uri(tracking_uri), default_home())


def _abs(path: Path | None) -> Path | None:
    """A path the user gave, absolute against the current folder (None stays None):
    every process and working folder that uses it then means the same file."""
    from components.registry import absolute

    return None if path is None else absolute(path)


URI_HELP = "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in HOME)."


@app.command()
def verify(
    target: str = typer.Argument(..., metavar="RUN_DIR_OR_MLFLOW_RUN_ID", help="A run folder or an audit's MLflow run id."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=URI_HELP),
    allow_unanchored: bool = typer.Option(
        False, "--allow-unanchored",
        help="Accept a manifest whose sha256 cannot be checked (the store unreachable, no run or digest recorded): a note, not a failure. A manifest that differs from its digest, or names a run the store does not hold, still fails."),
    home_dir: Optional[Path] = _home_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " Exits 1 all the same on a mismatch."),
) -> None:
    """Check every artifact of an audit against its manifest (sha256 and size).

    A run folder is read from disk (stage artifacts from the stage store of --home; nothing outside the folder and the store is read); a run id is downloaded from the tracking store.

    The manifest itself must match the sha256 recorded on the audit's MLflow run in the tracking store trusted here (--tracking-uri, else MLFLOW_TRACKING_URI, else the sqlite store of --home; never the store the manifest names). When that cannot be checked (store unreachable, no digest) the check fails unless --allow-unanchored.

    Exits 1 and prints one line per mismatching file when anything differs.

    Example: cl-audit verify runs/audits/capitals-0123abcd
    """
    from pipelines.trail import classify, verify as do_verify

    _use_home(home_dir)
    classify(target)
    report = do_verify(target, _store_uri(tracking_uri), allow_unanchored)
    if as_json:
        _print_json({"ok": report.ok, "where": report.where, "checked": report.checked,
                     "mismatches": [{"path": p, "why": why} for p, why in report.mismatches], "notes": report.notes})
        if not report.ok:
            raise typer.Exit(1)
        return
    for path, why in report.mismatches:
        console.print(f"MISMATCH {path}: {why}", highlight=False, markup=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    if report.ok:
        console.print(f"OK: {report.checked} files of {report.where} match the manifest (sha256 and size)",
                      highlight=False, markup=False, soft_wrap=True)
        return
    n_bad = sum(1 for path, _ in report.mismatches if path != "manifest.json")
    manifest_bad = len(report.mismatches) > n_bad
    console.print(f"FAILED: {n_bad} of {report.checked} files of {report.where} do not match"
                  + ("; manifest.json itself is not the audit's (see above)" if manifest_bad else ""),
                  highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def sync(
    run_dir: Path = typer.Argument(..., help="The folder of an audit run or a sweep."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: the one the audit used."),
) -> None:
    """Send the MLflow records an audit kept locally while its tracking server was down.

    An audit never stops for an unreachable server: what it could not log is kept, in
    order, in RUN_DIR/.mlflow-journal.jsonl (a sweep's trials: RUN_DIR/.mlflow-journals/)
    and sent when the server answers again, by the audit itself or by this command.
    Sending twice logs nothing twice.

    Example: cl-audit sync runs/audits/capitals-0123abcd
    """
    from pipelines.journal import sync as do_sync

    run_dir = _abs(run_dir)
    sent, _ = do_sync(run_dir, absolute_uri(tracking_uri))
    console.print(f"sent {sent} records to MLflow" if sent else f"{run_dir}: nothing to send",
                  highlight=False, markup=False, soft_wrap=True)


@app.command()
def history(
    suite: Optional[str] = typer.Option(None, "--suite", help="Only audits of this suite."),
    model: Optional[str] = typer.Option(None, "--model", help="Only audits of this model id (model.id)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=URI_HELP),
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many audits and sweeps."),
    home_dir: Optional[Path] = _home_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Past audits and sweeps in the tracking store, newest first, with the seed and a
    column per setting that differs between the listed runs.

    Example: cl-audit history --suite capitals
    """
    from pipelines.trail import history as do_history

    _use_home(home_dir)
    uri = _store_uri(tracking_uri)
    rows = do_history(uri, suite, model, limit)
    if as_json:
        from pipelines.tracking import redact_uri

        _print_json({"tracking_uri": redact_uri(uri), "differs": list(rows[0]["differs"]) if rows else [], "runs": rows})
        return
    if not rows:
        console.print(f"no finished audits or sweeps in {uri}" + (f" for suite {suite}" if suite else "")
                      + (f" and model {model}" if model else ""), highlight=False, markup=False)
        return
    table = history_table(uri, rows)
    # piped: as wide as the table needs (a column per differing setting), never cut or wrapped
    out = console if sys.stdout.isatty() else Console(width=max(console.width, console.measure(
        table, options=console.options.update(max_width=100_000)).maximum))
    out.print(table, highlight=False)


@app.command()
def compare(
    run_a: str = typer.Argument(..., help="Audit A: a run folder or an MLflow run id."),
    run_b: str = typer.Argument(..., help="Audit B: a run folder or an MLflow run id."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=URI_HELP),
    home_dir: Optional[Path] = _home_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Two audits side by side: config differences, every metric with its CI, and which
    differences (B - A) are significant.

    Paired tests where both audits scored the same items (same item ids), unpaired
    otherwise; every p-value is corrected for multiple comparisons (Holm), and a
    difference is significant when its adjusted p < 0.05.

    Example: cl-audit compare runs/audits/capitals-aaaa runs/audits/capitals-bbbb
    """
    from pipelines.trail import compare as do_compare, rule_text

    _use_home(home_dir)
    c = do_compare(run_a, run_b, _store_uri(tracking_uri))
    if as_json:
        _print_json(c.as_json())
        return
    for tag, au in (("A", c.a), ("B", c.b)):
        what = f"run {au.run_id}" if au.name == au.run_id else f"{au.name} (run {au.run_id})"
        console.print(f"{tag}: {what}  {au.date}  {au.summary['model']} / {au.summary['suite']}"
                      f"  verdict {au.summary['verdict']['label']}", highlight=False, markup=False, soft_wrap=True)
    if c.config_diff:
        console.print(config_diff_table(c.config_diff), highlight=False)
    else:
        console.print("config: identical", highlight=False)
    console.print(compare_table(c.rows), highlight=False)
    n_sig = sum(1 for r in c.rows if r["significant"])
    n_raw = sum(1 for r in c.rows if r["significant_uncorrected"])
    console.print(f"verdict: A {c.a.summary['verdict']['label']} -> B {c.b.summary['verdict']['label']}; "
                  f"{n_sig} of {c.tests} differences significant after {c.correction} correction "
                  f"({n_raw} uncorrected)", highlight=False, markup=False)
    console.print(rule_text(c), highlight=False, markup=False, soft_wrap=True)


@app.command()
def suites(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the built-in suites.

    Example: cl-audit suites
    """
    from components.registry import SUITES

    # the default suite first, then the others by name
    ordered = sorted(SUITES.items(), key=lambda kv: (kv[0] != "capitals", kv[0]))
    if as_json:
        _print_json([{"name": name, "description": s.description, "default_model": s.default_model}
                     for name, s in ordered])
        return
    for name, s in ordered:
        console.print(f"{name:10s} {s.description} [model: {s.default_model}]", highlight=False, markup=False)


store_app = typer.Typer(
    no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
    help="The stage store and model cache of CL_AUDIT_HOME: list them (ls) and remove what no run refers to (gc).")
app.add_typer(store_app, name="store")
RUNS_HELP = "Also count the run folders under this folder as references (repeat for more); CL_AUDIT_HOME is always scanned."


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@store_app.command("ls")
def store_ls(
    runs: list[Path] = typer.Option([], "--runs", help=RUNS_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List the stage store and the model cache: key, kind, size, created, last used and
    the run folders that refer to each entry (from their manifests, where known).

    Example: cl-audit store ls
    """
    from pipelines.audit import default_home
    from pipelines.store_admin import entries

    home = default_home()
    found = entries(home, [_abs(p) for p in runs])
    if as_json:
        _print_json({"home": str(home), "entries": [e.as_json() for e in found],
                     "size": sum(e.size for e in found)})
        return
    if not found:
        console.print(f"{home}: the stage store and the model cache are empty", highlight=False, markup=False)
        return
    for e in found:
        refs = ", ".join(e.referenced_by) if e.referenced_by else "-"
        j = e.as_json()
        console.print(f"{e.where:5s} {e.key:34s} {e.kind:10s} {_bytes(e.size):>9s}  created {j['created']}  "
                      f"last used {j['last_used']}  runs: {refs}", highlight=False, markup=False, soft_wrap=True)
    n_ref = sum(1 for e in found if e.referenced_by)
    console.print(f"{len(found)} entries, {_bytes(sum(e.size for e in found))} in {home} "
                  f"({n_ref} referenced by a run folder)", highlight=False, markup=False, soft_wrap=True)


@store_app.command("gc")
def store_gc(
    older_than: str = typer.Option("0", "--older-than", help="Only entries last used longer ago than this (30m, 12h, 7d)."),
    all_: bool = typer.Option(False, "--all", help="Also entries that run folders refer to (their runs then no longer verify)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove them. Without it: a dry run that lists what would go."),
    runs: list[Path] = typer.Option([], "--runs", help=RUNS_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove store and model-cache entries that no run folder refers to (a dry run unless --yes).

    An entry listed in a finished run's manifest is never removed without --all.

    Example: cl-audit store gc --older-than 7d --yes
    """
    from pipelines.audit import default_home
    from pipelines.store_admin import gc, parse_age

    home = default_home()
    plan = gc(home, parse_age(older_than), all_, yes, [_abs(p) for p in runs])
    if as_json:
        _print_json({"home": str(home), "applied": plan.applied, "size": plan.size, "kept": plan.kept,
                     "removed" if plan.applied else "would_remove": [e.as_json() for e in plan.remove],
                     "skipped": [{"key": k, "why": why} for k, why in plan.skipped]})
        return
    verb = "removed" if plan.applied else "would remove"
    for e in plan.remove:
        console.print(f"{verb} {e.where} {e.key} ({_bytes(e.size)})", highlight=False, markup=False, soft_wrap=True)
    for k, why in plan.skipped:
        console.print(f"skipped {k}: {why}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"{verb} {len(plan.remove)} entries, {_bytes(plan.size)}; {plan.kept} kept"
                  + ("" if plan.applied else " (dry run: add --yes to remove them)"),
                  highlight=False, markup=False, soft_wrap=True)


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
    # MLFLOW_TRACKING_URI and CL_AUDIT_HOME as absolute paths: Ray workers and Tune trials
    # (each in its own working folder) inherit this environment
    absolute_env()
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
        # typer may bundle its own click: recognise a click exception by its class names
        if any(c.__name__ in ("ClickException", "UsageError") for c in type(e).__mro__) and hasattr(e, "show"):
            e.show()
            sys.exit(getattr(e, "exit_code", 0) or 2)
        if type(e).__name__ == "Exit" and hasattr(e, "exit_code"):
            sys.exit(e.exit_code)
        raise
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
