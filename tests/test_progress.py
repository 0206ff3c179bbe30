"""Live progress from the Ray stage tasks: optimiser steps and scored items reach the driver."""

from __future__ import annotations

import math

from pipelines.audit import run_audit

from conftest import tiny_config


def test_progress_counts_steps_and_items(tiny_run, home, tmp_path):
    cfg = tiny_config("recover.arms=[in_task]", "recover.epochs=3")  # only recover + its probe run anew
    snapshots: list[dict] = []
    run_audit(cfg, tmp_path / "p", home, on_progress=lambda st: snapshots.append(
        {k: dict(v) for k, v in st.items()}))
    final = snapshots[-1]
    names = ["base", "aligned", "perturbed", "recovered/in_task/4"]
    tasks = {f"probe {n}" for n in names} | {f"train {n}" for n in names[1:]} | {"drift drift", "prepare base"}
    # the preparation steps (all read from the store by now) beside the stage tasks
    assert set(final) == tasks | {"step model", "step known-fact filter", "step candidate mining"}
    assert final["step known-fact filter"]["status"] == "reused"
    assert final["step known-fact filter"]["done"] == final["step known-fact filter"]["total"] == 80
    assert final["drift drift"]["status"] in ("done", "reused")
    # stages computed in an earlier test are reused: no counts, status "reused"
    for key in ("train aligned", "train perturbed", "probe base", "probe aligned", "probe perturbed"):
        assert final[key]["status"] == "reused", final[key]
    steps = math.ceil(4 / cfg.recover.batch_size) * cfg.recover.epochs
    assert final["train recovered/in_task/4"].pop("seconds") > 0  # the stage's own time, shown at its end
    assert final["train recovered/in_task/4"] == {
        "kind": "train", "name": "recovered/in_task/4", "status": "done", "done": steps, "total": steps,
        "unit": "steps"}
    items = 2 * cfg.data.n_eval + cfg.data.n_perturb_eval
    assert final["probe recovered/in_task/4"]["done"] == final["probe recovered/in_task/4"]["total"] == items
    # the bars only move forward
    seen = [s["train recovered/in_task/4"]["done"] for s in snapshots]
    assert seen == sorted(seen)
