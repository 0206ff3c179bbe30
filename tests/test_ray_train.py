"""Training stages on Ray Train: 1 vs 2 workers, one record per stage, restart after a killed worker.

Real Ray (local, 2 CPUs), real DDP over gloo, the tiny model. One audit runs its tune
stage on 2 workers (one CPU each, so it fits the 2-core CI machine) and has worker rank
1 killed mid-stage; the tests read that one audit from three sides.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from components.config import ScalingSection, TrainConfig
from components.errors import TrainingDiverged, UserError
from components.models import Checkpoint
from components.training import EpochEnd, TrainSpec, autocast_for, load_train_state, run_spec
from components.tune import tune_spec
from pipelines.audit import run_audit
from components.runner import prepare
from pipelines.dag import check_scaling
from pipelines.train_ray import TEST_FAULT_ENV, check_fits, fit_stage

from conftest import tiny_config

# Per-step loss of 2 DDP workers vs one process, same global batch: float32 noise only.
LOSS_TOL = 5e-5
STAGES = ["base", "aligned", "perturbed", "recovered/in_task/4"]


def _fresh_home(home: Path, tmp_path_factory, name: str) -> Path:
    """A run folder with its own store and MLflow db, sharing the session's model cache."""
    h = tmp_path_factory.mktemp(name)
    (home / "cache").mkdir(exist_ok=True)
    (h / "cache").symlink_to(home / "cache")
    return h


@pytest.fixture(scope="module")
def prep(home, tmp_path_factory):
    """The tiny base model and the data pools (in-process, in the session's store)."""
    return prepare(tiny_config(), home)


@pytest.fixture(scope="module")
def ray_audit(home, ray_local, prep, tmp_path_factory):
    """The tiny audit with the tune stage on 2 Ray Train workers (CPU), in its own store;
    worker rank 1 is killed mid-stage (after step 5 of 8, in epoch 2 of 4), once."""
    h = _fresh_home(home, tmp_path_factory, "rayhome")
    cfg = tiny_config("tune.scaling.num_workers=2", "recover.arms=[in_task]")
    out = tmp_path_factory.mktemp("rayrun")
    marker = h / "killed-once"
    os.environ[TEST_FAULT_ENV] = f"1:5:{marker}"
    try:
        summary = run_audit(cfg, out, h)
    finally:
        del os.environ[TEST_FAULT_ENV]
    return cfg, h, summary, prep, marker


def _stage_dirs(h: Path, kind: str) -> list[Path]:
    return sorted(d for d in (h / "store").iterdir() if d.name.startswith(f"{kind}-"))


def _tune_result(h: Path) -> dict:
    (d,) = _stage_dirs(h, "tune")
    return json.loads((d / "result.json").read_text())


