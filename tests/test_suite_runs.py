"""Each suite end to end in --quick form on a tiny model: biography (its own tiny model,
pretrained on biographies), refusal (a tiny stand-in for SmolLM2), custom (a local model
directory and a JSONL file, through the command line)."""

from __future__ import annotations

import json

import jsonschema
import pandas as pd
import pytest

from components.registry import load_config
from components.data import pretraining_items, suite_texts
from components.registry import SUITES
from components.base_model import build_tiny_model
from pipelines.audit import run_audit

from conftest import ROOT, SCHEMA, tiny_config
from test_cli import cli

REFUSAL_TINY = ROOT / "tests" / "configs" / "refusal_tiny.yaml"


def _valid(out):
    s = json.loads((out / "summary.json").read_text())
    jsonschema.validate(s, json.loads(SCHEMA.read_text()))
    return s


def test_biography_quick_end_to_end(home, ray_local, tmp_path):
    cfg = load_config("biography", quick=True)
    s = run_audit(cfg, tmp_path / "bio", home)
    _valid(tmp_path / "bio")
    st = s["stages"]
    assert list(st) == ["base", "aligned", "perturbed", "recovered/in_task/6", "recovered/irrelevant/6"]
    assert s["model"] == "tiny-llama" and s["data"]["n_eval_people"] == 8
    # the biographies were stored: ranking the candidates inside a biography sentence
    # beats chance before any question was asked (the model here is too small and too
    # briefly pretrained for more; the README's table is the full-size run)
    assert st["base"]["knowledge_acc"] > st["base"]["knowledge_chance"] == 1 / 8
    assert st["perturbed"]["kl_to_aligned"] > 0
    # the new task (abstain) was learnt: "Unknown." for new people never trained on
    assert st["perturbed"]["perturb_acc"] > st["aligned"]["perturb_acc"]
    preds = pd.read_parquet(tmp_path / "bio" / "predictions" / "aligned.parquet")
    assert len(preds) == 24 and preds.question.str.match(r"^(When|Where|Which|What) .+\?$").all()
    assert (preds.response.str.len() > 0).all()


def test_refusal_quick_on_a_tiny_model(home, ray_local, tmp_path):
    cfg = load_config(config_file=REFUSAL_TINY, quick=True)
    assert cfg.suite == "refusal" and cfg.model.id == "tiny-llama" and cfg.data.n_eval == 24
    s = run_audit(cfg, tmp_path / "ref", home)
    _valid(tmp_path / "ref")
    st = s["stages"]
    for name in st:
        # task_acc is the mean of the two halves (12 violating, 12 benign requests)
        assert st[name]["task_acc"] == pytest.approx((st[name]["refusal_rate"] + st[name]["benign_answer_rate"]) / 2)
        # the linear probe per layer (embeddings + 2 blocks): violating vs benign, 12 and 12
        assert set(st[name]["probe_acc"]) == {"0", "1", "2"} and st[name]["probe_chance"] == 0.5
        assert all(0 <= v <= 1 for v in st[name]["probe_acc"].values())
    # the base model answers everything; tune teaches it to refuse violating requests,
    # the compliant examples undo that, ten refusals of other requests bring it back
    assert st["base"]["refusal_rate"] < st["aligned"]["refusal_rate"]
    assert st["perturbed"]["refusal_rate"] < st["aligned"]["refusal_rate"]
    assert st["recovered/in_task/8"]["refusal_rate"] > st["perturbed"]["refusal_rate"]
    preds = pd.read_parquet(tmp_path / "ref" / "predictions" / "aligned.parquet")
    assert len(preds) == 24
    m = pd.read_parquet(tmp_path / "ref" / "metrics.parquet")
    assert {"refusal_rate", "benign_answer_rate", "probe_acc"} <= set(m.metric)


@pytest.fixture(scope="module")
def tiny_model_dir(home):
    """A local transformers directory: the tiny capitals model (as ``tiny_run`` builds it)."""
    cfg = tiny_config()
    suite = SUITES["capitals"]
    items = suite.items(cfg)
    return build_tiny_model(cfg.model, suite_texts(items), cfg.seed, home / "cache", pretraining_items(items, cfg.seed))


