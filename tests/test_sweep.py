"""The Ray Tune sweep on the tiny model: a 2 x 2 grid over perturb.kl_penalty x recover.size,
stage reuse counted in the store, the table and summary, MLflow parent + nested runs, and a
sweep interrupted after its first trial that resumes with ``Tuner.restore``."""

from __future__ import annotations

import json
import math
import os
import signal
from collections import Counter
from itertools import product

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from components.artifacts import Store
from components.errors import UserError
from pipelines.sweep import expected_trials, param_space, run_sweep
from pipelines.sweep_analysis import (CELL_COLUMNS, METRIC_COLUMNS, RECOVERY_METRICS, TABLE_COLUMNS, best_rule,
                                      best_trial, rank_trials)

from conftest import TINY, tiny_config
from test_cli import cli

SWEEP = ("sweep.kl_penalty=[0.0,1.0]", "sweep.sizes=[2,4]", "sweep.arms=[in_task]")
CELLS = set(product([0.0, 1.0], [2, 4]))


@pytest.fixture(scope="module")
def sweep_home(home, tmp_path_factory):
    """A run folder with its own empty stage store that shares the session's model cache."""
    h = tmp_path_factory.mktemp("sweephome")
    (home / "cache").mkdir(exist_ok=True)
    (h / "cache").symlink_to(home / "cache", target_is_directory=True)
    return h


@pytest.fixture(scope="module")
def sweep_2x2(sweep_home, ray_local, tmp_path_factory):
    cfg = tiny_config(*SWEEP)
    out = tmp_path_factory.mktemp("sweep2x2")
    summary = run_sweep(cfg, out, sweep_home)
    return cfg, out, summary, pd.read_parquet(out / "sweep.parquet")


def test_four_trials_and_each_shared_stage_computed_once(sweep_2x2, sweep_home):
    _, _, s, table = sweep_2x2
    assert s["interrupted"] is False
    assert s["trials"]["finished"] == 4 and s["trials"]["by_status"] == {"TERMINATED": 4}
    kinds = Counter(k.split("-")[0] for k in Store(sweep_home / "store").executions())
    # tune once for the grid, perturb once per penalty, recover + probe per cell
    # (probes: base, aligned, two perturbed, four recovered); "filter" (the known facts) and
    # "candidates" (the mined multiple-choice candidates) are data preparation, once per sweep
    assert kinds == {"filter": 1, "candidates": 1, "tune": 1, "perturb": 2, "recover": 4, "probe": 8}
    assert s["stages_computed"] == {"tune": 1, "perturb": 2, "recover": 4, "probe": 8}
    assert sorted(",".join(table.stages_computed).split(",")) == sorted(
        ["tune"] + ["perturb"] * 2 + ["recover"] * 4 + ["probe"] * 8)


