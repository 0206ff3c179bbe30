"""The layers of the code (docs/design.md, "Architecture"): no import cycle, no arrow from
components/ up to pipelines/, and components/ free of Ray, kfp, MLflow, typer and rich."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_no_cycles_and_no_arrow_back_up():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert r.stdout.strip().endswith("no cycles, no arrow back up")


def test_the_checker_finds_a_cycle_and_an_arrow_up():
    sys.path.insert(0, str(ROOT / "scripts"))
    import import_graph

    g = {"components.a": {"components.b", "ray"}, "components.b": {"components.a"}, "pipelines.x": {"components.a"}}
    bad = import_graph.violations(g)
    assert "components.a -> ray (components/ imports the orchestration layer)" in bad
    assert "cycle: components.a -> components.b" in bad
    g = {"components.a": {"pipelines.x"}, "pipelines.x": set()}
    assert import_graph.violations(g) == ["components.a -> pipelines.x (components/ imports the orchestration layer)"]
