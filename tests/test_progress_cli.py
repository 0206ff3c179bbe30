"""What `cl-audit run` and `cl-audit sweep` print while they work, with stdout piped to a
file (not a terminal): the preparation steps with their counts, one line per stage task
(or trial stage) start and end, a stage counter that ends at N/N, no spinner frames, no
carriage returns and no foreign banners (Ray Tune's table, its TensorBoard hint)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, tiny_config

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # rich's default spinner ("dots")
LINE = re.compile(r"^\[\s*\d+\.\d s\] ")  # every progress line starts with the time since the start


def _cli(*args: str, cwd, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"}
    env.pop("FORCE_COLOR", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _n_stage_tasks(arms: int, sizes: int) -> int:
    """prepare, a training stage per checkpoint but base, a probe per checkpoint, drift."""
    checkpoints = 3 + arms * sizes
    return 1 + (checkpoints - 1) + checkpoints + 1


@pytest.fixture(scope="module")
def audits(home, tmp_path_factory):
    """Two audits of the tiny model through the CLI with stdout piped: the tiny config
    (2 arms x 1 size) and the same with one arm (its stages mostly reused)."""
    tmp = tmp_path_factory.mktemp("progress_cli")
    runs = {}
    for name, extra in (("both", []), ("one_arm", ["--set", "recover.arms=[in_task]"])):
        out = tmp / name
        p = _cli("run", "--config", str(TINY), *extra, "--out", str(out), cwd=tmp)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = (p, json.loads((out / "summary.json").read_text()))
    return runs


def test_preparation_steps_are_lines_with_counts(audits):
    p, summary = audits["both"]
    out = p.stdout
    assert re.search(r"^\[\s*\d+\.\d s\] prepare the model and the facts: started$", out, re.MULTILINE)
    assert re.search(r"^\[\s*\d+\.\d s\] model: started \(build and pretraining on the first run, else from the "
                     r"cache\)$", out, re.MULTILINE), out[:3000]
    assert re.search(r"^\[\s*\d+\.\d s\] model: done, (from the cache|build and pretraining \(first run only\)) "
                     r"in \d+\.\d s$", out, re.MULTILINE), out[:3000]
    n_items = summary["data"]["n_items"]
    assert n_items == 80
    m = re.search(r"^\[\s*\d+\.\d s\] known-fact filter: (done|reused from the store), (\d+)/(\d+) items", out,
                  re.MULTILINE)
    assert m and m.group(2) == m.group(3) == str(n_items), out[:3000]
    n_eval = tiny_config().data.n_eval
    m = re.search(r"^\[\s*\d+\.\d s\] candidate mining: (done|reused from the store), (\d+)/(\d+) items", out,
                  re.MULTILINE)
    assert m and m.group(2) == m.group(3) == str(n_eval), out[:3000]
    # the preparation ends before the first stage task
    lines = out.splitlines()
    first_stage = next(i for i, ln in enumerate(lines) if "[stage tasks 2/" in ln)
    assert any("known-fact filter:" in ln for ln in lines[:first_stage])
    assert any("[stage tasks 1/11] done: prepare the model and the facts in " in ln for ln in lines[:first_stage])


def test_piped_output_has_no_spinner_no_carriage_return_no_source_path(audits):
    for p, _ in audits.values():
        assert "\r" not in p.stdout and "\r" not in p.stderr
        assert not any(ch in p.stdout for ch in SPINNER)
        assert "cli.py:" not in p.stdout and "console.py:" not in p.stdout
        progress = [ln for ln in p.stdout.splitlines() if LINE.match(ln)]
        assert len(progress) >= 12, p.stdout[:3000]


@pytest.mark.parametrize("name, arms, sizes", [("both", 2, 1), ("one_arm", 1, 1)])
def test_stage_counter_ends_at_the_number_of_stage_tasks_run(audits, name, arms, sizes):
    p, summary = audits[name]
    n = _n_stage_tasks(arms, sizes)
    assert len(summary["stages"]) == 3 + arms * sizes
    counts = [(int(a), int(b)) for a, b in re.findall(r"\[stage tasks (\d+)/(\d+)\] ", p.stdout)]
    assert counts == [(i, n) for i in range(1, n + 1)], counts
    # one end line per stage task: prepare, each training stage, each probe, the weight drift
    ends = re.findall(r"\[stage tasks \d+/\d+\] (?:done|reused from the store): ([^,\n]+?)(?:,| in |$)", p.stdout,
                      re.MULTILINE)
    expected = {"prepare the model and the facts", "weight drift"}
    expected |= {f"probe {s}" for s in summary["stages"]} | {f"train {s}" for s in summary["stages"] if s != "base"}
    assert sorted(ends) == sorted(expected)
    assert f"{n + 1}/{n}" not in p.stdout


def test_stage_task_total_matches_the_dag_for_every_suite_arm_and_size():
    from components.registry import load_config
    from pipelines.dag import dag_tasks

    for suite in ("capitals", "biography", "refusal"):
        for arms in (["in_task"], ["irrelevant"], ["in_task", "irrelevant"]):
            for sizes in ([4], [2, 4], [1, 2, 4]):
                cfg = load_config(suite, None, [f"recover.arms={json.dumps(arms)}", f"recover.sizes={sizes}"],
                                  quick=True)
                tasks = dag_tasks(cfg)
                assert len(tasks) == len(set(tasks)) == _n_stage_tasks(len(arms), len(sizes))
                assert tasks[0] == ("prepare", "base") and tasks[-1] == ("drift", "drift")
    assert len(dag_tasks(tiny_config())) == 11


@pytest.fixture(scope="module")
def sweep_run(home, tmp_path_factory):
    """A 2-trial sweep of the tiny model through the CLI with stdout piped."""
    tmp = tmp_path_factory.mktemp("progress_sweep")
    p = _cli("sweep", "--config", str(TINY), "--set", "sweep.kl_penalty=[0.0]", "--set", "sweep.sizes=[2,4]",
             "--set", "sweep.arms=[in_task]", "--out", str(tmp / "s"), cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_sweep_shows_trials_and_their_stages_without_tune_banners(sweep_run):
    out, err = sweep_run.stdout, sweep_run.stderr
    for foreign in ("TensorBoard", "tensorboard", "View detailed results", "Configuration for experiment",
                    "Search algorithm", "Trial status", "Number of trials"):
        assert foreign not in out and foreign not in err, foreign
    assert "\r" not in out and not any(ch in out for ch in SPINNER)
    # the preparation steps, then every trial with its stages
    assert re.search(r"^\[\s*\d+\.\d s\] known-fact filter: (done|reused from the store), 80/80 items", out,
                     re.MULTILINE)
    sizes = []
    for i in (1, 2):
        m = re.search(rf"^\[\s*\d+\.\d s\] trial {i}/2 kl=0/in_task/n=(\d): started$", out, re.MULTILINE)
        assert m, out[-3000:]
        n = int(m.group(1))
        sizes.append(n)
        for stage in ("train aligned", "probe base", "probe aligned", "train perturbed", "probe perturbed",
                      f"train recovered/in_task/{n}", f"probe recovered/in_task/{n}"):
            assert re.search(rf"^\[\s*\d+\.\d s\] trial {i}/2 {stage}: (done|reused from the store)", out,
                             re.MULTILINE), (stage, out[-4000:])
        # a stage that was computed shows its start, then its end with its count; one reused from the store may
        # go from waiting to reused between two polls, so only its end is certain
        if re.search(rf"^\[\s*\d+\.\d s\] trial {i}/2 train recovered/in_task/{n}: done", out, re.MULTILINE):
            assert re.search(rf"^\[\s*\d+\.\d s\] trial {i}/2 train recovered/in_task/{n}: started", out,
                             re.MULTILINE), out[-4000:]
    assert sorted(sizes) == [2, 4]
    # recovery with n=2 is new to this session's store (the audits above trained n=4)
    steps = re.findall(r"^\[\s*\d+\.\d s\] trial [12]/2 train recovered/in_task/2: done, (\d+)/(\d+) steps in ",
                       out, re.MULTILINE)
    assert len(steps) == 1 and steps[0][0] == steps[0][1] != "0", out[-4000:]
    counts = re.findall(r"\[trials (\d+)/(\d+)\] done: trial \d/2 kl=0/in_task/n=[24]", out)
    assert counts == [("1", "2"), ("2", "2")], out[-3000:]
