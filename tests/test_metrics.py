"""Metrics: batched likelihood scoring equals one-by-one scoring, matchers, bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.registry import SUITES
from components.data import Item, is_refusal, match_contains, match_exact, normalise, suite_texts
from components.metrics import drift_kl, drift_kl_files, score_candidates
from components.stats import bootstrap_ci
from components.base_model import build_tiny_model
from components.models import Checkpoint, load_checkpoint
from components.training import format_prompt

from conftest import tiny_config


@pytest.fixture(scope="module")
def tiny(home):
    cfg = tiny_config()
    items = SUITES["capitals"].raw_items(4, 0)[:80]
    d = build_tiny_model(cfg.model, suite_texts(items), 0, home / "cache", items)
    model, tok = load_checkpoint(Checkpoint("base", str(d)))
    return model, tok, items


def _one_by_one(model, tok, item, cand):
    p = tok(format_prompt(tok, item.question), add_special_tokens=False)["input_ids"]
    a = tok(item.response(cand), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prefix = tok(item.template.split("{answer}")[0].rstrip(), add_special_tokens=False)["input_ids"]
    j0 = len(prefix)  # the answer's first token follows the template's prefix tokens
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([p + a])).logits[0].float(), -1)
    total = sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(a))
    return total, float(lp[len(p) - 1 + j0, a[j0]].exp())


def test_batched_scores_equal_unbatched(tiny):
    model, tok, items = tiny
    sub = items[:6]
    refs = {(n, k): _one_by_one(model, tok, it, c) for n, it in enumerate(sub) for k, c in enumerate(it.candidates)}
    # batch 5: one item (4 candidates) per pass; batch 12: three items of different prompt
    # and answer lengths share a pass (left-padded prompts, right-padded continuations)
    for batch_size in (5, 12):
        sc = score_candidates(model, tok, sub, batch_size=batch_size)
        assert sc.logprob.shape == (6, 4)
        for (n, k), (ref, ftp) in refs.items():
            assert sc.logprob[n, k] == pytest.approx(ref, abs=1e-3)
            if k == 0:
                assert sc.first_token_prob[n] == pytest.approx(ftp, abs=1e-5)
        assert sc.gold_logprobs.shape[0] == int(sc.gold_lengths.sum())
        assert sc.gold_logprobs.shape[1] == model.config.vocab_size


def test_gold_rows_streamed_to_file_equal_kept_rows_and_kl(tiny, tmp_path):
    """The KL reference rows written batch by batch into a safetensors file are the
    rows kept in memory, bit for bit, and the block-wise KL read from the files equals
    drift_kl on the whole tensors (issue 21: memory O(batch x V), not O(items x V))."""
    from safetensors.torch import load_file

    model, tok, items = tiny
    sub = items[:7]
    keep = [n != 2 for n in range(len(sub))]
    mem = score_candidates(model, tok, sub, batch_size=8, gold_rows_for=keep)
    disk = score_candidates(model, tok, sub, batch_size=8, gold_rows_for=keep, gold_file=tmp_path / "a.safetensors")
    rows = load_file(str(tmp_path / "a.safetensors"))["logprobs"]
    assert rows.shape == mem.gold_logprobs.shape and torch.equal(rows, mem.gold_logprobs)
    assert disk.gold_logprobs.shape == (0, rows.shape[1])
    assert np.array_equal(disk.gold_lengths, mem.gold_lengths) and disk.gold_lengths[2] == 0
    assert np.array_equal(disk.logprob, mem.logprob)
    # a second "checkpoint": other rows of the same shape
    torch.manual_seed(0)
    other = F.log_softmax(rows + torch.randn_like(rows), -1)
    from safetensors.torch import save_file
    save_file({"logprobs": other}, str(tmp_path / "b.safetensors"))
    lengths = mem.gold_lengths[np.array(keep)]
    for max_rows in (1, 5, 10_000):
        kl_a, kl_b = drift_kl_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                                    tmp_path / "b.safetensors", lengths, max_rows=max_rows)
        assert np.array_equal(kl_a, drift_kl(rows, other, lengths))
        assert np.all(kl_a > 0) and np.array_equal(kl_b, np.zeros(len(lengths)))


def test_pretrained_tiny_model_ranks_gold_first(tiny):
    model, tok, items = tiny
    sc = score_candidates(model, tok, items[:40], batch_size=16)
    assert (sc.logprob.argmax(1) == 0).mean() >= 0.8  # well above the 0.25 chance level


def test_drift_kl_zero_for_same_and_positive_otherwise():
    torch.manual_seed(0)
    a = F.log_softmax(torch.randn(7, 11), -1)
    b = F.log_softmax(torch.randn(7, 11), -1)
    lengths = np.array([3, 4])
    assert np.allclose(drift_kl(a, a, lengths), 0, atol=1e-6)
    kl = drift_kl(a, b, lengths)
    manual = (a.exp() * (a - b)).sum(-1).numpy()
    assert kl[0] == pytest.approx(manual[:3].mean(), rel=1e-5)
    assert kl[1] == pytest.approx(manual[3:].mean(), rel=1e-5)


def test_matchers():
    assert normalise("  Bogotá, D.C. ") == "bogota d c"
    assert match_contains("The capital of France is Paris.", "Paris")
    assert not match_contains("Parisian food", "Paris")
    assert match_exact("paris.", "Paris")
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I\u2019m not able to do that")
    assert not is_refusal("The capital is Rome.")


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = rng.binomial(1, 0.6, 20).astype(float)
    large = rng.binomial(1, 0.6, 2000).astype(float)
    lo_s, hi_s = bootstrap_ci(small, 1000, 0.95, 0)
    lo_l, hi_l = bootstrap_ci(large, 1000, 0.95, 0)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 4
    assert bootstrap_ci(np.ones(10), 100, 0.95, 0) == (1.0, 1.0)


def test_capitals_items_are_well_formed():
    items = SUITES["capitals"].raw_items(4, 0)
    assert len(items) > 200
    ids = [i.id for i in items]
    assert len(set(ids)) == len(ids)
    for it in items:
        assert it.candidates[0] == it.answer and len(set(it.candidates)) == 4
    fr = next(i for i in items if i.attributes["country"] == "France")
    assert fr.answer == "Paris"
    assert isinstance(fr, Item)


def test_prompt_features_do_not_depend_on_padding(tiny):
    from components.linear_probe import prompt_features

    model, tok, items = tiny
    sub = items[:5]
    for pooling in ("last", "mean"):
        batched = prompt_features(model, tok, sub, batch_size=5, pooling=pooling)
        assert batched.shape == (5, model.config.num_hidden_layers + 1, model.config.hidden_size)
        alone = np.concatenate([prompt_features(model, tok, [it], 1, pooling) for it in sub])
        assert np.allclose(batched, alone, atol=1e-4)


def test_transitions_count_items_that_changed():
    from components.metrics import transitions

    before = np.array([1, 1, 1, 0, 0, 1, 0, 1], float)
    after = np.array([0, 1, 0, 1, 0, 1, 0, 0], float)
    tr = transitions(before, after, n_boot=200, level=0.95, seed=0)
    assert tr["correct_to_wrong"]["value"] == 3 and tr["wrong_to_correct"]["value"] == 1
    assert tr["correct_to_wrong"]["ci_low"] <= 3 <= tr["correct_to_wrong"]["ci_high"]
    assert transitions(before, before, 100, 0.95, 0)["correct_to_wrong"] == {"value": 0, "ci_low": 0, "ci_high": 0}
