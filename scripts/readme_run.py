#!/usr/bin/env python3
"""Render README.md's example run from a committed summary.json, so it cannot go stale.

README.md holds one real run between two marker lines::

    <!-- run:begin -->
    ... generated ...
    <!-- run:end -->

This script replaces what lies between them with what ``cl-audit run`` prints for that
summary: the per-stage table and the verdict lines, drawn by the very functions the CLI
prints them with (``stage_table`` and ``verdict_lines`` as ``pipelines/cli.py`` imports
them; they are defined in ``pipelines/console.py``), rendered by rich at a width of 150
columns, with a
caption whose facts (suite, model, seed, config digest, commit, items, machine) come
from the same file. The borders are drawn as on an ASCII terminal. ``cl-audit run`` prints a second table between the two (probes,
weight drift and transitions per stage, ``layers_table``); it is left out here for
length and documented in docs/outputs.md.

Usage (from the repository root)::

    python scripts/readme_run.py                 # rewrite README.md's block
    python scripts/readme_run.py --check         # exit 1 if README.md's block differs
    python scripts/readme_run.py --summary runs/audits/capitals-<digest>/summary.json

To show another run, copy its summary.json to docs/runs/capitals/summary.json (or pass
``--summary``) and run the script again.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BEGIN = "<!-- run:begin -->"
END = "<!-- run:end -->"
DEFAULT_SUMMARY = Path("docs/runs/capitals/summary.json")
WIDTH = 150


class _AsciiText(io.StringIO):
    """A text sink that reports an ASCII encoding, so rich uses ASCII box characters."""

    encoding = "ascii"


def console_text(summary: dict, width: int = WIDTH) -> str:
    """What ``cl-audit run`` prints for ``summary`` (stage table, then the verdict
    lines), as plain text; trailing spaces are stripped from every line."""
    from rich.console import Console

    from pipelines.cli import stage_table, verdict_lines  # what `cl-audit run` prints with

    # a terminal whose encoding is ASCII: rich draws the same table with ASCII borders
    # (one byte a character instead of three; the README has a byte budget)
    console = Console(record=True, width=width, file=_AsciiText(), color_system=None)
    console.print(stage_table(summary))
    for line in verdict_lines(summary):
        console.print(line, highlight=False, markup=False)
    text = console.export_text(styles=False)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def caption(summary: dict, link: str) -> str:
    """One sentence naming the run: every fact in it is read from ``summary``."""
    facts = [f"seed {summary.get('seed', '?')}", f"config digest `{summary.get('config_digest', '?')}`"]
    if summary.get("git_commit"):
        facts.append(f"commit `{summary['git_commit'][:7]}`")
    cand = (summary.get("data") or {}).get("candidates") or {}
    if cand:
        n_eval = (cand.get("mined") or 0) + (cand.get("kept") or 0)
        facts.append(f"{n_eval} evaluation facts ranked against K = {cand.get('k')} {cand.get('mode')} candidates")
    m = summary.get("machine") or {}
    if m:
        gpu = "no GPU" if m.get("gpu", "none") == "none" else f"GPU {m['gpu']}"
        facts.append(f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs, {gpu}")
    return (f"What `cl-audit run` printed on an ASCII terminal for the audit recorded in [{link}]({link}) "
            f"({summary['suite']} / {summary['model']}; {'; '.join(facts)}):")


def render(summary: dict, link: str) -> str:
    """The block between the markers (markers excluded), starting and ending with a newline."""
    return f"\n{caption(summary, link)}\n\n```text\n{console_text(summary)}\n```\n"


def split_readme(text: str, path: Path) -> tuple[str, str, str]:
    """(before the block, the block, after it); the markers stay in before/after."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"{path}: expected exactly one {BEGIN} and one {END} line")
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    return head + BEGIN, block, END + tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", type=Path, default=DEFAULT_SUMMARY,
                    help=f"the summary.json to render (default: {DEFAULT_SUMMARY}, relative to the repository root)")
    ap.add_argument("--readme", type=Path, default=Path("README.md"), help="the file whose block is rewritten")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if the block differs")
    args = ap.parse_args(argv)

    summary_path = args.summary if args.summary.is_absolute() else ROOT / args.summary
    readme = args.readme if args.readme.is_absolute() else ROOT / args.readme
    summary = json.loads(summary_path.read_text())
    link = Path(os.path.relpath(summary_path, readme.parent)).as_posix()
    head, old, tail = split_readme(readme.read_text(), readme)
    new = render(summary, link)
    if args.check:
        if old == new:
            print(f"{readme.name}: the run block matches {link}")
            return 0
        diff = difflib.unified_diff(old.splitlines(), new.splitlines(), "README (committed)", "rendered", lineterm="")
        print("\n".join(diff))
        print(f"{readme.name}: the run block differs from {link}; run: python scripts/readme_run.py", file=sys.stderr)
        return 1
    if old != new:
        readme.write_text(head + new + tail)
        print(f"{readme.name}: run block rewritten from {link}")
    else:
        print(f"{readme.name}: run block already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
