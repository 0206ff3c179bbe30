"""Metrics on one checkpoint: greedy task accuracy, likelihood ranking, first-token
probability, teacher-forced log-probs for KL drift, and bootstrap confidence intervals.

Sources (DESIGN.md, "Metrics"):
- ``task_acc``: greedy generation, answer matched after normalisation (Zheng et al. 2025,
  exact match; Qi et al. 2023, refusal keywords).
- ``knowledge_acc``: multiple-choice likelihood ranking, the summed log-prob of each
  candidate continuation given the prompt; chance = 1/K (lm-evaluation-harness ``acc``).
- ``first_token_prob``: mean probability of the gold answer's first token (Zheng et al.
  2025, "soft" first-token accuracy).
- ``kl_to_*``: mean per-token forward KL(pi_ref || pi) over answer tokens of a fixed
  reference set, teacher-forced (Shenfeld et al. 2025, arXiv 2509.04259).
"""

from __future__ import annotations

import json
import struct
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from components.data import Item
from components.stats import summarise
from components.training import format_prompt


def _amp(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


@torch.no_grad()
def generate_answers(
    model, tok, items: list[Item], batch_size: int, max_new_tokens: int, precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to each item's question, batched with left padding.

    ``on_batch(k)`` is called after each batch with the number of items it answered.

    Returns:
        One decoded string per item (special tokens removed, stripped).
    """
    tok.padding_side = "left"
    prompts = [format_prompt(tok, it.question, it.context) for it in items]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        with _amp(precision):
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, t in zip(idx, texts):
            out[i] = t.strip()
        if on_batch is not None:
            on_batch(len(idx))
    return out


def _plain_head(model) -> bool:
    """True when logits = output_embeddings(decoder hidden states), nothing more."""
    c = model.config
    return (
        getattr(c, "final_logit_softcapping", None) is None
        and getattr(c, "logit_scale", None) is None
        and hasattr(model, "get_decoder")
        and model.get_output_embeddings() is not None
    )


@dataclass
class CandidateScores:
    """Output of :func:`score_candidates` for N items with K candidates each.

    Attributes:
        logprob: (N, K) summed log-prob (nats) of each candidate continuation.
        first_token_prob: (N,) probability of the gold candidate's first token.
        gold_logprobs: (P, V) log-softmax rows at every gold-answer position (P summed
            over items), teacher-forced: the reference distribution for KL drift.
        gold_lengths: (N,) answer tokens per item (rows of ``gold_logprobs``; 0 for
            items not in ``gold_rows_for``).
        n_tokens: (N, K) tokens scored per candidate (the continuation and eos).
        pool_bounds: per item, (M,) upper bounds (nats) of the summed log-prob of each
            answer of the item's pool (the log-prob of the continuation up to and with
            the answer's first own token: the later tokens can only lower it); None for
            items scored without a pool.
    """

    logprob: np.ndarray
    first_token_prob: np.ndarray
    gold_logprobs: torch.Tensor
    gold_lengths: np.ndarray
    n_tokens: np.ndarray | None = None
    pool_bounds: list[np.ndarray | None] | None = None


def _cache_kwarg(module) -> str:
    """Name of the KV-cache argument of a transformers forward (``cache`` from 5.2x on,
    ``past_key_values`` before; the old name is deprecated, not yet removed)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward_hidden(model, plain: bool, **kw) -> torch.Tensor:
    """Last hidden states (B, T, H) of the decoder, or logits (B, T, V) for heads that
    are not a plain projection (soft-capping, logit scaling)."""
    if plain:
        return model.get_decoder()(**kw).last_hidden_state
    return model(**kw).logits


def _rows_logprobs(model, plain: bool, out: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log-softmax (R, V) at the selected (batch, position) rows of a forward's output."""
    x = out[b, t]
    logits = model.get_output_embeddings()(x) if plain else x
    return F.log_softmax(logits.float(), dim=-1)


def _col(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)[:, None]


@dataclass
class _Prepared:
    """One item tokenised for prefix-cached scoring.

    ``shared`` = prompt tokens + the candidates' (and pool answers') common leading
    tokens; ``rest[k]`` = the remaining tokens of candidate k (at least one each);
    ``plen`` = prompt tokens; ``j0`` = index of the gold answer's first token within the
    gold continuation; ``pool_first`` = each pool answer's first token after ``shared``."""

    shared: list[int]
    rest: list[list[int]]
    plen: int
    j0: int
    pool_first: list[int] | None = None


def _prepare(tok, it: Item, pool: list[str] | None = None) -> _Prepared:
    p = tok(format_prompt(tok, it.ranking_question(), it.context), add_special_tokens=False)["input_ids"]
    enc = tok([it.ranking_response(c) for c in it.candidates], add_special_tokens=False,
              return_offsets_mapping=True)
    conts = [ids + [tok.eos_token_id] for ids in enc["input_ids"]]
    start = it.ranking_answer_offset()
    j0 = next((j for j, (_, e) in enumerate(enc["offset_mapping"][0]) if e > start), 0)
    pconts = []
    if pool:
        pconts = [ids + [tok.eos_token_id] for ids in
                  tok([it.ranking_response(a) for a in pool], add_special_tokens=False)["input_ids"]]
    allc = conts + pconts
    # longest common token prefix, leaving every candidate at least one token of its own
    c = 0
    limit = min(len(x) for x in allc) - 1
    while c < limit and all(x[c] == allc[0][c] for x in allc):
        c += 1
    return _Prepared(p + conts[0][:c], [x[c:] for x in conts], len(p), j0,
                     [x[c] for x in pconts] if pool else None)


@torch.no_grad()
def score_candidates(
    model, tok, items: list[Item], batch_size: int, precision: str = "fp32",
    pools: list[list[str] | None] | None = None, gold_rows_for: list[bool] | None = None,
    gold_file: str | Path | None = None,
) -> CandidateScores:
    """Log-likelihood of every candidate continuation of every item, prefix-cached.

    Each sequence is ``prompt + response(candidate) + eos`` (the item's response template
    filled with the candidate; an item with its own ``knowledge_question`` /
    ``knowledge_template`` is ranked with those, :meth:`Item.ranking_question`); a
    candidate's score is the sum of its continuation
    tokens' log-probs (eos included, so a candidate that is a prefix of another is not
    favoured), as lm-evaluation-harness's ``loglikelihood`` computes it. The
    first-token probability is taken at the gold answer's first token inside the
    template.

    How (no Python loop over candidates around a forward pass):

    1. Per item, the *shared* tokens, the prompt plus the leading tokens every
       candidate's response has in common (``The capital of France is``), run once:
       items sorted by length, left-padded, explicit position ids, KV cache kept.
    2. The cache is expanded over the K candidates (``batch_repeat_interleave``) and the
       candidates' own remaining tokens run in one pass of B*K right-padded sequences.
    3. Vocabulary logits are computed only at continuation positions.

    A batch holds ``max(1, batch_size // K)`` items, so no pass exceeds ``batch_size``
    sequences. Equal (to float rounding) to scoring each candidate on its own.

    With ``pools``, each item's pool answers (the closed set its answer belongs to)
    share the first pass: the row after their common prefix gives every pool answer
    an upper bound of its summed log-prob (``CandidateScores.pool_bounds``) at no
    extra forward; :func:`components.knowledge.measure_knowledge` scores exactly only
    the answers whose bound reaches the gold answer's score.

    Args:
        items: N items with K candidates each (``candidates[0]`` is the gold answer).
        batch_size: sequences per forward pass.
        precision: ``fp32`` or ``bf16`` (CPU autocast).
        pools: per item, the answers to bound (None: no pool for that item).
        gold_rows_for: per item, whether to keep its gold rows for KL drift
            (default: every item).
        gold_file: write the gold rows into this safetensors file (tensor
            ``logprobs``, (P, V) float32, :class:`RowFile`) as each batch is scored
            instead of keeping them: memory O(batch x V), not O(items x V);
            ``CandidateScores.gold_logprobs`` is then an empty (0, V) tensor.

    Returns:
        :class:`CandidateScores` (log-probs in nats).

    Raises:
        ValueError: the items do not all have the same number of candidates.
    """
    from transformers import DynamicCache

    plain = _plain_head(model)
    net = model.get_decoder() if plain else model
    cache_kw = _cache_kwarg(net)
    pools = pools or [None] * len(items)
    keep = gold_rows_for or [True] * len(items)
    prep = [_prepare(tok, it, pool) for it, pool in zip(items, pools)]
    K = max(len(it.candidates) for it in items)
    if any(len(it.candidates) != K for it in items):
        raise ValueError("score_candidates: every item needs the same number of candidates")
    N = len(items)
    logprob = np.full((N, K), -np.inf)
    ftp = np.zeros(N)
    ntok = np.zeros((N, K), dtype=int)
    bounds: list[np.ndarray | None] = [None] * N
    gold_rows: list[torch.Tensor | None] = [None] * N
    per_batch = max(1, batch_size // K)
    # rows of each kept item's gold continuation, in item order (the layout of gold_logprobs)
    glen = [len(prep[n].shared) - prep[n].plen + len(prep[n].rest[0]) if keep[n] else 0 for n in range(N)]
    goff = np.concatenate([[0], np.cumsum(glen)]).astype(int)
    sink: RowFile | None = None
    order = sorted(range(N), key=lambda n: (len(prep[n].shared), max(map(len, prep[n].rest))))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for s in range(0, N, per_batch):
        idx = order[s:s + per_batch]
        B = len(idx)
        # 1. shared tokens, left-padded to Ts
        Ts = max(len(prep[n].shared) for n in idx)
        ids = torch.full((B, Ts), pad, dtype=torch.long)
        att = torch.zeros((B, Ts), dtype=torch.long)
        for b, n in enumerate(idx):
            x = prep[n].shared
            ids[b, Ts - len(x):] = torch.tensor(x)
            att[b, Ts - len(x):] = 1
        pos = (att.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        with _amp(precision):
            h1 = _forward_hidden(net, plain, input_ids=ids, attention_mask=att, position_ids=pos,
                                 use_cache=True, **{cache_kw: cache})
        # rows predicting the common tokens and each candidate's first own token
        sb, st, spans = [], [], []
        for b, n in enumerate(idx):
            first = Ts - len(prep[n].shared) + prep[n].plen - 1
            spans.append((len(sb), len(sb) + Ts - first))
            sb += [b] * (Ts - first)
            st += list(range(first, Ts))
        with _amp(precision):
            lp1 = _rows_logprobs(model, plain, h1, torch.tensor(sb), torch.tensor(st))
        # 2. each candidate's own tokens after the first, over the expanded cache
        Tr = max(len(r) for n in idx for r in prep[n].rest) - 1
        lp2 = None
        if Tr > 0:
            cache.batch_repeat_interleave(K)
            ids2 = torch.full((B * K, Tr), pad, dtype=torch.long)
            att2 = torch.zeros((B * K, Tr), dtype=torch.long)
            rb, rt = [], []
            for b, n in enumerate(idx):
                for k, r in enumerate(prep[n].rest):
                    x = r[:-1]
                    if x:
                        ids2[b * K + k, :len(x)] = torch.tensor(x)
                        att2[b * K + k, :len(x)] = 1
                        rb += [b * K + k] * len(x)
                        rt += list(range(len(x)))
            full_att = torch.cat([att.repeat_interleave(K, 0), att2], dim=1)
            pos2 = att.sum(1, keepdim=True).repeat_interleave(K, 0) + torch.arange(Tr)[None, :]
            with _amp(precision):
                h2 = _forward_hidden(net, plain, input_ids=ids2, attention_mask=full_att, position_ids=pos2,
                                     use_cache=True, **{cache_kw: cache})
                lp2 = _rows_logprobs(model, plain, h2, torch.tensor(rb), torch.tensor(rt))
        # 3. gather: the shared part is common to every candidate of an item
        r2 = 0
        for b, n in enumerate(idx):
            P = prep[n]
            a, e = spans[b]
            shared_rows = lp1[a:e - 1]  # (c, V): predict the common tokens
            common = P.shared[P.plen:]
            common_lp = float(shared_rows.gather(1, _col(common)).sum()) if common else 0.0
            last = lp1[e - 1]  # (V,): predicts each candidate's first own token
            if P.pool_first is not None:
                bounds[n] = common_lp + last[torch.tensor(P.pool_first)].double().numpy()
            for k, r in enumerate(P.rest):
                own = r[1:]
                rows = lp2[r2:r2 + len(own)] if own else lp1[:0]  # (len(own), V)
                r2 += len(own)
                tok_lp = torch.cat([last[r[0]].reshape(1), rows.gather(1, _col(own)).squeeze(1)])
                logprob[n, k] = common_lp + float(tok_lp.sum())
                ntok[n, k] = len(common) + len(r)
                if k == 0 and keep[n]:
                    g = torch.cat([shared_rows, last[None, :], rows], dim=0)  # (len(continuation), V)
                    if gold_file is not None:
                        if sink is None:
                            sink = RowFile(gold_file, int(goff[-1]), g.shape[1])
                        sink.write(int(goff[n]), g)
                    else:
                        gold_rows[n] = g.clone()
                    target = P.shared[P.plen:] + r
                    ftp[n] = float(g[P.j0, target[P.j0]].exp())
    if gold_file is not None:
        if sink is None:  # no gold rows at all
            sink = RowFile(gold_file, 0, 0)
        sink.close()
        lengths = np.array(glen)
        gold = torch.zeros((0, sink.width))
    else:
        lengths = np.array([0 if gold_rows[n] is None else gold_rows[n].shape[0] for n in range(N)])
        kept = [g for g in gold_rows if g is not None]
        gold = torch.cat(kept, dim=0) if kept else torch.zeros((0, 0))
    return CandidateScores(logprob, ftp, gold, lengths, ntok, bounds)


class RowFile:
    """A (P, V) float32 tensor ``logprobs`` in a safetensors file, written row block by
    row block through a memory map (the format :func:`safetensors.torch.load_file`
    and ``safe_open(...).get_slice`` read; no pickle).

    Args:
        path: the file (created, or overwritten).
        rows, width: P and V.
    """

    def __init__(self, path: str | Path, rows: int, width: int):
        header = json.dumps({"logprobs": {"dtype": "F32", "shape": [rows, width],
                                          "data_offsets": [0, rows * width * 4]}}).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            f.truncate(8 + len(header) + rows * width * 4)
        self.width = width
        self.rows = np.memmap(path, dtype="<f4", mode="r+", offset=8 + len(header), shape=(rows, width)) \
            if rows * width else None

    def write(self, at: int, block: torch.Tensor) -> None:
        """Rows ``at .. at + len(block) - 1`` (float32, (R, V))."""
        self.rows[at:at + block.shape[0]] = block.float().numpy()

    def close(self) -> None:
        if self.rows is not None:
            self.rows.flush()
            self.rows = None


def drift_kl_files(ref_files: list[str | Path], path: str | Path, lengths: np.ndarray,
                   max_rows: int = 256) -> list[np.ndarray]:
    """:func:`drift_kl` of one checkpoint's rows against several references, read from
    safetensors files (``ref_logprobs.safetensors`` of the probes) a block of whole items
    at a time: memory O(max_rows x V), not O(P x V). The values are those of
    :func:`drift_kl` on the whole tensors (the same rows, the same per-row sums).

    Args:
        ref_files: the references' files; path: the checkpoint's file; each holds a
            (P, V) tensor ``logprobs``.
        lengths: (N,) rows per item.
        max_rows: rows read per block (an item longer than that is read whole).

    Returns:
        One (N,) array (nats per token) per reference, in the order of ``ref_files``.
    """
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt") for f in [*ref_files, path]]
    slices = [h.get_slice("logprobs") for h in handles]
    out = [np.zeros(len(lengths)) for _ in ref_files]
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    i = 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and bounds[j + 1] - bounds[i] <= max_rows:
            j += 1
        a, b = int(bounds[i]), int(bounds[j])
        lp = slices[-1][a:b]
        for r, sl in enumerate(slices[:-1]):
            out[r][i:j] = drift_kl(sl[a:b], lp, lengths[i:j])
        i = j
    return out


def drift_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor, lengths: np.ndarray) -> np.ndarray:
    """Per-item mean forward KL(pi_ref || pi) over answer tokens.

    Args:
        ref_logprobs, logprobs: (P, V) log-softmax rows of the reference and the
            checkpoint at the same teacher-forced positions.
        lengths: (N,) rows per item.

    Returns:
        (N,) nats per token.
    """
    kl_rows = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1).clamp(min=0).numpy()
    out, pos = np.zeros(len(lengths)), 0
    for i, L in enumerate(lengths):
        out[i] = kl_rows[pos:pos + L].mean()
        pos += L
    return out


def transitions(before: np.ndarray, after: np.ndarray, n_boot: int, level: float, seed: int) -> dict:
    """Per-item transitions between two checkpoints (Harmon et al. 2025, "Mapping
    Post-Training Forgetting in Language Models at Scale", arXiv 2510.17776: forgetting
    counted as correct->wrong items, backward transfer as wrong->correct).

    Args:
        before, after: (N,) correctness of the same items at the earlier and the later
            checkpoint, 0/1 or a share (of knowledge phrasings): an item counts as
            correct at a share of at least 0.5.

    Returns:
        ``{"correct_to_wrong": {...}, "wrong_to_correct": {...}}``, each a count of items
        with ``value``, ``ci_low``, ``ci_high`` (percentile bootstrap over items).
    """
    b, a = (np.asarray(before, float) >= 0.5).astype(float), (np.asarray(after, float) >= 0.5).astype(float)
    n = len(b)
    out = {}
    for name, flag in (("correct_to_wrong", (b == 1) & (a == 0)), ("wrong_to_correct", (b == 0) & (a == 1))):
        s = summarise(flag.astype(float), n_boot, level, seed)  # share of items; counts = share * N
        out[name] = {k: round(v * n, 6) for k, v in s.items()}
    return out
