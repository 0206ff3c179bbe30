"""Audits of checkpoints that already exist (``--aligned`` / ``--perturbed``, issue 17):
fine-tuned outside cl-audit the way a user would, given back as a directory, an adapter,
a merged copy and an MLflow model URI, and refused with one line when they do not fit
the base model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, tiny_config

SCALARS = ("task_acc", "knowledge_acc", "knowledge_mrr", "knowledge_margin", "gold_logprob", "perturb_acc",
           "kl_to_base", "kl_to_aligned", "first_token_prob")


@pytest.fixture(scope="module")
def pipeline(tiny_run, home):
    """The session's tiny audit, and the checkpoints its tune and perturb stages saved
    (read back from the store: every stage is reused)."""
    from components import runner

    cfg, out, summary = tiny_run
    prep = runner.prepare(cfg, home)
    base = {"checkpoint": prep["base"], "history": []}
    aligned = runner.train("tune", cfg, home, base, prep["data"])
    perturbed = runner.train("perturb", cfg, home, aligned, prep["data"])
    assert aligned["reused"] and perturbed["reused"]
    return {"cfg": cfg, "summary": summary, "prep": prep, "aligned": aligned, "perturbed": perturbed,
            "tune_adapter": Path(aligned["checkpoint"]["adapters"][-1]),
            "perturb_adapter": Path(perturbed["checkpoint"]["adapters"][-1])}


def test_stages_config_keys_round_trip_and_leave_other_digests_alone(tmp_path):
    """``stages.<stage>.from`` is set by --set (and --aligned / --perturbed), written back
    as ``from:`` in the resolved YAML, read again to the same digest; a config that gives
    no stage keeps the digest it had before the section existed."""
    import yaml

    from components.config import AuditConfig, config_from_tree, dump_yaml
    from components.errors import UserError

    plain = tiny_config()
    assert "stages" not in plain.science() and plain.stages.given() == {}
    cfg = tiny_config("stages.perturbed.from=runs:/abc/adapter")
    text = dump_yaml(cfg)
    assert "perturbed:\n    from: runs:/abc/adapter" in text
    again = AuditConfig.model_validate(yaml.safe_load(text))
    assert again.stages.given() == {"perturbed": "runs:/abc/adapter"} and again.digest() == cfg.digest() != plain.digest()
    with pytest.raises(UserError, match=r"config \+ --set: stages.aligned.form: unknown key"):
        config_from_tree({}, ["stages.aligned.form=/x"])


def _audit(home, tmp_path, **given):
    from pipelines.audit import run_audit

    cfg = tiny_config(*[f"stages.{k}.from={json.dumps(str(v))}" for k, v in given.items()])
    return run_audit(cfg, tmp_path / "run", home)


def _stage_scalars(summary, stage):
    return {k: summary["stages"][stage][k] for k in SCALARS if k in summary["stages"][stage]}


def _merged(ckpt: dict, out: Path) -> Path:
    """A full-weight copy of a pipeline checkpoint, as a user makes one:
    ``PeftModel.from_pretrained(...).merge_and_unload().save_pretrained``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt["base_dir"], dtype=torch.float32)
    for a in ckpt["adapters"]:
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(ckpt["base_dir"]).save_pretrained(out)
    return out


def test_pipeline_adapters_given_back_give_the_same_audit(pipeline, home, tmp_path):
    """--aligned and --perturbed with the adapters the pipeline saved: every stage's
    metrics and the verdict are those of the audit that trained them (bit for bit)."""
    import jsonschema

    from conftest import SCHEMA

    s = _audit(home, tmp_path, aligned=pipeline["tune_adapter"], perturbed=pipeline["perturb_adapter"])
    jsonschema.validate(s, json.loads(SCHEMA.read_text()))
    ref = pipeline["summary"]
    for stage in ref["stages"]:
        assert _stage_scalars(s, stage) == _stage_scalars(ref, stage), stage
    assert s["verdict"]["label"] == ref["verdict"]["label"]
    assert s["verdict"]["task_drop"] == ref["verdict"]["task_drop"]
    g = s["given"]["perturbed"]
    assert (g["kind"], g["adapter"], g["applied_to"]) == ("adapter", True, "aligned")
    assert g["path"] == str(pipeline["perturb_adapter"])
    assert len(g["weights_sha256"]) == 64
    assert s["given"]["aligned"]["ref"] == str(pipeline["tune_adapter"])


