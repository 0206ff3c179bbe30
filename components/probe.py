"""Probe stage: every per-checkpoint metric of DESIGN.md on one checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from components.config import AuditConfig
from components.data import MATCHERS, SuiteData
from components.metrics import generate_answers, score_candidates, summarise
from components.models import Checkpoint, load_checkpoint


def probe(
    cfg: AuditConfig, ckpt: Checkpoint, data: SuiteData, out_dir: Path,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Measure one checkpoint on the evaluation items (and ``perturb_acc`` on the held-out
    perturbation items).

    ``on_progress(done, total)`` counts scored items over the passes (greedy answers,
    candidate ranking, perturbation answers): ``total = 2 * len(eval) + len(perturb_eval)``.

    Writes into ``out_dir``: ``predictions.parquet`` (one row per evaluation item:
    response, task_correct, the K candidate log-probs, knowledge_correct,
    first_token_prob) and ``ref_logprobs.safetensors`` (the (P, V) teacher-forced
    log-probs of the gold answers, for KL drift against later checkpoints).

    Returns:
        ``{"metrics": {name: {"value", "ci_low", "ci_high"}}, "knowledge_chance": 1/K,
        "per_item": {"task_correct": [...], "knowledge_correct": [...]}}``.
    """
    out_dir = Path(out_dir)
    pc = cfg.probe
    model, tok = load_checkpoint(ckpt, cfg.model.trust_remote_code)
    torch.manual_seed(cfg.seed)
    total = 2 * len(data.eval) + len(data.perturb_eval)
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if on_progress is not None:
            on_progress(done[0], total)

    answers = generate_answers(
        model, tok, data.eval, pc.batch_size, pc.max_new_tokens, cfg.model.precision, on_batch=tick
    )
    task_match = MATCHERS[data.task_matcher]
    task_correct = np.array([task_match(a, it.answer) for a, it in zip(answers, data.eval)], dtype=float)
    scores = score_candidates(model, tok, data.eval, pc.batch_size, cfg.model.precision)
    tick(len(data.eval))
    knowledge_correct = (scores.logprob.argmax(1) == 0).astype(float)
    K = scores.logprob.shape[1]
    p_answers = generate_answers(
        model, tok, data.perturb_eval, pc.batch_size, pc.max_new_tokens, cfg.model.precision, on_batch=tick
    )
    p_match = MATCHERS[data.perturb_matcher]
    perturb_correct = np.array([p_match(a, it.answer) for a, it in zip(p_answers, data.perturb_eval)], dtype=float)

    boot = dict(n_boot=pc.n_bootstrap, level=pc.ci_level, seed=cfg.seed)
    metrics = {
        "task_acc": summarise(task_correct, **boot),
        "knowledge_acc": summarise(knowledge_correct, **boot),
        "first_token_prob": summarise(scores.first_token_prob, **boot),
        "perturb_acc": summarise(perturb_correct, **boot),
    }
    preds = pd.DataFrame({
        "item_id": [it.id for it in data.eval],
        "question": [it.question for it in data.eval],
        "expected": [it.answer for it in data.eval],
        "response": answers,
        "task_correct": task_correct.astype(bool),
        "candidates": [list(it.candidates) for it in data.eval],
        "candidate_logprobs": [list(map(float, r)) for r in scores.logprob],
        "knowledge_correct": knowledge_correct.astype(bool),
        "first_token_prob": scores.first_token_prob,
        "answer_tokens": scores.gold_lengths,
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    preds.to_parquet(out_dir / "predictions.parquet", index=False)
    save_file({"logprobs": scores.gold_logprobs.contiguous()}, str(out_dir / "ref_logprobs.safetensors"))
    result = {
        "checkpoint": ckpt.name,
        "metrics": metrics,
        "knowledge_chance": 1.0 / K,
        "per_item": {
            "task_correct": task_correct.tolist(),
            "knowledge_correct": knowledge_correct.tolist(),
            "first_token_prob": scores.first_token_prob.tolist(),
        },
        "answer_tokens": scores.gold_lengths.tolist(),
        "perturb_responses": p_answers,
    }
    (out_dir / "probe.json").write_text(json.dumps(result, indent=1))
    return result


def load_ref_logprobs(probe_dir: Path) -> torch.Tensor:
    """The (P, V) gold-answer log-probs a probe saved (safetensors, no pickle)."""
    return load_file(str(Path(probe_dir) / "ref_logprobs.safetensors"))["logprobs"]