def test_table_has_a_row_per_trial_with_the_reported_metrics(sweep_2x2):
    _, out, s, table = sweep_2x2
    assert len(table) == 4 and set(table.status) == {"TERMINATED"}
    assert {(r.kl_penalty, r.n) for r in table.itertuples()} == CELLS
    assert set(table.arm) == {"in_task"} and set(table.freeze_layers) == {0}
    assert table.iterations.tolist() == [2] * 4 and not table.stopped_early.any()
    for col in ("task_drop", "knowledge_retention", "perturb_acc", "kl_to_aligned", "recovered_task_acc",
                "recovered_knowledge_acc", "knowledge_after_recovery", "recovered_kl_to_aligned"):
        assert table[col].map(math.isfinite).all(), col
    # the columns beside the ratio: the drop and the absolute task_acc after recovery, with CIs
    assert list(table.columns) == TABLE_COLUMNS
    assert table.drop_significant.dtype == bool
    for col in METRIC_COLUMNS:
        assert table[col].dtype == "float64", col
    for col in ("task_drop_ci_low", "task_drop_ci_high", "recovered_task_acc_ci_low", "recovered_task_acc_ci_high"):
        assert table[col].map(math.isfinite).all(), col
    for r in table.itertuples():
        assert r.task_drop_ci_low <= r.task_drop <= r.task_drop_ci_high
        assert 0 <= r.recovered_task_acc_ci_low <= r.recovered_task_acc <= r.recovered_task_acc_ci_high <= 1
        # significant exactly when the drop's CI lies above 0 (the verdict's task_drop_significant)
        assert r.drop_significant == (r.task_drop_ci_low > 0)
    for r in table.itertuples():
        assert r.task_drop == pytest.approx(r.aligned_task_acc - r.perturbed_task_acc)
        if r.task_drop > 0:
            assert r.recovery_ratio == pytest.approx((r.recovered_task_acc - r.perturbed_task_acc) / r.task_drop)
        # without a KL penalty the tiny model's facts sag under the refusal (the retention
        # interval reaches across 0.8: inconclusive, as the default tiny audit); the penalty
        # toward the aligned model keeps them (spurious)
        if r.kl_penalty == 0.0:
            assert r.label == "inconclusive" and r.knowledge_retention < 0.8
        else:
            assert r.label == "spurious" and r.knowledge_retention >= 0.8
    # trials of one penalty share one perturbed checkpoint; the penalty holds the drift down
    by_p = table.groupby("kl_penalty")
    for col in ("task_drop", "perturb_acc", "kl_to_aligned", "task_drop_ci_low", "drop_significant"):
        assert (by_p[col].nunique() == 1).all(), col
    kl = by_p.kl_to_aligned.first()
    assert kl[1.0] < kl[0.0]
    assert kl[0.0] > 0

    # the summary is derived from the same rows
    on_disk = json.loads((out / "sweep_summary.json").read_text())
    assert on_disk == json.loads(json.dumps(s))
    # best: the highest ratio among the cells whose drop is significant, when any is
    rated = table.dropna(subset=["recovery_ratio"])
    pool = rated[rated.drop_significant] if rated.drop_significant.any() else rated
    b = s["best"]
    assert b["metric"] == "recovery_ratio" and b["value"] == pytest.approx(pool.recovery_ratio.max())
    assert b["trial_id"] in set(pool[pool.recovery_ratio == pool.recovery_ratio.max()].trial_id)
    assert b["drop_significant"] is bool(rated.drop_significant.any())
    row = table.set_index("trial_id").loc[b["trial_id"]]
    assert b["metrics"]["recovered_task_acc"] == pytest.approx(row.recovered_task_acc)
    assert b["metrics"]["recovered_task_acc_ci_low"] == pytest.approx(row.recovered_task_acc_ci_low)
    assert b["metrics"]["task_drop_ci_low"] == pytest.approx(row.task_drop_ci_low)
    assert set(b["config"]) == set(CELL_COLUMNS)
    rule = s["best_rule"]
    assert rule.startswith("Best is the finished trial with the highest recovery_ratio among those whose task "
                           "drop is significant (the lower bound of its 95% CI is above 0)")
    assert ("No finished trial's task drop was significant" in rule) is (not table.drop_significant.any())
    # the ranking lists every finished trial once, significant drops first, the ratio descending within
    ranked = s["ranking"]
    assert sorted(r["trial_id"] for r in ranked) == sorted(table.trial_id) and ranked[0]["trial_id"] == b["trial_id"]
    sig = [r["drop_significant"] for r in ranked]
    assert sig == sorted(sig, reverse=True)
    for r in ranked:
        t = table.set_index("trial_id").loc[r["trial_id"]]
        assert r["drop_significant"] is bool(t.drop_significant)
        assert r["task_drop_ci"] == pytest.approx([t.task_drop_ci_low, t.task_drop_ci_high])
        assert r["recovered_task_acc_ci"] == pytest.approx([t.recovered_task_acc_ci_low, t.recovered_task_acc_ci_high])
    for group in (True, False):
        ratios = [r["recovery_ratio"] for r in ranked
                  if r["drop_significant"] is group and r["recovery_ratio"] is not None]
        assert ratios == sorted(ratios, reverse=True)
    target = s["recovery_target"]
    assert target == 0.5  # verdict.recovery_target
    assert [(r["kl_penalty"], r["arm"]) for r in s["smallest_n"]] == [(0.0, "in_task"), (1.0, "in_task")]
    for r in s["smallest_n"]:
        rows = table[(table.kl_penalty == r["kl_penalty"]) & (table.recovery_ratio >= target)]
        assert r["n"] == (int(rows.n.min()) if len(rows) else None)
        assert r["drop_significant"] is bool(table[table.kl_penalty == r["kl_penalty"]].drop_significant.all())
        assert ("not significant" in r["note"]) is (not r["drop_significant"])
    pts = by_p[["perturb_acc", "task_drop"]].first()
    front = {p["kl_penalty"] for p in s["pareto_perturb_acc_vs_task_drop"]}
    for p, row in pts.iterrows():
        dominated = ((pts.perturb_acc >= row.perturb_acc) & (pts.task_drop <= row.task_drop)
                     & ((pts.perturb_acc > row.perturb_acc) | (pts.task_drop < row.task_drop))).any()
        assert (p in front) == (not dominated)
    png = (out / "recovery_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_mlflow_parent_and_a_nested_run_per_trial(sweep_2x2):
    _, _, s, table = sweep_2x2
    client = MlflowClient(s["mlflow"]["tracking_uri"])
    parent = client.get_run(s["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cl_audit.kind"] == "sweep"
    assert parent.data.params["sweep.kl_penalty"] == "[0.0, 1.0]"
    assert parent.data.metrics["trials_finished"] == 4
    arts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.parquet", "sweep_summary.json", "recovery_heatmap.png", "config.yaml"} <= arts
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    by_trial = {r.data.tags["cl_audit.trial_id"]: r for r in children}
    assert set(by_trial) == set(table.trial_id)
    for row in table.itertuples():
        child = by_trial[row.trial_id]
        assert child.info.run_id == row.mlflow_run_id and child.info.status == "FINISHED"
        assert float(child.data.params["kl_penalty"]) == row.kl_penalty and int(child.data.params["n"]) == row.n
        for k in ("task_drop", "perturb_acc", "kl_to_aligned", "recovered_task_acc"):
            assert child.data.metrics[k] == pytest.approx(getattr(row, k))
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) >= 1  # the recover stage's curve


def _cells_and_metrics(table: pd.DataFrame) -> pd.DataFrame:
    cols = ["status", *CELL_COLUMNS, *METRIC_COLUMNS, "drop_significant", "label"]
    return table[cols].sort_values(CELL_COLUMNS).reset_index(drop=True)


def test_interrupted_sweep_resumes_without_redoing_finished_trials(sweep_2x2, sweep_home, tmp_path):
    out = tmp_path / "resumed"
    overrides = (*SWEEP, "sweep.max_concurrent=1")

    def ctrl_c_after_first_trial(msg: str) -> None:
        # Tune's own SIGINT handler (as for Ctrl-C) stops the run and saves its state
        if msg.startswith("trial ") and " finished: " in msg and not sent:
            sent.append(msg)
            os.kill(os.getpid(), signal.SIGINT)

    sent: list[str] = []
    first = run_sweep(tiny_config(*overrides), out, sweep_home, progress=ctrl_c_after_first_trial)
    assert first["interrupted"] is True and first["trials"]["finished"] == 1
    partial = pd.read_parquet(out / "sweep.parquet")
    done_before = partial[partial.status == "TERMINATED"]
    assert len(done_before) == 1
    client = MlflowClient(first["mlflow"]["tracking_uri"])
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "KILLED"

    # a new process runs the same command: Tune restores the experiment
    r = cli("sweep", "--config", str(TINY), *[a for o in SWEEP for a in ("--set", o)], "--max-concurrent", "1",
            "--out", str(out), home=sweep_home)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming the sweep" in r.stdout and "(1 trials already finished)" in r.stdout
    # the console shows the rule and the trials best first, with the drop and the task_acc after recovery
    assert "  rule: Best is the finished trial with the highest recovery_ratio among those" in r.stdout
    head = r.stdout.index("trials, best first:")
    assert "task_drop [CI]" in r.stdout[head:] and "task_acc after rec. [CI]" in r.stdout[head:]
    finished_now = [line for line in r.stdout.splitlines() if " finished: trial/" in line]
    assert len(finished_now) == 3
    assert not any(done_before.trial_id.iloc[0] in line for line in finished_now)

    final = pd.read_parquet(out / "sweep.parquet")
    pd.testing.assert_frame_equal(_cells_and_metrics(final), _cells_and_metrics(sweep_2x2[3]))
    kept = final[final.trial_id == done_before.trial_id.iloc[0]].iloc[0]
    assert kept.mlflow_run_id == done_before.mlflow_run_id.iloc[0]
    s = json.loads((out / "sweep_summary.json").read_text())
    assert s["mlflow"]["run_id"] == first["mlflow"]["run_id"]  # the same parent run, finished now
    assert client.get_run(s["mlflow"]["run_id"]).info.status == "FINISHED"
    children = client.search_runs([s["mlflow"]["experiment_id"]], f"tags.mlflow.parentRunId = '{s['mlflow']['run_id']}'")
    assert sorted(c.data.tags["cl_audit.trial_id"] for c in children) == sorted(final.trial_id)


def _table(rows: list[dict]) -> pd.DataFrame:
    """A sweep table of finished trials with the given cells and metrics (NaN elsewhere)."""
    base = {k: float("nan") for k in METRIC_COLUMNS} | {"status": "TERMINATED", "arm": "in_task", "freeze_layers": 0,
                                                        "label": "spurious", "mlflow_run_id": None}
    df = pd.DataFrame([base | r for r in rows])
    df["drop_significant"] = df.drop_significant.astype(bool)
    return df


def test_best_never_prefers_a_cell_whose_drop_is_not_significant():
    # t1: a huge ratio over a drop whose CI includes 0 (0.05 [-0.05, 0.15]); t2, t3: real drops
    df = _table([
        {"trial_id": "t1", "kl_penalty": 1.0, "n": 2, "task_drop": 0.05, "task_drop_ci_low": -0.05,
         "drop_significant": False, "recovery_ratio": 3.0, "recovered_task_acc": 0.95},
        {"trial_id": "t2", "kl_penalty": 0.0, "n": 2, "task_drop": 0.9, "task_drop_ci_low": 0.7,
         "drop_significant": True, "recovery_ratio": 0.6, "recovered_task_acc": 0.55},
        {"trial_id": "t3", "kl_penalty": 0.0, "n": 4, "task_drop": 0.9, "task_drop_ci_low": 0.7,
         "drop_significant": True, "recovery_ratio": 0.8, "recovered_task_acc": 0.72},
        {"trial_id": "t4", "kl_penalty": 0.5, "n": 4, "task_drop": 0.0, "task_drop_ci_low": 0.0,
         "drop_significant": False, "recovery_ratio": float("nan"), "recovered_task_acc": 0.9},
    ])
    best = best_trial(df, "recovery_ratio", "max")
    assert best["trial_id"] == "t3" and best["value"] == 0.8 and best["drop_significant"] is True
    assert list(rank_trials(df, "recovery_ratio", "max").trial_id) == ["t3", "t2", "t1", "t4"]
    # min: the significant cells still come first
    assert best_trial(df, "recovery_ratio", "min")["trial_id"] == "t2"
    assert best_trial(df, "recovered_task_acc", "max")["trial_id"] == "t3"
    # without any significant drop, the best among the others (and it says so)
    only = df[~df.drop_significant]
    b = best_trial(only, "recovery_ratio", "max")
    assert b["trial_id"] == "t1" and b["drop_significant"] is False
    # a perturbation metric ranks alone: the smallest drop is t4, whose drop is not significant
    assert "task_drop" not in RECOVERY_METRICS
    assert best_trial(df, "task_drop", "min")["trial_id"] == "t4"
    # ties of the metric keep the table order
    tie = df.assign(recovery_ratio=[3.0, 0.8, 0.8, float("nan")])
    assert best_trial(tie, "recovery_ratio", "max")["trial_id"] == "t2"
    # unfinished trials are never best
    assert best_trial(df.assign(status="ERROR"), "recovery_ratio", "max") is None
    # the sentence of sweep_summary.json
    assert "among those whose task drop is significant" in best_rule("recovery_ratio", "max", 0.9, True)
    assert "its 90% CI" in best_rule("recovery_ratio", "max", 0.9, True)
    assert "No finished trial's task drop was significant" in best_rule("recovery_ratio", "max", 0.95, False)
    assert best_rule("task_drop", "min", 0.95, True).startswith(
        "Best is the finished trial with the lowest task_drop, ranked by task_drop alone")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["sweep.kl_penalty=[-1]"], "sweep.kl_penalty: Value error, expected a list of penalties >= 0"),
        (["sweep.kl_penalty={loguniform: [0, 1]}"], "sweep.kl_penalty: Value error, expected a list"),
        (["sweep.metric=accuracy"], "sweep.metric: Input should be 'recovery_ratio'"),
        (["sweep.search=bayes"], "sweep.search: Input should be 'grid' or 'random'"),
        (["sweep.num_samples=3"], "sweep.num_samples: a grid of lists has nothing to sample"),
        (["sweep.arms=[]"], "sweep.arms: Value error, expected at least one arm"),
        (["sweep.max_concurrent=0"], "sweep.max_concurrent: Input should be greater than or equal to 1"),
    ],
)
def test_bad_sweep_config_is_one_line_user_error(overrides, expected):
    with pytest.raises(UserError) as e:
        tiny_config(*overrides)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_search_spaces():
    grid = param_space(tiny_config("sweep.freeze_layers=[0,1]"))
    assert grid["kl_penalty"] == {"grid_search": [0.0, 1.0]} and grid["n"] == {"grid_search": [2, 4]}
    assert grid["freeze_layers"] == {"grid_search": [0, 1]} and grid["arm"] == "in_task"
    assert expected_trials(tiny_config("sweep.freeze_layers=[0,1]")) == 8
    cfg = tiny_config("sweep.kl_penalty={loguniform: [0.001, 1]}", "sweep.search=random", "sweep.num_samples=5")
    space = param_space(cfg)
    assert type(space["kl_penalty"]).__name__ == "Float" and space["kl_penalty"].lower == 0.001
    assert type(space["n"]).__name__ == "Categorical" and expected_trials(cfg) == 5