def test_two_workers_follow_the_one_worker_loss(ray_audit, tmp_path):
    """Same global batch (8): 2 DDP workers (4 sequences each; steps 4-7 after the
    restart) follow the in-process run's loss step by step."""
    cfg, h, _, prep, _ = ray_audit
    two = _tune_result(h)
    assert two["train_run"]["num_workers"] == 2
    base = Checkpoint(**prep["base"])
    spec1 = tune_spec(tiny_config("recover.arms=[in_task]"), base, prep["data"])
    assert spec1.cfg.scaling.num_workers == 0 and spec1.cfg.batch_size == cfg.tune.batch_size == 8
    one = fit_stage(spec1, tmp_path / "one", tmp_path / "ray_train", "one-worker")  # Train V2 local mode
    l1 = [r["loss"] for r in one.history]
    l2 = [r["loss"] for r in two["history"]]
    print("\nloss 1 worker :", [round(x, 6) for x in l1])
    print("loss 2 workers:", [round(x, 6) for x in l2])
    print("max |diff|    :", max(abs(a - b) for a, b in zip(l1, l2)))
    assert len(l1) == len(l2) == 8  # 16 items, global batch 8, 4 epochs
    assert [r["tokens"] for r in one.history] == [r["tokens"] for r in two["history"]]
    for a, b in zip(l1, l2):
        assert b == pytest.approx(a, abs=LOSS_TOL)
    assert max(l1[-3:]) < l1[1]  # and it is training: the loss comes down
    # the weights agree too: the two adapters differ by float noise only
    w1 = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(Path(two["checkpoint"]["adapters"][-1]) / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    # (Adam divides each update by the gradient's running RMS, so rounding differences of
    # two shards' matrix products reach ~1e-4 in weights of magnitude ~0.15 in 8 steps)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 5e-4
    # the tolerance is tight: a different global batch (4) moves the curve far more
    spec4 = TrainSpec(spec1.name, base, spec1.items, spec1.cfg.model_copy(update={"batch_size": 4}), spec1.seed)
    l4 = [r["loss"] for r in fit_stage(spec4, tmp_path / "four", tmp_path / "ray_train", "batch4").history]
    assert max(abs(a - b) for a, b in zip(l1, l4)) > 100 * LOSS_TOL


def test_one_mlflow_run_and_one_artifact_set(ray_audit):
    cfg, h, s, _, _ = ray_audit
    client = MlflowClient(s["mlflow"]["tracking_uri"])
    runs = client.search_runs([s["mlflow"]["experiment_id"]])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [s["mlflow"]["run_id"]]
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == s["mlflow"]["run_id"])
    assert children == sorted(STAGES)  # one nested run per checkpoint, not one per worker
    aligned = next(r for r in runs if r.info.run_name == "aligned")
    assert aligned.data.params["scaling.num_workers"] == "2"
    loss = client.get_metric_history(aligned.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == list(range(8))
    assert {f.path for f in client.list_artifacts(aligned.info.run_id, "adapter")} >= {
        "adapter/adapter_model.safetensors"}
    # one stored artifact set for the tune stage: the final checkpoint's weights, no
    # per-worker copies, no optimiser state, and Ray Train's run folder is gone
    (tune_dir,) = _stage_dirs(h, "tune")
    assert [p.relative_to(tune_dir).as_posix() for p in tune_dir.rglob("*.safetensors")] == [
        "adapter/adapter_model.safetensors"]
    assert not list((h / "store").rglob("optimizer.safetensors"))
    assert not any((h / "ray_train").iterdir())
    assert s["stages"]["aligned"]["task_acc"] >= 0.5  # the 2-worker aligned model answers


def test_killed_worker_restarts_from_last_checkpoint(ray_audit):
    """The audit's tune stage lost worker rank 1 after step 5; Ray Train restarted the
    worker group, which resumed from the checkpoint of epoch 1 (after step 3)."""
    _, h, s, _, marker = ray_audit
    assert marker.exists()  # the worker was killed
    r = _tune_result(h)
    assert r["train_run"]["resumed_at"] == [4]
    assert [x["step"] for x in r["history"]] == list(range(8))
    assert not any((h / "ray_train").iterdir())  # the run folder went once the stage was stored
    # the stage completed and the audit went on from its output
    assert Path(r["checkpoint"]["adapters"][-1], "adapter_model.safetensors").exists()
    assert set(s["stages"]) == set(STAGES)
    # steps 4-7 ran after the restart: that they follow the 1-worker curve
    # (test_two_workers_follow_the_one_worker_loss) shows weights, AdamW moments,
    # schedule and data order were all restored


def test_resume_from_saved_state_continues_the_same_run(prep, tmp_path):
    """Without Ray: stop after epoch 1, resume from the saved files, same curve and weights."""
    spec = tune_spec(tiny_config(), Checkpoint(**prep["base"]), prep["data"])
    saved = {}

    def keep(ev: EpochEnd) -> None:
        if ev.epoch == 1:
            ev.save(tmp_path / "ep1")
            saved["hist"] = ev.history

    full_model, full = run_spec(spec, on_epoch_end=keep)
    files = sorted(p.relative_to(tmp_path / "ep1").as_posix() for p in (tmp_path / "ep1").rglob("*") if p.is_file())
    assert "train_state/optimizer.safetensors" in files and "adapter/adapter_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # no pickle
    state = load_train_state(tmp_path / "ep1")
    assert (state["epoch"], state["step"]) == (1, 4) and state["history"] == saved["hist"]
    model, resumed = run_spec(spec, resume=state)
    assert [x["step"] for x in resumed] == list(range(8))
    assert resumed[:4] == full[:4]
    for a, b in zip(full[4:], resumed[4:]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.allclose(full_model(ids).logits, model(ids).logits, atol=1e-5)


def test_diverged_stage_raises_and_writes_nothing(prep, ray_local, tmp_path):
    base = Checkpoint(**prep["base"])
    bad = TrainConfig(epochs=20, lr=1e30, max_grad_norm=1e30, batch_size=8, lora_r=8)
    spec = TrainSpec("aligned", base, prep["data"].align, bad, 0)
    with pytest.raises(TrainingDiverged, match="loss became"):
        fit_stage(spec, tmp_path / "out", tmp_path / "ray_train", "diverge")
    assert not (tmp_path / "out").exists()


def test_scaling_config_checks(ray_local):
    # the worker count is not part of what a stage produces: not in its store key
    assert tiny_config("tune.scaling.num_workers=4").tune.result_fields() == tiny_config().tune.result_fields()
    with pytest.raises(UserError, match=r"tune\.scaling\.num_workers"):
        tiny_config("tune.scaling.num_workers=-1")
    with pytest.raises(UserError, match=r"perturb\.scaling: 1000 workers x 1 CPU need 1000 CPU"):
        check_scaling(tiny_config("perturb.scaling.num_workers=1000"))
    with pytest.raises(UserError, match=r"recover\.scaling: use_gpu with 1 GPU need 1 GPU, the Ray cluster has 0"):
        check_fits("recover", ScalingSection(use_gpu=True), {"CPU": 2.0})
    check_fits("tune", ScalingSection(num_workers=2, use_gpu=True), {"CPU": 2.0, "GPU": 2.0})  # fits: no error


def test_bf16_autocast_on_the_workers_device(prep, ray_local, tmp_path):
    """precision bf16 autocasts on the device Ray Train gives (here the CPU): the curve
    moves by bf16 rounding, not more."""
    amp = autocast_for("bf16", torch.device("cpu"))
    assert isinstance(amp, torch.autocast) and amp.fast_dtype == torch.bfloat16 and amp.device == "cpu"
    spec = tune_spec(tiny_config(), Checkpoint(**prep["base"]), prep["data"])
    fp32 = fit_stage(spec, tmp_path / "fp32", tmp_path / "ray_train", "fp32").history
    spec.precision = "bf16"
    bf16 = fit_stage(spec, tmp_path / "bf16", tmp_path / "ray_train", "bf16").history
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(fp32, bf16)]
    assert 0 < max(diffs) < 0.05, diffs  # seen: 0.016 (fp32 steps 0.02-0.20)
