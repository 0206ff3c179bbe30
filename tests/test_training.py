"""The training loop on the tiny model: loss goes down, label masks, KL penalty, freezing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.data import split_items, suite_texts
from components.registry import SUITES
from components.errors import TrainingDiverged
from components.metrics import drift_kl, score_candidates
from components.base_model import build_tiny_model
from components.models import Checkpoint, load_checkpoint
from components.training import collate, encode, train, train_checkpoint

from conftest import tiny_config


@pytest.fixture(scope="module")
def setup(home):
    cfg = tiny_config()
    items = SUITES["capitals"].raw_items(cfg.data.n_candidates, cfg.seed)[: cfg.data.max_items]
    model_dir = build_tiny_model(cfg.model, suite_texts(items), cfg.seed, home / "cache", items)
    data = split_items(items, None, cfg.data, "refusal", cfg.seed)
    base = Checkpoint("base", str(model_dir), [], None, "base-test")
    return cfg, data, base


def test_label_mask_covers_answer_and_eos(setup):
    cfg, data, base = setup
    _, tok = load_checkpoint(base)
    enc = encode(tok, data.align[:2], 96)
    for e, it in zip(enc, data.align[:2]):
        answer_ids = [i for i, m in zip(e.input_ids, e.answer_mask) if m]
        assert answer_ids[-1] == tok.eos_token_id  # pad == eos must not hide the end of the answer
        assert tok.decode(answer_ids[:-1]) == it.response()
        assert it.answer in it.response()
    batch = collate(enc, tok.pad_token_id)
    # padding positions are never answer positions, even though pad id == eos id
    assert int((batch["answer_mask"] * (1 - batch["attention_mask"])).sum()) == 0


def test_training_lowers_the_loss(setup):
    cfg, data, base = setup
    model, tok = load_checkpoint(base)
    tcfg = cfg.tune.model_copy(update={"epochs": 8, "batch_size": 4})
    _, hist = train(model, tok, data.perturb, tcfg, seed=0)  # refusals: new to the model
    per_epoch = [np.mean([h["ce"] for h in hist if h["epoch"] == e]) for e in range(8)]
    assert per_epoch[-1] < 0.7 * per_epoch[0], per_epoch
    assert all(h["kl"] == 0.0 for h in hist)  # no penalty asked for, none computed


def _kl_after_perturb(cfg, data, aligned, kl_penalty, tmp):
    pcfg = cfg.perturb.model_copy(update={"kl_penalty": kl_penalty, "epochs": 8})
    res = train_checkpoint("perturbed", aligned, data.perturb, pcfg, 1, "fp32", tmp)
    m_ref, tok = load_checkpoint(aligned)
    m_new, _ = load_checkpoint(res.checkpoint)
    ref = score_candidates(m_ref, tok, data.eval, 16)
    new = score_candidates(m_new, tok, data.eval, 16)
    return float(drift_kl(ref.gold_logprobs, new.gold_logprobs, ref.gold_lengths).mean()), res.history


def test_kl_penalty_lowers_kl_to_aligned(setup, tmp_path):
    cfg, data, base = setup
    aligned = train_checkpoint("aligned", base, data.align, cfg.tune, 0, "fp32", tmp_path / "tune").checkpoint
    kl_free, h0 = _kl_after_perturb(cfg, data, aligned, 0.0, tmp_path / "p0")
    kl_pen, h1 = _kl_after_perturb(cfg, data, aligned, 5.0, tmp_path / "p1")
    assert kl_pen < 0.5 * kl_free, (kl_pen, kl_free)
    assert h1[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts as a no-op (B = 0)
    assert max(h["kl"] for h in h1) > 0


def test_lora_adapter_saved_as_safetensors_and_reloads_identically(setup, tmp_path):
    cfg, data, base = setup
    res = train_checkpoint("aligned", base, data.align, cfg.tune, 0, "fp32", tmp_path)
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    m1, tok = load_checkpoint(res.checkpoint)
    m2, _ = load_checkpoint(res.checkpoint)
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(m1(ids).logits, m2(ids).logits)
    m0, _ = load_checkpoint(base)
    assert not torch.allclose(m0(ids).logits, m1(ids).logits)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_freeze_layers_leaves_bottom_layers_untouched(setup, tmp_path, method):
    cfg, data, base = setup
    tcfg = cfg.tune.model_copy(update={"method": method, "freeze_layers": 1, "epochs": 2})
    res = train_checkpoint("aligned", base, data.align, tcfg, 0, "fp32", tmp_path)
    m0, _ = load_checkpoint(base)
    m1, _ = load_checkpoint(res.checkpoint)
    for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
        if ".layers.0." in n or "embed_tokens" in n:
            assert torch.equal(p0, p1), n
    changed = [n for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters()) if not torch.equal(p0, p1)]
    assert any(".layers.1." in n for n in changed)


def test_nan_loss_stops_the_stage(setup, tmp_path):
    cfg, data, base = setup
    tcfg = cfg.tune.model_copy(update={"lr": 1e30, "max_grad_norm": 1e30, "epochs": 20})
    with pytest.raises(TrainingDiverged, match="loss became"):
        train_checkpoint("aligned", base, data.align, tcfg, 0, "fp32", tmp_path)
    assert not (tmp_path / "adapter").exists()


def test_prepared_data_round_trips_through_json(setup):
    """The prepared split travels between Kubeflow components as JSON: every pool and
    setting, the linear probe's attribute included, comes back."""
    import dataclasses
    import json

    from components.data import SuiteData

    _, data, _ = setup
    data = dataclasses.replace(data, probe_attribute="continent")
    back = SuiteData.from_dict(json.loads(json.dumps(data.to_dict())))
    assert back == data
    assert back.probe_attribute == "continent" and back.digest() == data.digest()


