"""Knowledge measures without a ceiling, and the candidates they rank.

Each evaluation item is asked in several *knowledge phrasings* (``Item.knowledge_phrasings``:
at least three, as knowledge-editing benchmarks ask a fact in paraphrases, CounterFact,
Meng et al. 2022, arXiv 2202.05262), and in each one every candidate answer is scored by
the summed log-probability of its continuation (lm-evaluation-harness ``loglikelihood``).
Per item and per checkpoint (the mean over the item's phrasings):

- ``knowledge_acc``: the gold answer scores strictly highest among the K candidates
  (ties and non-finite scores count as wrong); chance 1/K (lm-evaluation-harness ``acc``).
- ``knowledge_acc_token``, ``knowledge_acc_byte``: the same with each score divided by
  its continuation's tokens, or its UTF-8 bytes (lm-evaluation-harness ``acc_norm``
  normalises by length): summed log-probs favour short answers when a model's mass sits
  elsewhere.
- ``knowledge_mrr``: 1 / the gold answer's rank among *all* answers of its type
  (``SuiteData.answer_pools``; the K candidates where the item has no type), 0 beyond
  rank ``probe.rank_depth`` (MRR@d, as retrieval evaluation cuts it); chance H_d / M
  for M answers (the mean of that quantity for a uniformly random rank).
- ``knowledge_margin``: the gold answer's score minus the best other candidate's (nats);
  0 is the point where the ranking flips.
- ``gold_logprob``: the gold continuation's summed log-prob (nats). It moves with the
  response format and with any refusal (the whole continuation becomes unlikely), so it
  is shown, never decisive.

The rank among all M answers is exact without scoring all of them: the first pass of
:func:`components.metrics.score_candidates` gives every answer an upper bound (its
log-prob up to its first own token), and only answers whose bound reaches the gold
answer's score are scored in full.

Hard candidates (:func:`mine_candidates`) are the answers of the item's type that the
*base* model scores highest, averaged over the phrasings, other than the gold answer and
its aliases: found by the same bounds (best-first, exact), once per audit.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

from components.data import Item, match_contains, normalise
from components.metrics import score_candidates

# Per-item knowledge measures, in the order reports show them.
MEASURES = ("knowledge_acc", "knowledge_acc_token", "knowledge_acc_byte", "knowledge_mrr", "knowledge_margin",
            "gold_logprob")
PREFILTER = 3  # hard mining scores in full the PREFILTER * (K-1) answers with the best first-token bounds
_EPS = 1e-4  # nats: bounds and exact scores of the same continuation differ by float rounding only


def is_alias(a: str, gold: str) -> bool:
    """True when ``a`` names the gold answer too: equal after :func:`normalise`, or one
    contains the other as whole words (``East Jerusalem`` / ``Jerusalem``)."""
    return normalise(a) == normalise(gold) or match_contains(a, gold) or match_contains(gold, a)


def rank_pool(it: Item, pools: dict[str, list[str]]) -> list[str] | None:
    """The answers the gold answer of ``it`` is ranked among (gold first, aliases left
    out), or None when the item has no answer type with a pool."""
    pool = pools.get(it.answer_type or "")
    if not pool:
        return None
    g = it.gold()
    return [g, *[a for a in pool if not is_alias(a, g)]]


def harmonic_chance(m: int, depth: int | None = None) -> float:
    """Mean reciprocal rank of a uniformly random rank among ``m`` answers: H_m / m, or
    H_d / m when ranks beyond ``d = depth`` count as 0."""
    d = m if depth is None else min(m, depth)
    return float(np.sum(1.0 / np.arange(1, d + 1)) / m)


def own_phrasing(it: Item, base_answer: str) -> tuple[str, str] | None:
    """The base model's own answer as a knowledge phrasing: ``(question, answer with the
    gold answer replaced by {answer})``, when the answer names the gold answer exactly
    once; else None. Ranking candidates inside the model's own words keeps the knowledge
    measure off the response format (a model that answers in sentences finds a bare
    answer unlikely whatever it knows)."""
    g = it.gold()
    a = base_answer.strip()
    if not g or a.count(g) != 1 or "{answer}" in a or len(a) > 300:
        return None
    if not re.search(r"\w", a.replace(g, "")):  # a bare answer: no sentence to rank in
        return None
    return it.ranking_question(), a.replace(g, "{answer}")


@dataclass
class KnowledgeScores:
    """Per-item knowledge measures of one checkpoint (N items).

    Attributes:
        per_item: measure name (:data:`MEASURES`) -> (N,) values, each the mean over the
            item's phrasings.
        chance: measure name -> its chance level (None where none is defined:
            ``gold_logprob``; 0 for ``knowledge_margin``).
        candidate_logprobs: (N, K) summed log-probs of the K candidates, averaged over
            the phrasings.
        first_token_prob: (N,) probability of the gold answer's first token in the
            item's first phrasing.
        gold_logprobs: (P, V) teacher-forced log-softmax rows of the first phrasing's
            gold continuation (the KL reference set), and ``gold_lengths`` (N,).
        n_phrasings: (N,) phrasings per item.
        rank_exact: (N,) share of the item's phrasings whose rank among all answers is
            exact (1.0 unless the scoring budget ran out, ``measure_knowledge``).
    """

    per_item: dict[str, np.ndarray]
    chance: dict[str, float | None]
    candidate_logprobs: np.ndarray
    first_token_prob: np.ndarray
    gold_logprobs: object
    gold_lengths: np.ndarray
    n_phrasings: np.ndarray
    rank_exact: np.ndarray | None = None


def _phrased(items: list[Item], candidates: list[list[str]] | None = None) -> tuple[list[Item], list[int], list[int]]:
    """One virtual item per (item, phrasing): (virtual items, owner index, phrasing index)."""
    virt, owner, which = [], [], []
    for i, it in enumerate(items):
        cands = list(it.candidates) if candidates is None else candidates[i]
        for j, (q, t) in enumerate(it.knowledge_phrasings()):
            virt.append(Item(id=f"{it.id}#{j}", question=q, answer=cands[0], template=t, candidates=cands,
                             context=it.context))
            owner.append(i)
            which.append(j)
    return virt, owner, which


def _score_ragged(model, tok, virt: list[Item], cands: list[list[str]], batch_size: int, precision: str) -> list[np.ndarray]:
    """Summed log-probs of ragged candidate lists (``cands[v][0]`` is the gold answer):
    lists padded to a common length with the gold answer, scored in chunks of similar
    length, padding dropped."""
    out: list[np.ndarray | None] = [None] * len(virt)
    order = sorted(range(len(virt)), key=lambda v: len(cands[v]))
    chunk = 16
    for s in range(0, len(order), chunk):
        idx = order[s:s + chunk]
        k = max(len(cands[v]) for v in idx)
        sub = [Item(id=virt[v].id, question=virt[v].question, answer=cands[v][0], template=virt[v].template,
                    context=virt[v].context,
                    candidates=cands[v] + [cands[v][0]] * (k - len(cands[v]))) for v in idx]
        sc = score_candidates(model, tok, sub, batch_size, precision, gold_rows_for=[False] * len(sub))
        for row, v in zip(sc.logprob, idx):
            out[v] = row[:len(cands[v])]
    return out  # type: ignore[return-value]


def _strictly_first(scores: np.ndarray) -> np.ndarray:
    """(R, K) -> (R,) 1.0 where column 0 is finite and strictly above every other column."""
    gold = scores[:, 0]
    others = scores[:, 1:].max(1) if scores.shape[1] > 1 else np.full(len(scores), -np.inf)
    return (np.isfinite(gold) & (gold > np.where(np.isnan(others), np.inf, others))).astype(float)


def measure_knowledge(
    model, tok, items: list[Item], pools: dict[str, list[str]], batch_size: int, precision: str = "fp32",
    depth: int | None = 20, budget: int = 64, gold_file=None,
) -> KnowledgeScores:
    """Every knowledge measure of one checkpoint on ``items`` (module docstring).

    Args:
        items: N evaluation items with K candidates each (``candidates[0]`` gold).
        pools: answer type -> all answers of that type (``SuiteData.answer_pools``).
        batch_size: sequences per forward pass.
        depth: ranks beyond ``depth`` give a reciprocal rank of 0 (MRR@depth, as
            retrieval evaluation cuts it, e.g. MS MARCO's MRR@10); the search stops
            there. None: the exact rank among all answers.
        budget: at most this many answers per item and phrasing are scored in full,
            in the order of their bounds; where it runs out first the rank is a lower
            bound (``rank_exact`` says how often).
        gold_file: where to write the KL reference rows (``score_candidates``'s
            ``gold_file``: memory O(batch x V)); None: keep them in ``gold_logprobs``.

    Returns:
        :class:`KnowledgeScores`.

    Raises:
        ValueError: the items do not all have the same number of candidates.
    """
    virt, owner, which = _phrased(items)
    rpool = [rank_pool(items[i], pools) for i in range(len(items))]
    vpools = [rpool[owner[v]][1:] if rpool[owner[v]] else None for v in range(len(virt))]
    sc = score_candidates(model, tok, virt, batch_size, precision, pools=vpools,
                          gold_rows_for=[j == 0 for j in which], gold_file=gold_file)
    S = sc.logprob  # (V, K)
    nbytes = np.array([[len(v.ranking_response(c).encode()) for c in v.candidates] for v in virt], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = _strictly_first(S)
        acc_tok = _strictly_first(S / np.maximum(sc.n_tokens, 1))
        acc_byte = _strictly_first(S / np.maximum(nbytes, 1))
        margin = S[:, 0] - S[:, 1:].max(1)
    margin = np.where(np.isfinite(margin), margin, -np.inf)
    # rank among the pool, best-first: answers in the order of their bounds, scored in
    # rounds until the bound of the next falls below the gold score or ``depth`` answers
    # beat it (then the reciprocal rank counts as 0: MRR@depth)
    K = S.shape[1]
    rank = 1 + (S[:, 1:] >= S[:, :1]).sum(1).astype(float)  # within the K candidates
    todo = [v for v in range(len(virt)) if vpools[v] is not None]
    queue = {}
    for v in todo:
        order = np.argsort(-sc.pool_bounds[v], kind="stable")
        queue[v] = [(vpools[v][i], sc.pool_bounds[v][i]) for i in order if sc.pool_bounds[v][i] >= S[v, 0] - _EPS]
        rank[v] = 1.0
    cap = depth if depth else np.inf
    chunk = 16
    spent = {v: 0 for v in todo}
    while True:
        active = [v for v in todo if queue[v] and rank[v] <= cap and spent[v] < budget]
        if not active:
            break
        take = {v: queue[v][:min(chunk, budget - spent[v])] for v in active}
        rows = _score_ragged(model, tok, [virt[v] for v in active],
                             [[virt[v].candidates[0], *[a for a, _ in take[v]]] for v in active], batch_size, precision)
        for v, row in zip(active, rows):
            rank[v] += float(np.sum(~(row[1:] < row[0])))  # ties and NaN count against the gold answer
            queue[v] = queue[v][len(take[v]):]
            spent[v] += len(take[v])
    # a rank is exact unless the budget ran out with answers left whose bound reaches the gold
    # score (then it is a lower bound: a model whose mass sits elsewhere bounds loosely)
    exact = np.ones(len(virt))
    for v in todo:
        if queue[v] and rank[v] <= cap:
            exact[v] = 0.0
    rr = np.where(np.isfinite(S[:, 0]) & (rank <= cap), 1.0 / rank, 0.0)

    N = len(items)
    counts = np.bincount(owner, minlength=N).astype(float)

    def per_item(x: np.ndarray) -> np.ndarray:
        return np.bincount(owner, weights=x, minlength=N) / np.maximum(counts, 1)

    m_sizes = [len(p) if p else K for p in rpool]
    chance_rr = float(np.mean([harmonic_chance(m, depth) for m in m_sizes])) if N else float("nan")
    cand_lp = np.zeros((N, K))
    np.add.at(cand_lp, owner, np.where(np.isfinite(S), S, -1e9))
    cand_lp /= np.maximum(counts, 1)[:, None]
    first = [v for v in range(len(virt)) if which[v] == 0]
    return KnowledgeScores(
        per_item={
            "knowledge_acc": per_item(acc), "knowledge_acc_token": per_item(acc_tok),
            "knowledge_acc_byte": per_item(acc_byte), "knowledge_mrr": per_item(rr),
            "knowledge_margin": per_item(np.maximum(margin, -1e3)), "gold_logprob": per_item(np.maximum(S[:, 0], -1e3)),
        },
        chance={"knowledge_acc": 1.0 / K, "knowledge_acc_token": 1.0 / K, "knowledge_acc_byte": 1.0 / K,
                "knowledge_mrr": chance_rr, "knowledge_margin": 0.0, "gold_logprob": None},
        candidate_logprobs=cand_lp,
        first_token_prob=sc.first_token_prob[first],
        gold_logprobs=sc.gold_logprobs,
        gold_lengths=sc.gold_lengths[first],
        n_phrasings=counts,
        rank_exact=per_item(exact),
    )


def add_own_phrasings(items: list[Item], base_answers: dict[str, str]) -> int:
    """Put the base model's own answer (:func:`own_phrasing`) in front of each item's
    knowledge phrasings, in place. Returns how many items got one."""
    n = 0
    for it in items:
        own = own_phrasing(it, base_answers.get(it.id, ""))
        if own is None:
            continue
        ph = it.knowledge_phrasings()
        if list(own) not in [list(p) for p in ph]:
            it.phrasings = [list(own), *[list(p) for p in ph]]
            n += 1
    return n


def mine_candidates(
    model, tok, items: list[Item], pools: dict[str, list[str]], groups: dict[str, str], k: int, mode: str,
    seed: int, batch_size: int, precision: str = "fp32",
) -> dict:
    """Choose the K-1 other candidates of every item that has an answer type, in place.

    ``hard``: the answers of the type that this (base) model scores highest in the
    item's first knowledge phrasing (the base model's own words, where it gave an
    answer), other than the gold answer and its aliases: the ``PREFILTER * (K-1)``
    answers whose first token it finds likeliest (the bounds of
    :func:`components.metrics.score_candidates`) are scored in full and the best K-1
    kept. ``same_group``: drawn
    at random among the answers sharing the gold answer's group (``groups``), topped
    up at random from the type. ``random``: drawn at random from the type.

    Args:
        items: the evaluation items (their ``candidates`` are replaced).
        pools: answer type -> all its answers; groups: answer -> group value.
        k: candidates per item (gold included).

    Returns:
        ``{"mined": items changed, "kept": items keeping their own candidates,
        "scored_per_item": mean answers scored in full (hard mode)}``.

    Raises:
        ValueError: an answer type has fewer than ``k`` answers other than aliases.
    """
    todo = [i for i, it in enumerate(items) if rank_pool(it, pools) is not None]
    for i in todo:
        if len(rank_pool(items[i], pools)) < k:
            raise ValueError(f"item {items[i].id}: its answer type {items[i].answer_type!r} has fewer than "
                             f"{k} answers to rank")
    info = {"mined": len(todo), "kept": len(items) - len(todo), "scored_per_item": 0.0}
    if mode != "hard":
        for i in todo:
            it = items[i]
            rng = random.Random(f"candidates:{seed}:{it.id}")
            others = rank_pool(it, pools)[1:]
            same = [a for a in others if groups.get(a) is not None and groups.get(a) == groups.get(it.gold())]
            pick = rng.sample(same, min(k - 1, len(same))) if mode == "same_group" else []
            rest = [a for a in others if a not in pick]
            pick += rng.sample(rest, k - 1 - len(pick))
            it.candidates = [it.gold(), *pick]
        return info
    sub = [items[i] for i in todo]
    if not sub:
        return info
    first = [it.knowledge_phrasings()[0] for it in sub]
    virt = [Item(id=it.id, question=q, answer=it.gold(), template=t, candidates=[it.gold()], context=it.context)
            for it, (q, t) in zip(sub, first)]
    pool_of = [rank_pool(it, pools)[1:] for it in sub]
    sc = score_candidates(model, tok, virt, batch_size, precision, pools=pool_of, gold_rows_for=[False] * len(virt))
    m = PREFILTER * (k - 1)
    pre = [[pool[i] for i in np.argsort(-b, kind="stable")[:m]] for pool, b in zip(pool_of, sc.pool_bounds)]
    rows = _score_ragged(model, tok, virt, [[it.gold(), *p] for it, p in zip(sub, pre)], batch_size, precision)
    for it, p, row in zip(sub, pre, rows):
        s_ = np.where(np.isfinite(row[1:]), row[1:], -np.inf)
        top = sorted(zip(p, s_), key=lambda kv: (-kv[1], kv[0]))[: k - 1]
        it.candidates = [it.gold(), *[a for a, _ in top]]
    scored = sum(len(p) for p in pre)
    info["scored_per_item"] = scored / max(1, len(sub))
    return info
