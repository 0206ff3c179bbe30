"""The read-only commands on real tiny runs, driven as subprocesses: ``history`` (the seed
and the settings that differ, sweeps listed), ``compare`` (paired tests, Holm's
correction named), ``show``/``report`` on a sweep folder, ``--json`` on every read-only
command, and ``store ls|gc``.

Four runs shared by the module (one home, its default sqlite tracking store): audits A
(tiny config, seed 0), B (seed 1: the same config otherwise), C (``perturb.kind=none``:
a real difference), and a tiny sweep S.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY


def cli(*args: str, home: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "CL_AUDIT_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def as_json(r: subprocess.CompletedProcess):
    """stdout parsed as one JSON document: it must hold nothing else."""
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The home and the folders of A, B, C (under ``home/audits``) and S (``home/sweeps``)."""
    home = tmp_path_factory.mktemp("reads-home")
    out = {"home": home}
    for name, sets in (("A", []), ("B", ["--set", "seed=1"]), ("C", ["--set", "perturb.kind=none"])):
        folder = home / "audits" / name
        r = cli("run", "--config", str(TINY), *sets, "--out", str(folder), home=home)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        out[name] = folder
    s = home / "sweeps" / "S"
    r = cli("sweep", "--config", str(TINY), "--set", "sweep.kl_penalty=[0.0]", "--set", "sweep.sizes=[2,4]",
            "--set", "sweep.arms=[in_task]", "--out", str(s), home=home)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out["S"] = s
    return out


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_history_shows_the_seed_the_differing_settings_and_sweeps(runs):
    home = runs["home"]
    ids = {k: _summary(runs[k])["mlflow"]["run_id"] for k in "ABC"}
    sweep_id = json.loads((runs["S"] / "sweep_summary.json").read_text())["mlflow"]["run_id"]
    h = as_json(cli("history", "--json", home=home))
    by_id = {row["run_id"]: row for row in h["runs"]}
    assert set(by_id) == {*ids.values(), sweep_id}
    assert [by_id[i]["kind"] for i in (*ids.values(), sweep_id)] == ["audit", "audit", "audit", "sweep"]
    assert [by_id[ids[k]]["seed"] for k in "ABC"] == ["0", "1", "0"]
    # the settings that differ between the listed runs, each a column: C's perturbation;
    # never a setting all four share. A field logged only where it applies (sweep.* on the
    # sweep alone, since audits log no sweep.* params) is compared among the runs that have it
    assert "perturb.kind" in h["differs"]
    assert "perturb.epochs" not in h["differs"] and "sweep.sizes" not in h["differs"] and "seed" not in h["differs"]
    assert "sweep.kl_penalty" not in h["differs"]
    assert [by_id[ids[k]]["differs"]["perturb.kind"] for k in "ABC"] == ["refusal", "refusal", "none"]
    assert by_id[sweep_id]["trials"] == 2
    # the table: a seed and a kind column; A and B are no longer identical rows
    r = cli("history", home=home)
    assert r.returncode == 0, r.stderr
    head = next(x for x in r.stdout.splitlines() if " run " in f" {x} " and "seed" in x)
    assert "kind" in head and "perturb.kind" in head
    line = {k: next(x for x in r.stdout.splitlines() if ids[k] in x) for k in "ABC"}
    assert line["A"].split(ids["A"])[1].split()[:3] == ["audit", "tiny-llama", "capitals"]
    assert line["A"].split(ids["A"])[1].split()[3] == "0" and line["B"].split(ids["B"])[1].split()[3] == "1"
    assert "sweep" in next(x for x in r.stdout.splitlines() if sweep_id in x)