def _weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Every parameter of a checkpoint's merged model, by name (tied ones once)."""
    m, _ = load_checkpoint(ckpt)
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_full_fine_tuning_with_frozen_bottom_trains_the_untied_head(setup, tmp_path):
    """The tiny model ties its output head to the input embedding, as SmolLM2 does.
    Full fine-tuning with ``freeze_layers`` keeps the embedding fixed and trains the
    head, untied for the stage and saved so (issue 23, item 4)."""
    from safetensors import safe_open

    cfg, data, base = setup
    m0, _ = load_checkpoint(base)
    assert m0.config.tie_word_embeddings and m0.lm_head.weight is m0.model.embed_tokens.weight
    emb0 = m0.model.embed_tokens.weight.detach().clone()
    tcfg = cfg.tune.model_copy(update={"method": "full", "freeze_layers": 1, "epochs": 2})
    res = train_checkpoint("aligned", base, data.align, tcfg, 0, "fp32", tmp_path)
    m1, _ = load_checkpoint(res.checkpoint)
    assert m1.config.tie_word_embeddings is False
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as h:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(h.keys())
    assert m1.lm_head.weight is not m1.model.embed_tokens.weight
    assert torch.equal(m1.model.embed_tokens.weight, emb0)  # the input embedding is frozen
    assert not torch.equal(m1.lm_head.weight, emb0)  # the head trained
    # the base model itself is untouched: still tied, same weights
    m0b, _ = load_checkpoint(base)
    assert m0b.lm_head.weight is m0b.model.embed_tokens.weight and torch.equal(m0b.lm_head.weight, emb0)


def test_weights_that_end_non_finite_stop_the_stage(setup, tmp_path):
    """One optimiser step whose update overflows: its loss (computed before the update)
    is finite, the weights after it are not (AdamW's decay factor ``1 - lr *
    weight_decay``, -3.4e38, takes the norm weights, about 1, beyond float32's range).
    The stage stops, nothing is saved (issue 23, item 8)."""
    cfg, data, base = setup
    tcfg = cfg.tune.model_copy(update={
        "method": "full", "lr": 3.4e37, "weight_decay": 10.0, "epochs": 1, "batch_size": len(data.align)})
    with pytest.raises(TrainingDiverged) as e:
        train_checkpoint("aligned", base, data.align, tcfg, 0, "fp32", tmp_path)
    assert str(e.value).startswith("aligned: weights became non-finite after step 0 (inf in ")
    assert str(e.value).endswith(", lr=3.4e+37); stage stopped, earlier artifacts kept")
    assert not (tmp_path / "model").exists()