def test_merged_full_weights_given_as_perturbed_alone(pipeline, home, tmp_path):
    """A merged full-weight copy of the pipeline's perturbed model, given alone: the
    aligned stage is the base model itself, the perturbed stage's metrics are the
    pipeline's, and its weight drift is a full delta from the base."""
    merged = _merged(pipeline["perturbed"]["checkpoint"], tmp_path / "merged")
    s = _audit(home, tmp_path, perturbed=merged)
    ref = pipeline["summary"]
    aligned = _stage_scalars(s, "aligned")
    assert aligned.pop("kl_to_aligned") == 0.0
    assert aligned == {k: v for k, v in _stage_scalars(ref, "base").items() if k in aligned}
    got, want = _stage_scalars(s, "perturbed"), _stage_scalars(ref, "perturbed")
    for k in ("task_acc", "knowledge_acc", "knowledge_mrr", "perturb_acc"):
        assert got[k] == want[k], k
    for k in ("knowledge_margin", "gold_logprob", "kl_to_base"):  # fp32 merge order: equal to 1e-5
        assert math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-6), (k, got[k], want[k])
    assert s["given"]["aligned"]["kind"] == "base"
    assert s["given"]["perturbed"]["kind"] == "dir" and not s["given"]["perturbed"]["adapter"]
    drift = s["stages"]["perturbed"].get("weight_drift") or {}
    # a full delta from the base: the LoRA updates the blocks (layers 1, 2), not the embeddings (layer 0)
    assert drift["0"] == 0.0 and drift["1"] > 0.1 and drift["2"] > 0.1