def test_compare_two_seeds_corrects_for_multiple_comparisons_with_holm(runs):
    """Two seeds of the tiny config: the seed picks other evaluation items (unpaired) and,
    for the tiny model, pretrains another base model, so a few differences are real (the
    two checkpoints differ); Holm's correction keeps only those no resample of the items
    explains, where the per-test CIs flagged several times as many."""
    c = as_json(cli("compare", str(runs["A"]), str(runs["B"]), "--json", home=runs["home"]))
    assert c["correction"]["method"] == "holm" and c["correction"]["alpha"] == pytest.approx(0.05)
    assert c["config_diff"] == [{"field": "seed", "a": 0, "b": 1}]
    tests = [r for r in c["rows"] if r["p"] is not None]
    assert c["correction"]["tests"] == len(tests) >= 30
    sig = [r for r in c["rows"] if r["significant"]]
    raw = [r for r in c["rows"] if r["significant_uncorrected"]]
    assert c["correction"]["significant"] == len(sig) and c["correction"]["significant_uncorrected"] == len(raw)
    assert len(raw) >= 3 * max(len(sig), 1)
    for r in tests:  # Holm's adjusted p is never below the raw one; significant only where it is < 0.05
        assert r["p_adjusted"] >= r["p"] and r["significant"] == (r["p_adjusted"] < 0.05)
    for r in sig:  # what stays significant clears Holm's first threshold: p < 0.05 / tests
        assert r["p"] < 0.05 / len(tests)
    rule = {r["rule"] for r in tests}
    assert rule <= {"paired bootstrap" if c["paired"] else "bootstrap", "normal approx. of the CIs"}
    r = cli("compare", str(runs["A"]), str(runs["B"]), home=runs["home"])
    assert r.returncode == 0, r.stderr
    assert f"{len(sig)} of {len(tests)} differences significant after holm correction ({len(raw)} uncorrected)" in r.stdout
    assert "Holm-adjusted p < 0.05" in r.stdout


def test_compare_finds_the_real_difference_paired(runs):
    a, c = _summary(runs["A"]), _summary(runs["C"])
    got = as_json(cli("compare", str(runs["A"]), str(runs["C"]), "--json", home=runs["home"]))
    assert got["paired"] is True and got["correction"]["method"] == "holm"
    assert got["config_diff"] == [{"field": "perturb.kind", "a": "refusal", "b": "none"}]
    rows = {(r["stage"], r["metric"]): r for r in got["rows"]}
    pert = rows[("perturbed", "task_acc")]
    assert pert["rule"] == "paired bootstrap"
    assert pert["diff"] == pytest.approx(c["stages"]["perturbed"]["task_acc"] - a["stages"]["perturbed"]["task_acc"])
    assert pert["diff"] > 0.5 and pert["significant"] is True and pert["p_adjusted"] < 0.05
    drop = rows[("verdict", "task_drop")]
    assert drop["significant"] is True and drop["diff"] < -0.5
    same = rows[("aligned", "task_acc")]  # the same tune stage in both: no difference at all
    assert same["diff"] == 0 and same["p"] == 1.0 and same["significant"] is False


def test_show_and_report_on_a_sweep_folder(runs):
    s, home = runs["S"], runs["home"]
    summary = json.loads((s / "sweep_summary.json").read_text())
    r = cli("show", str(s), home=home)
    assert r.returncode == 0, r.stderr
    assert "trials: 2 of 2 finished" in r.stdout and "best by" in r.stdout and "not found" not in r.stderr
    got = as_json(cli("show", str(s), "--json", home=home))
    assert got["kind"] == "sweep" and got["summary"] == summary
    r = cli("report", str(s), home=home)
    assert r.returncode == 0, r.stderr
    html = (s / "report.html").read_text()
    assert r.stdout.startswith(f"Wrote {s / 'report.html'}")
    assert "cl-audit sweep report: capitals / tiny-llama" in html and summary["best"]["trial_id"] in html
    assert "data:image/png;base64," in html and (s / "plots" / "sweep_heatmap.png").is_file()


def test_json_on_the_read_only_commands(runs):
    a, home = runs["A"], runs["home"]
    got = as_json(cli("show", str(a), "--json", home=home))
    assert got["kind"] == "audit" and got["summary"] == _summary(a)
    suites = as_json(cli("suites", "--json", home=home))
    assert suites[0]["name"] == "capitals" and {"name", "description", "default_model"} == set(suites[0])
    v = as_json(cli("verify", str(a), "--json", home=home))
    assert v["ok"] is True and v["mismatches"] == [] and v["checked"] > 10
    # a changed file: exit 1, still one JSON document naming it
    (a / "config.yaml").write_text((a / "config.yaml").read_text() + "\n")
    try:
        r = cli("verify", str(a), "--json", home=home)
        assert r.returncode == 1
        bad = json.loads(r.stdout)
        assert bad["ok"] is False and [m["path"] for m in bad["mismatches"]] == ["config.yaml"]
    finally:
        (a / "config.yaml").write_text((a / "config.yaml").read_text()[:-1])