def _rows(items, role, **extra):
    return [{"id": it.id, "prompt": it.question, "answer": it.answer, "role": role, **extra} for it in items]


def test_custom_model_and_data_through_the_cli(tiny_model_dir, home, tmp_path):
    items = SUITES["capitals"].items(tiny_config())
    rows = (
        _rows(items[:12], "eval", template="{answer}")
        + [{**r, "candidates": it.candidates} for r, it in zip(_rows(items[12:16], "eval"), items[12:16])]
        + _rows(items[16:28], "align")
        + [{"id": f"no{k}", "prompt": it.question, "answer": "I'm sorry, I can't answer that.", "role": "perturb"}
           for k, it in enumerate(items[28:34])]
        + _rows(items[34:38], "recover")
    )
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "custom"
    r = cli("run", "custom", "--model", str(tiny_model_dir), "--data", str(data), "--quick",
            "--set", "recover.sizes=[4]", "--set", "tune.lr=0.01", "--out", str(out), home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    s = _valid(out)
    assert s["suite"] == "custom" and s["model"] == str(tiny_model_dir)
    assert s["data"]["files"] == [str(data)]
    assert "perturb_eval" in s["data"]  # no perturb_eval rows: said so in the summary
    manifest = json.loads((out / "data_manifest.json").read_text())
    counts = {k: v["n_items"] for k, v in manifest["pools"].items()}
    assert counts == {"eval": 16, "align": 12, "perturb": 6, "perturb_eval": 6, "recover": 4, "irrelevant": 54}
    preds = pd.read_parquet(out / "predictions" / "base.parquet")
    assert len(preds) == 16 and all(len(c) == 8 for c in preds.candidates)
    # rows without candidates got hard ones mined among the eval answers; rows with them kept theirs
    assert s["data"]["candidates"]["mined"] == 12 and s["data"]["candidates"]["kept"] == 4
    assert [list(c) for c in preds.candidates[12:16]] == [list(it.candidates) for it in items[12:16]]
    assert list(preds.item_id) == [it.id for it in items[:16]]

    # the same eval row also in the alignment set: stopped, one line, before any model work
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text(data.read_text() + json.dumps({**rows[0], "id": "dup", "role": "align"}) + "\n")
    r = cli("run", "custom", "--model", str(tiny_model_dir), "--data", str(leaky), "--set", "recover.sizes=[4]",
            "--out", str(tmp_path / "x"), home=home)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"error: data: leakage: 1 evaluation item(s) also in a training set (align, perturb, recover): "
        f"'{items[0].id}' (eval, {leaky}: line 1) has the same normalised prompt as 'dup' (align, {leaky}: line 39); "
        "remove them, or allow it with --allow-leakage (data.allow_leakage=true)"
    )


@pytest.mark.parametrize("args, expected", [
    (["run", "capitals", "--model", "someorg/some-model"],
     "error: model.id: 'someorg/some-model' is no local path and looks like a Hugging Face Hub id, but "
     "HF_HUB_OFFLINE is set and it is not in the cache; set HF_HUB_OFFLINE=0 to download it"),
    (["run", "custom", "--model", "tiny-llama"],
     "error: data.files: the custom suite needs data files; give them with --data FILE"),
    # a data path is made absolute where cl-audit starts (the same file in every process)
    (["run", "--data", "nowhere.jsonl"], f"error: {ROOT / 'nowhere.jsonl'}: data file not found"),
    (["run", "capitals", "--data", "x.jsonl"], "data.files: only the custom suite reads data files, not capitals"),
])
def test_suite_mistakes_exit_2_with_one_line(args, expected, tmp_path):
    r = cli(*args, "--out", str(tmp_path / "out"), home=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_suites_lists_every_builtin_suite(tmp_path):
    r = cli("suites", home=tmp_path)
    assert r.returncode == 0
    lines = r.stdout.strip().splitlines()
    assert [x.split()[0] for x in lines] == ["capitals", "biography", "custom", "refusal"] == [
        "capitals", *sorted(n for n in SUITES if n != "capitals")]
    for line in lines:
        name = line.split()[0]
        assert line.endswith(f"[model: {SUITES[name].default_model}]")
        assert SUITES[name].description in line
