"""Knowledge measures: the pruned rank equals the rank among every answer scored in
full, ties and non-finite scores count as wrong, hard candidates are the base model's
best-scored answers, and the invented answers of wrong_facts lie outside every pool."""

from __future__ import annotations

import numpy as np
import pytest

from components.data import Item, answer_pools, fictional_answer, suite_texts
from components.registry import SUITES
from components.knowledge import (_strictly_first, harmonic_chance, is_alias, measure_knowledge, mine_candidates,
                                  own_phrasing, rank_pool)
from components.metrics import score_candidates
from components.base_model import build_tiny_model
from components.models import Checkpoint, load_checkpoint

from conftest import tiny_config


@pytest.fixture(scope="module")
def tiny(home):
    cfg = tiny_config()
    items = SUITES["capitals"].raw_items(8, 0)[:80]
    d = build_tiny_model(cfg.model, suite_texts(items), 0, home / "cache", SUITES["capitals"].pretraining_items(items, cfg))
    model, tok = load_checkpoint(Checkpoint("base", str(d)))
    return model, tok, items


def test_ties_and_non_finite_scores_count_as_wrong():
    s = np.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, -3.0], [np.nan, -2.0, -3.0], [-np.inf, -np.inf, -np.inf],
                  [-1.0, np.nan, -3.0]])
    assert _strictly_first(s).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_chance_of_the_reciprocal_rank():
    assert harmonic_chance(4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert harmonic_chance(230, 20) == pytest.approx(sum(1 / r for r in range(1, 21)) / 230)
    # a uniformly random rank has that mean reciprocal rank
    r = np.random.default_rng(0).integers(1, 231, 200_000)
    assert np.mean(np.where(r <= 20, 1 / r, 0)) == pytest.approx(harmonic_chance(230, 20), rel=0.02)


def test_aliases_and_own_phrasing():
    assert is_alias("East Jerusalem", "Jerusalem") and is_alias("paris", "Paris") and not is_alias("Parisa", "Paris")
    it = Item(id="x", question="What is the capital of France?", answer="Paris", candidates=["Paris", "Rome"])
    assert own_phrasing(it, "The capital of France is Paris.") == ("What is the capital of France?",
                                                                   "The capital of France is {answer}.")
    assert own_phrasing(it, "Paris, of course. Paris!") is None  # named twice: ambiguous
    assert own_phrasing(it, "I do not know.") is None


def test_invented_answers_lie_outside_every_pool():
    items = SUITES["capitals"].raw_items(8, 0)
    pools, _ = answer_pools(items)
    every = {a.lower() for p in pools.values() for a in p}
    invented = {fictional_answer(it.id, 0) for it in items}
    assert len(invented) > 0.9 * len(items) and not {a.lower() for a in invented} & every


def test_pruned_rank_equals_the_rank_among_every_answer(tiny):
    model, tok, items = tiny
    pools, _ = answer_pools(items)
    sub = items[:6]
    ks = measure_knowledge(model, tok, sub, pools, batch_size=16, depth=None, budget=10**6)
    # brute force: every answer of the pool scored in full, in every phrasing
    for n, it in enumerate(sub):
        rr = []
        for q, t in it.knowledge_phrasings():
            pool = rank_pool(it, pools)
            v = Item(id="v", question=q, answer=pool[0], template=t, candidates=pool)
            s = score_candidates(model, tok, [v], batch_size=64).logprob[0]
            rr.append(1.0 / (1 + np.sum(s[1:] >= s[0])))
        assert ks.per_item["knowledge_mrr"][n] == pytest.approx(np.mean(rr), abs=1e-6)
    assert ks.chance["knowledge_acc"] == pytest.approx(1 / 8)
    assert ks.n_phrasings.tolist() == [len(it.knowledge_phrasings()) for it in sub]
    assert ks.rank_exact.tolist() == [1.0] * len(sub)
    # a budget of one answer: ranks become lower bounds (reciprocal ranks at least as high), and say so
    small = measure_knowledge(model, tok, sub, pools, batch_size=16, depth=None, budget=1)
    assert (small.per_item["knowledge_mrr"] >= ks.per_item["knowledge_mrr"] - 1e-9).all()
    exact = small.rank_exact == 1.0
    assert np.allclose(small.per_item["knowledge_mrr"][exact], ks.per_item["knowledge_mrr"][exact])


def test_hard_candidates_are_the_base_models_best_scored_answers(tiny):
    model, tok, items = tiny
    pools, groups = answer_pools(items, "continent")
    sub = [Item(**it.to_dict()) for it in items[:4]]
    info = mine_candidates(model, tok, sub, pools, groups, 8, "hard", 0, 16)
    assert info["mined"] == 4
    for it in sub:
        assert len(it.candidates) == 8 and it.candidates[0] == it.answer and len(set(it.candidates)) == 8
        q, t = it.knowledge_phrasings()[0]
        pool = rank_pool(it, pools)
        s = score_candidates(model, tok, [Item(id="v", question=q, answer=pool[0], template=t, candidates=pool)],
                             batch_size=64).logprob[0]
        chosen = [s[pool.index(c)] for c in it.candidates[1:]]
        others = [x for a, x in zip(pool[1:], s[1:]) if a not in it.candidates]
        # every chosen distractor scores at least as high as the median unchosen one
        assert min(chosen) >= np.median(others)
    same = [Item(**it.to_dict()) for it in items[:4]]
    mine_candidates(model, tok, same, pools, groups, 4, "same_group", 0, 16)
    for it in same:
        assert all(groups[c] == groups[it.answer] for c in it.candidates[1:])
