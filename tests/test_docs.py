"""The documentation stays true: the README and the manual (docs/, MkDocs) against the code.

- the site builds with ``mkdocs build --strict`` (no warning: no broken link or anchor);
- every ``cl-audit <command>`` shown in README.md and docs/*.md names a command of the
  CLI, with options that command has;
- README.md stays a newcomer's five minutes (under 12,000 bytes);
- README.md's example run is what ``scripts/readme_run.py`` renders from the committed
  summary.json (it cannot go stale);
- every relative link of README.md points at a file that exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000  # bytes: a newcomer's five minutes; the manual lives in docs/


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr
    for page in ("design", "metrics", "suites", "configuration", "outputs", "sweeps", "cluster", "guarantees",
                 "development"):
        assert (ROOT / "docs" / f"{page}.md").exists(), page
        assert (site / page / "index.html").exists(), page
    assert (site / "index.html").exists()


# --- the CLI commands shown in the docs -------------------------------------------------

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"(?<![\w-])cl-audit[ \t]+([A-Za-z][\w-]*)")
LONG_OPTION = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
SHORT_OPTION = re.compile(r"(?<!\S)(-[A-Za-z])(?=\s|$)")
# where a shell command line ends: a comment, a separator, a pipe
END = re.compile(r"\s#|;|\|\||&&|\||\$\(")


def code_snippets(text: str) -> list[str]:
    """The command lines of a markdown text: each line of every fenced block (with
    backslash continuations joined), then every inline code span outside the fences."""
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    rest = FENCE.sub("", text)
    lines += [span.replace("\n", " ") for span in INLINE.findall(rest)]
    return lines


def shown_commands(text: str) -> list[tuple[str, list[str], str]]:
    """``(command, options, snippet)`` for every ``cl-audit <command>`` in the code of
    ``text``; the part of ``cl-audit submit ... -- <command> ...`` after ``--`` is
    a command of its own."""
    found = []
    for line in code_snippets(text):
        for m in COMMAND.finditer(line):
            if line[: m.start()].rstrip().endswith(("-n", "--namespace")):
                continue  # kubectl -n cl-audit ...: the namespace, not the CLI
            rest = line[m.end():]
            end = END.search(rest)
            rest = rest[: end.start()] if end else rest
            parts = [(m.group(1), rest)]
            if m.group(1) == "submit" and re.search(r"(?<!\S)--(?=\s)", rest):
                own, nested = re.split(r"(?<!\S)--(?=\s)", rest, maxsplit=1)
                parts = [("submit", own)]
                words = nested.split()
                if words:
                    parts.append((words[0], nested.split(words[0], 1)[1]))
            for name, args in parts:
                opts = LONG_OPTION.findall(args) + SHORT_OPTION.findall(args)
                found.append((name, opts, line.strip()))
    return found


@pytest.fixture(scope="module")
def cli_commands() -> dict[str, set[str]]:
    """Command name -> every option string it accepts, from the typer app itself."""
    import typer

    from pipelines.cli import app

    def opts(cmd) -> set[str]:
        return {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}

    group = typer.main.get_command(app)
    # a command group (cl-audit store ls|gc): its subcommands' options count as its own
    return {
        name: opts(cmd).union(*(opts(c) for c in getattr(cmd, "commands", {}).values())) | {"--help"}
        for name, cmd in group.commands.items()
    }


def test_the_snippet_parser():
    text = (
        "Run `cl-audit run capitals --quick` or:\n\n```bash\n"
        "cl-audit sweep capitals --set a=1 \\\n    --max-concurrent 2   # a comment --nothing\n"
        "cl-audit submit --address http://x:8265 -- run capitals --out /d; echo --no\n"
        ".venv/bin/cl-audit show runs/a-b\nkubectl -n cl-audit port-forward svc/x 8265:8265 &\n```\n"
        "The image cl-audit:0.1.0 and the name cl-audit-head-svc are not commands.\n"
    )
    assert shown_commands(text) == [
        ("sweep", ["--set", "--max-concurrent"], "cl-audit sweep capitals --set a=1      --max-concurrent 2   # a comment --nothing"),
        ("submit", ["--address"], "cl-audit submit --address http://x:8265 -- run capitals --out /d; echo --no"),
        ("run", ["--out"], "cl-audit submit --address http://x:8265 -- run capitals --out /d; echo --no"),
        ("show", [], ".venv/bin/cl-audit show runs/a-b"),
        ("run", ["--quick"], "cl-audit run capitals --quick"),
    ]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_exists_with_its_options(path, cli_commands):
    wrong = []
    for name, opts, snippet in shown_commands(path.read_text()):
        if name not in cli_commands:
            wrong.append(f"{snippet!r}: no command {name!r} (commands: {', '.join(sorted(cli_commands))})")
            continue
        wrong += [f"{snippet!r}: cl-audit {name} has no option {o}" for o in opts if o not in cli_commands[name]]
    assert not wrong, "\n".join(wrong)


def test_the_docs_show_every_command(cli_commands):
    shown = {name for p in DOC_FILES for name, _, _ in shown_commands(p.read_text())}
    assert len(shown) >= 5, shown  # the parser found the docs' commands at all
    assert set(cli_commands) <= shown, f"commands the docs never show: {sorted(set(cli_commands) - shown)}"


# --- the README -------------------------------------------------------------------------

def test_readme_is_short():
    n = len(README.read_bytes())
    assert n < README_LIMIT, f"README.md has {n} bytes; keep it under {README_LIMIT} (move the rest to docs/)"


def test_readme_run_matches_the_committed_summary():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_run.py"), "--check"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def test_readme_relative_links_resolve():
    links = LINK.findall(README.read_text())
    relative = [u for u in links if not re.match(r"^[a-z][a-z0-9+.-]*:", u, re.I) and not u.startswith("#")]
    assert relative, "README.md links into docs/"
    missing = [u for u in relative if not (ROOT / u.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
