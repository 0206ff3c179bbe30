"""The in_context recovery arm (issue 17) on the tiny model, stage by stage without Ray:
the n in-task recovery examples as few-shot turns before every question, no weight
update; its store key holds the examples; its task_acc is the perturbed model's with
those turns; the verdict reads its recovery ratio; a prompt longer than the model's
context stops the audit with one line. And the flipped items with their nearest
perturbation examples."""

from __future__ import annotations

import numpy as np
import pytest

from components import runner
from components.data import MATCHERS, Item
from components.errors import UserError
from components.models import Checkpoint, load_checkpoint, load_tokenizer
from components.recover import check_in_context_fits, context_length, few_shot_turns, with_context
from components.summary import assess, flipped_items

from conftest import tiny_config


@pytest.fixture(scope="module")
def stages(tiny_run, home):
    # the session's tiny audit (tiny_run) already stored prepare, tune, perturb and their
    # probes under the same keys: only the in_context stages and their probes run here
    cfg = tiny_config("recover.arms=[in_task,in_context]", "recover.sizes=[2,4]")
    prep = runner.prepare(cfg, home)
    data = prep["data"]
    base = {"checkpoint": prep["base"], "history": []}
    aligned = runner.train("tune", cfg, home, base, data)
    perturbed = runner.train("perturb", cfg, home, aligned, data)
    ic = {n: runner.train("recover", cfg, home, perturbed, data, "in_context", n) for n in (2, 4)}
    probes = {name: runner.probe(cfg, home, st, data) for name, st in
              [("base", base), ("aligned", aligned), ("perturbed", perturbed),
               ("recovered/in_context/2", ic[2]), ("recovered/in_context/4", ic[4])]}
    return cfg, prep, perturbed, ic, probes


def test_in_context_is_the_perturbed_checkpoint_with_few_shot_turns(stages, home):
    cfg, prep, perturbed, ic, probes = stages
    data = prep["data"]
    st = ic[4]
    assert st["history"] == [] and st["train_run"] == {"in_context": True}
    assert st["checkpoint"]["adapters"] == perturbed["checkpoint"]["adapters"]  # no weight update
    assert st["checkpoint"]["name"] == "recovered/in_context/4"
    shots = data.recover[:4]
    assert st["context"] == few_shot_turns(shots)
    assert [t["content"] for t in st["context"][:2]] == [shots[0].question, shots[0].response()]
    # the key holds the examples: n=2 and n=4 differ, and other examples give another key
    assert ic[2]["key"] != ic[4]["key"] and probes["recovered/in_context/2"]["key"] != probes["recovered/in_context/4"]["key"]
    other = type(data)(**{**data.__dict__, "recover": list(reversed(data.recover))})
    assert runner.train("recover", cfg, home, perturbed, other, "in_context", 4)["key"] != st["key"]
    again = runner.train("recover", cfg, home, perturbed, data, "in_context", 4)
    assert again["reused"] and again["key"] == st["key"]

    # its task_acc is the perturbed model's answers with the few-shot turns before each question
    from components.metrics import generate_answers

    model, tok = load_checkpoint(Checkpoint(**perturbed["checkpoint"]))
    answers = generate_answers(model, tok, with_context(data.eval, st["context"]), cfg.probe.batch_size,
                               cfg.probe.max_new_tokens)
    want = np.mean([MATCHERS[data.task_matcher](a, it.answer) for a, it in zip(answers, data.eval)])
    got = probes["recovered/in_context/4"]["metrics"]["task_acc"]["value"]
    assert got == pytest.approx(want)
    plain = probes["perturbed"]["metrics"]["task_acc"]["value"]
    print(f"\ntask_acc: aligned {probes['aligned']['metrics']['task_acc']['value']:.3f}, perturbed {plain:.3f}, "
          f"in_context/2 {probes['recovered/in_context/2']['metrics']['task_acc']['value']:.3f}, in_context/4 {got:.3f}")

    # the verdict reads it like a trained arm: (task_acc(in context) - perturbed) / task drop
    order = list(probes)
    a = assess(probes, order, cfg.verdict, n_boot=200, level=0.95, seed=0)
    al = probes["aligned"]["metrics"]["task_acc"]["value"]
    assert a["stages"]["recovered/in_context/4"]["task_acc"] == pytest.approx(got)
    if al != plain:
        assert a["verdict"]["recovery_ratio"]["in_context/4"] == pytest.approx((got - plain) / (al - plain))
    assert set(a["verdict"]["recovery_evidence"]) == {"in_context"}
    # the tiny model (2 blocks, 64 wide) learns no task from four few-shot turns: the
    # refusal it was trained on stays (task_acc 0 with and without them), which the verdict says
    assert plain == got == 0.0
    assert a["verdict"]["recovery_evidence"]["in_context"] == "not within n <= 4"


def test_a_prompt_longer_than_the_context_is_one_line(stages):
    cfg, prep, *_ = stages
    data = prep["data"]
    limit = context_length(prep["model_dir"])
    assert limit == 256  # the tiny model's max_position_embeddings
    tok = load_tokenizer(prep["model_dir"])
    need = check_in_context_fits(tok, limit, data, [2, 4], cfg.probe.max_new_tokens)
    assert need[2] < need[4] <= limit
    assert prep["data"].notes["in_context_tokens"] == {"context_length": 256, "2": need[2], "4": need[4]}
    with pytest.raises(UserError) as e:
        check_in_context_fits(tok, need[4] - 1, data, [2, 4], cfg.probe.max_new_tokens)
    assert str(e.value) == (
        f"recover.sizes: in_context with n=4 needs {need[4]} tokens (the 4 recovery examples as few-shot turns, the "
        f"longest question and probe.max_new_tokens=24), more than the model's context length {need[4] - 1} "
        "(config.json max_position_embeddings); lower the sizes or leave in_context out of recover.arms")