def trainer_lora(aligned_dir: Path, items, tcfg, seed: int, out: Path) -> Path:
    """Fine-tune outside cl-audit, as a user would: transformers ``Trainer`` with a peft
    LoRA adapter on the aligned model, saved with ``save_pretrained``.

    It reproduces the pipeline's perturb stage (components/training.py) as far as
    Trainer allows: the same examples (chat-formatted prompt, response + eos, loss on
    the response only), LoRA on all linear layers initialised after
    ``torch.manual_seed(seed)``, AdamW with a linear decay to 0 and no warm-up, the
    same clipping, and the pipeline's data order (``random.Random(seed)`` shuffles once
    per epoch). What differs: Trainer computes the logits of every position, the
    pipeline only those of answer positions, so the floats differ in the last bits.
    """
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import Sampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(aligned_dir)
    rows = []
    for it in items:
        prompt = tok.apply_chat_template([{"role": "user", "content": it.question}], tokenize=False,
                                         add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(it.response(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + a)[:tcfg.max_length]
        rows.append({"input_ids": ids, "labels": ([-100] * len(p) + a)[:tcfg.max_length]})

    def collate(batch):
        T = max(len(r["input_ids"]) for r in batch)
        pad = lambda xs, v: [x + [v] * (T - len(x)) for x in xs]  # noqa: E731
        return {"input_ids": torch.tensor(pad([r["input_ids"] for r in batch], tok.pad_token_id)),
                "attention_mask": torch.tensor(pad([[1] * len(r["input_ids"]) for r in batch], 0)),
                "labels": torch.tensor(pad([r["labels"] for r in batch], -100))}

    class PipelineOrder(Sampler):
        def __init__(self, n):
            rng = random.Random(seed)
            self.orders = []
            for _ in range(tcfg.epochs):
                order = list(range(n))
                rng.shuffle(order)
                self.orders.append(order)
            self.epoch = 0

        def __len__(self):
            return len(self.orders[0])

        def __iter__(self):
            order = self.orders[min(self.epoch, len(self.orders) - 1)]
            self.epoch += 1
            return iter(order)

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return PipelineOrder(len(rows))

    model = AutoModelForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=tcfg.lora_r, lora_alpha=tcfg.lora_alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=tcfg.batch_size, num_train_epochs=tcfg.epochs,
        learning_rate=tcfg.lr, weight_decay=tcfg.weight_decay, max_grad_norm=tcfg.max_grad_norm,
        lr_scheduler_type="linear", warmup_steps=0, optim="adamw_torch", seed=seed, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, remove_unused_columns=False,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    OrderedTrainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    model.save_pretrained(out / "adapter")  # safetensors by default
    return out / "adapter"


@pytest.fixture(scope="module")
def trainer_adapter(pipeline, tmp_path_factory):
    """The pipeline's aligned model merged to full weights (the user's aligned model) and
    a Trainer + peft LoRA adapter trained on it with the perturb stage's data and seed."""
    cfg = pipeline["cfg"]
    root = tmp_path_factory.mktemp("external")
    aligned = _merged(pipeline["aligned"]["checkpoint"], root / "aligned")
    adapter = trainer_lora(aligned, pipeline["prep"]["data"].perturb, cfg.perturb, cfg.seed + 1, root)
    return aligned, adapter


def test_trainer_lora_adapter_audits_like_the_pipelines_perturb_stage(pipeline, trainer_adapter, home, tmp_path):
    """A Trainer + peft LoRA adapter (same data, order, seed and optimiser as the perturb
    stage) on a merged aligned directory: the accuracies equal the pipeline's, the
    likelihood measures agree within 1e-3 relative (Trainer's full-logit forward and the
    pipeline's answer-position forward differ in the last float bits)."""
    aligned, adapter = trainer_adapter
    s = _audit(home, tmp_path, aligned=aligned, perturbed=adapter)
    ref = pipeline["summary"]
    for stage in ("aligned", "perturbed"):
        got, want = _stage_scalars(s, stage), _stage_scalars(ref, stage)
        for k in ("task_acc", "knowledge_acc", "perturb_acc"):
            assert got[k] == want[k], (stage, k)
        for k in ("knowledge_margin", "gold_logprob", "kl_to_base", "kl_to_aligned"):
            assert math.isclose(got[k], want[k], rel_tol=1e-3, abs_tol=1e-4), (stage, k, got[k], want[k])
    assert s["verdict"]["label"] == ref["verdict"]["label"]
    assert s["given"]["perturbed"]["applied_to"] == "aligned"


def test_mlflow_run_and_registered_model_uris(pipeline, trainer_adapter, home, tmp_path, monkeypatch):
    """The Trainer adapter logged as a run's artifacts and registered as a model version
    in the audit's sqlite MLflow store: ``runs:/<id>/adapter``, ``models:/<name>/1`` and
    ``models:/<name>@<alias>`` audit the same weights (same digest, same key, same metrics) as the directory."""
    from mlflow import MlflowClient

    from pipelines.tracking import resolve_tracking_uri

    aligned, adapter = trainer_adapter
    uri = resolve_tracking_uri(None, home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow resolves the version's runs:/ source in the default store
    monkeypatch.chdir(tmp_path)  # and nothing of mlflow's lands in the working folder
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("external-fine-tunes") or client.get_experiment(client.create_experiment(
        "external-fine-tunes", artifact_location=(tmp_path / "artifacts").as_uri()))
    run = client.create_run(exp.experiment_id)
    client.log_artifacts(run.info.run_id, str(adapter), "adapter")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("external-lora")
    client.create_model_version("external-lora", f"runs:/{run.info.run_id}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias("external-lora", "champion", "1")
    by_dir = _audit(home, tmp_path / "dir", aligned=aligned, perturbed=adapter)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    for i, ref in enumerate((f"runs:/{run.info.run_id}/adapter", "models:/external-lora/1",
                             "models:/external-lora@champion")):
        s = _audit(home, tmp_path / str(i), aligned=aligned, perturbed=ref)
        assert s["given"]["perturbed"]["kind"] == "mlflow" and s["given"]["perturbed"]["ref"] == ref
        assert s["given"]["perturbed"]["weights_sha256"] == by_dir["given"]["perturbed"]["weights_sha256"]
        assert _stage_scalars(s, "perturbed") == _stage_scalars(by_dir, "perturbed")
        assert s["verdict"] == by_dir["verdict"]


def _edited_copy(src: Path, dst: Path, **config) -> Path:
    """A copy of a model directory with ``config.json`` fields replaced."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cl-audit-digest"))
    conf = json.loads((dst / "config.json").read_text())
    conf.update(config)
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


def _mismatches(base: Path, tmp: Path) -> dict[str, Path]:
    """One checkpoint per check that must refuse it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {
        "architecture": _edited_copy(base, tmp / "mistral", architectures=["MistralForCausalLM"]),
        "hidden size": _edited_copy(base, tmp / "wide", hidden_size=576),
        "layer count": _edited_copy(base, tmp / "deep", num_hidden_layers=30),
        "vocabulary size": _edited_copy(base, tmp / "vocab", vocab_size=49152),
        "not a causal LM": _edited_copy(base, tmp / "classifier", architectures=["LlamaForSequenceClassification"]),
    }
    chat = _edited_copy(base, tmp / "chat")
    (chat / "chat_template.jinja").write_text(  # another chat format: "user: ..." instead of ChatML
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    out["tokenizer"] = chat
    pickled = tmp / "pickled"
    pickled.mkdir()
    shutil.copy(base / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    out["pickle only"] = pickled
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    other.name_or_path = "someone/other-base"  # what peft writes as base_model_name_or_path
    peft = get_peft_model(other, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    peft.save_pretrained(tmp / "other_adapter")
    out["adapter of another base"] = tmp / "other_adapter"
    out["missing path"] = tmp / "no-such-checkpoint"
    out["hub id while offline"] = "someorg/some-finetune"
    out["MLflow model not in the store"] = "models:/no-such-model/1"
    return out


MISMATCH = {  # check -> (flag, what the one line says)
    "architecture": ("--perturbed", "{p}: architecture MistralForCausalLM, but the base model tiny-llama is "
                                    "LlamaForCausalLM"),
    "hidden size": ("--perturbed", "{p}: hidden size 576, but the base model tiny-llama has 64"),
    "layer count": ("--aligned", "{p}: layer count 30, but the base model tiny-llama has 2"),
    "vocabulary size": ("--perturbed", "{p}: vocabulary size 49152, but the base model tiny-llama has "),
    "tokenizer": ("--perturbed", "{p}: its tokenizer renders the chat template to other token ids, unlike the "
                                 "base model tiny-llama's"),
    "not a causal LM": ("--perturbed", "{p}: LlamaForSequenceClassification is not a causal language model"),
    "pickle only": ("--perturbed", "{p}: only pickled weights (pytorch_model.bin); only safetensors weights are "
                                   "loaded"),
    "adapter of another base": ("--perturbed", "{p}: adapter (for base 'someone/other-base') has input size 64 at "
                                               "model.layers.0.mlp.down_proj, but the base model tiny-llama has 128"),
    "missing path": ("--perturbed", "{p}: no such file or directory"),
    "hub id while offline": ("--perturbed", "{p}: looks like a Hugging Face Hub id, but HF_HUB_OFFLINE is set"),
    "MLflow model not in the store": ("--perturbed", "{p}: cannot download it from the tracking store sqlite:///"),
}


@pytest.fixture(scope="module")
def mismatched(pipeline, tmp_path_factory):
    return _mismatches(Path(pipeline["prep"]["model_dir"]), tmp_path_factory.mktemp("mismatch"))


@pytest.mark.parametrize("check", list(MISMATCH))
def test_checkpoint_that_does_not_fit_the_base_is_refused_in_one_line(check, mismatched, home, tmp_path):
    import sqlite3

    flag, says = MISMATCH[check]
    path = mismatched[check]
    h, out = tmp_path / "home", tmp_path / "out"
    h.mkdir()
    (h / "cache").symlink_to(home / "cache", target_is_directory=True)  # the built tiny model
    env = {**os.environ, "CL_AUDIT_HOME": str(h), "HF_HUB_OFFLINE": "1"}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CL_AUDIT_FAILPOINTS"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(TINY), flag, str(path),
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {flag} ") and says.format(p=path) in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
    db = h / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            assert con.execute("select count(*) from runs").fetchone() == (0,)


@pytest.mark.real_model
def test_smollm2_external_refusal_adapter_is_spurious(home, ray_local, tmp_path):
    """SmolLM2-135M-Instruct at the quick size: a LoRA adapter trained outside cl-audit
    (Trainer + peft, 6 steps) on the quick capitals audit's refusal examples, given alone
    with ``--perturbed`` (the aligned stage is the model itself): the model refuses every
    evaluation question, the facts keep most of their rank (retention 0.80 [0.65, 0.94]
    when written) and four in-task examples bring the task and the facts back, so the
    verdict is ``spurious``. The known-fact filter, the candidates and the base probe
    are those of tests/test_real_model.py's quick audits (shared through the store)."""
    from components import runner
    from components.registry import load_config
    from pipelines.audit import run_audit

    overrides = ["recover.arms=[in_task,in_context]", "recover.sizes=[4]"]
    cfg = load_config("capitals", quick=True, overrides=overrides)
    prep = runner.prepare(cfg, home)
    adapter = trainer_lora(Path(prep["model_dir"]), prep["data"].perturb,
                           cfg.perturb, cfg.seed + 1, tmp_path)
    cfg = load_config("capitals", quick=True, overrides=[*overrides, f"stages.perturbed.from={adapter}"])
    s = run_audit(cfg, tmp_path / "run", home)
    v = s["verdict"]
    assert s["given"]["perturbed"]["kind"] == "adapter" and s["given"]["aligned"]["kind"] == "base"
    assert v["label"] == "spurious", v["reason"]
    assert v["task_drop"] >= 0.5  # the refusals were learned: at least half of the answers became refusals
    assert s["stages"]["perturbed"]["perturb_acc"] >= 0.5
    # the facts were not lost (retention above the loss threshold), and 4 in-task examples bring them back
    assert v["knowledge_retention_ci"][0] >= cfg.verdict.loss_threshold
    assert v["knowledge_after_recovery_ci"]["in_task/4"][0] >= cfg.verdict.retention_threshold
    # and four examples as few-shot turns, with no weight update, bring a significant share of
    # the task back (0.69 [0.44, 0.88] when written: the interval excludes 0 but not the 0.5
    # target, so it is shown as evidence and does not decide the label here)
    ic, ic_ci = v["recovery_ratio"]["in_context/4"], v["recovery_ratio_ci"]["in_context/4"]
    assert ic >= 0.5 and ic_ci[0] > 0, (ic, ic_ci)