def test_sizes_beyond_the_recovery_pool_are_refused_before_any_work(home, tmp_path):
    with pytest.raises(UserError, match=r"sweep.sizes: 99 is larger than the in-task recovery pool"):
        run_sweep(tiny_config("sweep.sizes=[99]"), tmp_path / "out", home)
    assert not (tmp_path / "out" / "sweep_state.json").exists()


def test_sweep_user_mistake_exits_2_with_one_line(tmp_path):
    r = cli("sweep", "--config", str(TINY), "--set", "sweep.kl_penalty=[-1]", "--out", str(tmp_path / "out"),
            home=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "sweep.kl_penalty: Value error, expected a list of penalties >= 0" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "out" / "sweep.parquet").exists()


def test_random_search_with_asha_draws_log_uniform_penalties(home, ray_local, tmp_path):
    """``search: random``: ``num_samples`` trials under the ASHA scheduler, penalties drawn
    log-uniformly from the range; each distinct penalty has its own perturb stage."""
    h = tmp_path / "home"
    h.mkdir()
    (home / "cache").mkdir(exist_ok=True)
    (h / "cache").symlink_to(home / "cache", target_is_directory=True)
    cfg = tiny_config("sweep.kl_penalty={loguniform: [0.01, 1.0]}", "sweep.search=random", "sweep.num_samples=3",
                      "sweep.sizes=[2,4]", "sweep.arms=[in_task]", "sweep.max_concurrent=1")
    summary = run_sweep(cfg, tmp_path / "out", h)
    table = pd.read_parquet(tmp_path / "out" / "sweep.parquet")
    assert summary["search"] == "random" and summary["trials"]["total"] == 3
    assert summary["trials"]["finished"] == 3 and summary["trials"]["by_status"] == {"TERMINATED": 3}
    assert len(table) == 3 and set(table.status) <= {"TERMINATED"}
    assert table.kl_penalty.between(0.01, 1.0).all() and table.kl_penalty.nunique() == 3
    assert set(table.n) <= {2, 4}
    kinds = Counter(k.split("-")[0] for k in Store(h / "store").executions())
    assert kinds["tune"] == 1 and kinds["perturb"] == 3
