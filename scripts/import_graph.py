"""The project's import graph: every ``import`` of one project module by another
(module level and inside functions), its cycles, and the arrows that point up a layer
(``components`` below ``pipelines``) or into a library ``components/`` must not use.

``python scripts/import_graph.py`` prints the edges that break a rule and exits 1 when
there is one (tests/test_layers.py runs it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("components", "pipelines")
# libraries of the orchestration layer: components/ never imports them
FORBIDDEN_BELOW = ("ray", "kfp", "mlflow", "typer", "rich")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules and top-level libraries that ``name`` imports anywhere."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in known:
                found.add(t)
            elif t.split(".")[0] in FORBIDDEN_BELOW:
                found.add(t.split(".")[0])
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in sorted(g.items()):
        if m.startswith("components"):
            for t in sorted(targets):
                if t.startswith("pipelines") or t in FORBIDDEN_BELOW:
                    bad.append(f"{m} -> {t} (components/ imports the orchestration layer)")
    for c in cycles({m: {t for t in ts if t in g} for m, ts in g.items()}):
        bad.append("cycle: " + " -> ".join(c))
    return bad


def main() -> int:
    g = graph()
    bad = violations(g)
    n_edges = sum(len([t for t in ts if t in g]) for ts in g.values())
    print(f"{len(g)} modules, {n_edges} project imports")
    for b in bad:
        print(b)
    print("no cycles, no arrow back up" if not bad else f"{len(bad)} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