def test_flipped_items_name_their_nearest_perturbation_example():
    ev = [Item(id="e1", question="What is the capital of Peru?", answer="Lima"),
          Item(id="e2", question="What is the capital of Chile?", answer="Santiago"),
          Item(id="e3", question="Who wrote Hamlet?", answer="Shakespeare")]
    pert = [Item(id=f"p{k}", question=f"Tell me a fact number {k} about rivers.", answer="I cannot answer that.",
                 role="perturb") for k in range(50)]
    pert.insert(17, Item(id="dup", question="what is the capital of peru", answer="I cannot answer that.",
                         role="perturb"))
    pert.append(Item(id="chile", question="Name the capital of Chile.", answer="Santiago", role="perturb"))
    before = {"task_correct": [1, 1, 1], "knowledge_correct": [1, 1, 1]}
    after = {"task_correct": [0, 1, 1], "knowledge_correct": [1, 0, 1]}
    got = flipped_items(ev, pert, before, after)
    assert [(f["id"], f["task"], f["knowledge"]) for f in got] == [("e1", True, False), ("e2", False, True)]
    assert got[0]["nearest"][0]["id"] == "dup" and got[0]["nearest"][0]["score"] > 0.5
    assert got[0]["nearest"][0]["score"] > got[0]["nearest"][1]["score"]
    assert got[1]["nearest"][0]["id"] == "chile"
    assert all(len(f["nearest"]) == 3 for f in got)
    assert flipped_items(ev, pert, before, before) == []


def test_the_audit_lists_the_flipped_items(tiny_run):
    import pandas as pd

    _, out, s = tiny_run
    a, p = (pd.read_parquet(out / "predictions" / f"{n}.parquet") for n in ("aligned", "perturbed"))
    m = a.merge(p, on="item_id", suffixes=("_a", "_p"))
    flip = (m.task_correct_a & ~m.task_correct_p) | (m.knowledge_correct_a & ~m.knowledge_correct_p)
    assert [f["id"] for f in s["flipped"]] == list(m[flip].item_id) and len(s["flipped"]) > 0
    assert all(len(f["nearest"]) == 3 and f["nearest"][0]["score"] >= f["nearest"][1]["score"] >= f["nearest"][2]["score"]
               for f in s["flipped"])
    assert "flipped-nearest" in (out / "report.html").read_text()


def test_kubeflow_probe_step_keeps_the_few_shot_turns(stages, home, tmp_path):
    """A Kubeflow probe component reads the in_context stage from its checkpoint artifact
    (stage.json carries the turns) and gives the Ray probe's values, not the bare
    perturbed model's."""
    from pipelines.kubeflow_steps import export_checkpoint, import_checkpoint, probe_step

    cfg, prep, perturbed, ic, probes = stages
    st = ic[4]
    art = tmp_path / "ckpt"
    export_checkpoint(st["checkpoint"], art, {k: v for k, v in st.items() if k not in ("checkpoint", "dir")})
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    import json

    (data_dir / "data.json").write_text(json.dumps({"data": prep["data"].to_dict()}))
    assert import_checkpoint(art, tmp_path)["adapters"]  # the artifact holds the perturbed adapters
    got = probe_step(cfg.model_dump(mode="json", exclude_none=True), [], str(data_dir), str(tmp_path), str(art), str(tmp_path / "out"))
    assert got["key"] == probes["recovered/in_context/4"]["key"]
    assert got["metrics"] == probes["recovered/in_context/4"]["metrics"]


def test_the_in_context_logged_model_answers_with_its_few_shot_turns(stages, home, tmp_path, monkeypatch):
    """The audit logs the in_context checkpoint as a pyfunc model whose config holds the
    few-shot turns: loaded back, it answers the evaluation questions as the probe did
    with those turns (not as the bare perturbed model)."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow import MlflowClient

    from pipelines.audit import run_audit

    # the in_context arm alone: every stage is reused from the fixture's store, and no
    # in-task recovery is trained into the session's store (tests/test_progress_cli.py
    # counts on recovery with n=2 being new there)
    cfg = tiny_config("recover.arms=[in_context]", "recover.sizes=[2,4]")
    s = run_audit(cfg, tmp_path / "run", home)
    uri = s["mlflow"]["tracking_uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rid = s["mlflow"]["stage_run_ids"]["recovered/in_context/4"]
    (m,) = [m for m in MlflowClient(uri).search_logged_models([s["mlflow"]["experiment_id"]])
            if m.source_run_id == rid]
    pred = pd.read_parquet(tmp_path / "run" / "predictions" / "recovered" / "in_context" / "4.parquet")
    model = mlflow.pyfunc.load_model(f"models:/{m.model_id}")
    assert model.unwrap_python_model().conf["context"] == stages[3][4]["context"]
    assert model.predict(pred["question"].tolist()) == pred["response"].tolist()