def test_store_ls_names_the_runs_and_gc_keeps_what_they_refer_to(runs):
    home = runs["home"]

    def stage_keys(folder: Path) -> set[str]:
        manifest = json.loads((folder / "manifest.json").read_text())
        return {Path(f["local"]).relative_to(home / "store").parts[0] for f in manifest["files"] if f.get("local")}

    used = stage_keys(runs["A"])
    used_any = used | stage_keys(runs["B"]) | stage_keys(runs["C"])
    ls = as_json(cli("store", "ls", "--json", home=home))
    by_key = {e["key"]: e for e in ls["entries"]}
    for key in used:
        assert str(runs["A"]) in by_key[key]["referenced_by"] and by_key[key]["where"] == "store"
    model = json.loads((runs["A"] / "data_manifest.json").read_text())["model"]["dir"]
    assert str(runs["A"]) in by_key[Path(model).name]["referenced_by"]
    orphans = sorted(k for k, e in by_key.items() if not e["referenced_by"])
    # unreferenced: the preparation entries (in no manifest), the sweep's own stages
    assert orphans and not set(orphans) & used_any
    assert {"filter", "candidates", "drift"} <= {by_key[k]["kind"] for k in orphans}
    r = cli("store", "ls", home=home)
    assert r.returncode == 0 and f"{len(by_key)} entries" in r.stdout

    dry = as_json(cli("store", "gc", "--json", home=home))  # the default: a dry run
    assert dry["applied"] is False and sorted(e["key"] for e in dry["would_remove"]) == orphans
    assert all((home / "store" / k).is_dir() for k in orphans)
    r = cli("store", "gc", home=home)
    assert f"would remove {len(orphans)} entries" in r.stdout and "dry run: add --yes" in r.stdout
    assert as_json(cli("store", "gc", "--older-than", "7d", "--json", home=home))["would_remove"] == []

    done = as_json(cli("store", "gc", "--yes", "--json", home=home))
    assert done["applied"] is True and sorted(e["key"] for e in done["removed"]) == orphans
    assert not any((home / "store" / k).exists() for k in orphans)
    assert all((home / "store" / k / "result.json").is_file() for k in used)
    assert as_json(cli("verify", str(runs["A"]), "--json", home=home))["ok"] is True

    r = cli("store", "gc", "--older-than", "soon", home=home)
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: --older-than 'soon': expected an age such as 30m, 12h, 7d or 2w "
                                "(a plain number: days)")


def test_holm_and_the_bootstrap_p_value():
    from components.stats import bootstrap_p, holm, normal_p

    assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([None]) == [None] and holm([0.5, 0.9]) == [1.0, 1.0]
    # p inverts the percentile CI: none of 9999 resamples below 0 -> the smallest p, 2 / 10000
    assert bootstrap_p(np.linspace(0.1, 1, 9999)) == pytest.approx(2 / 10000)
    assert bootstrap_p(np.zeros(100)) == 1.0  # no difference in any resample
    # undefined resamples count on both sides: they only raise p
    assert bootstrap_p(np.r_[np.linspace(0.1, 1, 90), np.full(10, np.nan)]) == pytest.approx(2 * 11 / 101)
    assert normal_p(0.0, [0.1, 0.3], [0.1, 0.3], 0.95) == pytest.approx(1.0)
    assert normal_p(0.2, [0.1, 0.3], [0.3, 0.5], 0.95) == pytest.approx(0.005574, abs=1e-5)
    assert normal_p(0.1, [0.2, 0.2], [0.3, 0.3], 0.95) == 0.0 and normal_p(0.1, None, [0, 1], 0.95) is None