def test_a_stage_whose_saved_weights_are_not_finite_is_not_published(setup, home):
    """Whatever trained the stage (``fit``: Ray Train, or anything else), the runner
    checks the saved weights before the store publishes them."""
    from safetensors.torch import load_file, save_file

    from components import runner
    from components.artifacts import Store
    from components.training import train_checkpoint as fit_in_process

    cfg, data, base = setup
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"epochs": 1, "lr": 0.0123})})

    last_step = []

    def fit(spec, out_dir, key, on_step):
        res = fit_in_process(spec.name, spec.parent, spec.items, spec.cfg, spec.seed, spec.precision, out_dir)
        last_step.append(res.history[-1]["step"])
        f = spec.weights_dir(out_dir) / "adapter_model.safetensors"
        t = load_file(str(f))
        name = min(t)
        t[name][0, 0] = float("inf")
        save_file(t, str(f))
        return res

    store = Store(home / "store")
    before = set(store.executions())
    folders = {p.name for p in store.root.iterdir()}  # the session's store: other tests' stages stay
    with pytest.raises(TrainingDiverged) as e:
        runner.train("tune", cfg, home, {"checkpoint": base.to_dict()}, data, fit=fit)
    assert last_step == [1]  # 16 items, 8 a step
    assert str(e.value).startswith("aligned: weights became non-finite after step 1 (")
    assert "inf in " in str(e.value) and str(e.value).endswith(", lr=0.0123); stage stopped, earlier artifacts kept")
    assert set(store.executions()) == before
    assert {p.name for p in store.root.iterdir()} == folders  # nothing published, no temp left


def test_every_method_combination_across_tune_perturb_recover(setup, home):
    """tune, perturb and recover each ``lora`` or ``full``: all 8 combinations train
    through the runner's stages (issue 23, item 6: a full stage after a LoRA one had an
    empty parameter list). Each stage changes what it should of the merged checkpoint
    it starts from, and each checkpoint stacks on its parent's."""
    from components import runner

    cfg, data, base = setup
    small = {"epochs": 1, "batch_size": 4}
    parent = {"checkpoint": base.to_dict()}
    seen: dict[tuple, dict] = {}
    weights: dict[str, dict[str, torch.Tensor]] = {"base-test": _weights(base)}

    def stage(kind: str, methods: tuple, par: dict) -> dict:
        if methods in seen:  # a prefix shared by two combinations is trained once
            return seen[methods]
        c = cfg.model_copy(update={
            "tune": cfg.tune.model_copy(update={"method": methods[0], **small}),
            "perturb": cfg.perturb.model_copy(update={"method": methods[min(1, len(methods) - 1)], **small}),
            "recover": cfg.recover.model_copy(update={"method": methods[-1], **small}),
        })
        arm = {"arm": "in_task", "n": 4} if kind == "recover" else {}
        res = runner.train(kind, c, home, par, data, **arm)
        assert not res["reused"] and res["history"], (kind, methods)
        pc, ck = Checkpoint(**par["checkpoint"]), Checkpoint(**res["checkpoint"])
        w = Path(res["dir"]) / ("adapter" if methods[-1] == "lora" else "model")
        if methods[-1] == "lora":  # the adapter stacks on the parent's chain
            assert (ck.adapters, ck.full_dir) == ([*pc.adapters, str(w)], pc.full_dir), (kind, methods)
        else:  # all weights, replacing the parent's chain
            assert (ck.adapters, ck.full_dir) == ([], str(w)), (kind, methods)
        assert (w / "config.json" if methods[-1] == "full" else w / "adapter_config.json").exists()
        before, after = weights[pc.digest], _weights(ck)
        assert before.keys() == after.keys()
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        if methods[-1] == "full":  # every weight of the merged parent trained
            assert changed == set(before), (kind, methods, set(before) - changed)
        else:  # the linear layers of the blocks changed, nothing else
            assert changed and all(".layers." in n and n.endswith("proj.weight") for n in changed), (kind, methods)
            assert "model.embed_tokens.weight" not in changed
        weights[ck.digest] = after
        seen[methods] = res
        return res

    combos = [(t, p, r) for t in ("lora", "full") for p in ("lora", "full") for r in ("lora", "full")]
    for t, p, r in combos:
        tuned = stage("tune", (t,), parent)
        perturbed = stage("perturb", (t, p), tuned)
        stage("recover", (t, p, r), perturbed)
    assert len(seen) == 2 + 4 + 8
