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

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from components.data import Item
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
    prompts = [format_prompt(tok, it.question) for it in items]
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
        gold_lengths: (N,) answer tokens per item (rows of ``gold_logprobs``).
    """

    logprob: np.ndarray
    first_token_prob: np.ndarray
    gold_logprobs: torch.Tensor
    gold_lengths: np.ndarray


@torch.no_grad()
def score_candidates(model, tok, items: list[Item], batch_size: int, precision: str = "fp32") -> CandidateScores:
    """Score every (item, candidate) continuation in length-sorted batches.

    Each sequence is ``prompt + response(candidate) + eos`` (the item's response template
    filled with the candidate); the continuation's log-prob is the sum over its tokens
    (eos included, so a candidate that is a prefix of another is not favoured; the
    template's shared tokens add nearly the same amount to every candidate). The
    first-token probability is taken at the gold answer's first token inside the
    template. One forward pass per batch of sequences, never one per candidate.
    """
    seqs: list[tuple[int, int, list[int], int]] = []  # (item, cand, ids, prompt_len)
    first_answer_tok: dict[int, int] = {}  # item -> index of the gold answer's first token
    for n, it in enumerate(items):
        p = tok(format_prompt(tok, it.question), add_special_tokens=False)["input_ids"]
        for k, c in enumerate(it.candidates):
            enc = tok(it.response(c), add_special_tokens=False, return_offsets_mapping=True)
            a = enc["input_ids"] + [tok.eos_token_id]
            seqs.append((n, k, p + a, len(p)))
            if k == 0:
                start = it.answer_offset()
                first_answer_tok[n] = next(
                    (j for j, (_, e) in enumerate(enc["offset_mapping"]) if e > start), 0
                )
    K = max(len(it.candidates) for it in items)
    logprob = np.full((len(items), K), -np.inf)
    ftp = np.zeros(len(items))
    gold_rows: dict[int, torch.Tensor] = {}
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][2]))
    for s in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[s:s + batch_size]]
        T = max(len(c[2]) for c in chunk)
        ids = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, (_, _, x, _) in enumerate(chunk):
            ids[b, :len(x)] = torch.tensor(x)
            att[b, :len(x)] = 1
        # Only the continuation positions need vocabulary logits: run the decoder once,
        # then the output projection on those hidden states alone.
        sel_b, sel_t, spans = [], [], []
        for b, (n, k, x, plen) in enumerate(chunk):
            start = len(sel_b)
            sel_b += [b] * (len(x) - plen)
            sel_t += list(range(plen - 1, len(x) - 1))
            spans.append((start, len(sel_b)))
        bi, ti = torch.tensor(sel_b), torch.tensor(sel_t)
        with _amp(precision):
            if _plain_head(model):
                hidden = model.get_decoder()(input_ids=ids, attention_mask=att).last_hidden_state
                logits = model.get_output_embeddings()(hidden[bi, ti])
            else:  # heads with soft-capping or scaling: take the model's own logits
                logits = model(input_ids=ids, attention_mask=att).logits[bi, ti]
        lp = F.log_softmax(logits.float(), dim=-1)  # (sum of continuation lengths, V)
        for (n, k, x, plen), (a, e) in zip(chunk, spans):
            tgt = torch.tensor(x[plen:])
            rows = lp[a:e]  # (L, V)
            tok_lp = rows.gather(1, tgt[:, None]).squeeze(1)
            logprob[n, k] = float(tok_lp.sum())
            if k == 0:
                ftp[n] = float(tok_lp[first_answer_tok[n]].exp())
                gold_rows[n] = rows.clone()
    lengths = np.array([gold_rows[n].shape[0] for n in range(len(items))])
    gold = torch.cat([gold_rows[n] for n in range(len(items))], dim=0)
    return CandidateScores(logprob, ftp, gold, lengths)


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


def bootstrap_ci(values: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (N,), resampling items."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def summarise(values: np.ndarray, n_boot: int, level: float, seed: int) -> dict:
    """``{"value", "ci_low", "ci_high"}`` of the mean of per-item ``values``."""
    lo, hi = bootstrap_ci(values, n_boot, level, seed)
    return {"value": float(np.mean(values)) if len(values) else float("nan"), "ci_low": lo, "ci_high": hi}
