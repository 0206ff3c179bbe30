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
from components.faults import failpoint
from components.linear_probe import layer_probes, probe_labels, prompt_features
from components.knowledge import MEASURES, measure_knowledge
from components.metrics import generate_answers, summarise
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
    response, task_correct, the K candidate log-probs averaged over the knowledge
    phrasings, knowledge_correct (right in at least half of them), every knowledge
    measure of :mod:`components.knowledge`, first_token_prob),
    ``ref_logprobs.safetensors`` (the (P, V) teacher-forced log-probs of the gold
    answers in each item's first knowledge phrasing, for KL drift; written batch by
    batch, so the probe's memory does not grow with P x V) and
    ``features.safetensors`` (the (N, L+1, H) pooled prompt hidden states the linear
    probes were fitted on).

    A suite may add metrics: a breakdown of ``task_acc`` over the items with an
    attribute value (``SuiteData.task_breakdown``: the refusal suite's ``refusal_rate``
    and ``benign_answer_rate``), in ``metrics`` beside the standard ones; and its probe
    may keep a group's items in one fold (``SuiteData.probe_group``).

    Returns:
        ``{"metrics": {name: {"value", "ci_low", "ci_high"}}, "knowledge_chance": 1/K,
        "knowledge_chances": {measure: chance level},
        "probe_acc": {layer: {"value", "ci_low", "ci_high"}}, "probe": {attribute,
        chance, n_items, n_classes, folds, pooling, dropped}, "per_item":
        {"task_correct": [...], "knowledge_correct": [...], <each knowledge measure>: [...],
        "groups": cluster of each item or None, "probe_correct": {layer: [...]}}}``
        (CIs by item, or by cluster where items share a subject, ``SuiteData.clusters``)
        (``probe_acc`` empty and ``probe`` None when the suite names no attribute or
        the evaluation items hold fewer than two classes of two items).
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
    out_dir.mkdir(parents=True, exist_ok=True)
    # the KL reference rows go to disk batch by batch: memory O(batch x vocabulary)
    scores = measure_knowledge(model, tok, data.eval, data.answer_pools, pc.batch_size, cfg.model.precision,
                               pc.rank_depth, pc.rank_budget, gold_file=out_dir / "ref_logprobs.safetensors")
    tick(len(data.eval))
    failpoint(f"probe:{ckpt.name}")
    knowledge = scores.per_item
    knowledge_correct = knowledge["knowledge_acc"]
    groups = data.clusters()
    p_answers = generate_answers(
        model, tok, data.perturb_eval, pc.batch_size, pc.max_new_tokens, cfg.model.precision, on_batch=tick
    )
    p_match = MATCHERS[data.perturb_matcher]
    perturb_correct = np.array([p_match(a, it.answer) for a, it in zip(p_answers, data.perturb_eval)], dtype=float)

    # Linear probes per layer on the prompts' hidden states (Zhang, Choshen & Andreas 2024)
    features = prompt_features(model, tok, data.eval, pc.batch_size, pc.probe_pooling, cfg.model.precision)
    labels = (probe_labels(data.eval, data.probe_attribute, pc.probe_folds, data.probe_group)
              if data.probe_attribute else None)
    probe_correct = layer_probes(features, labels, pc.probe_c, cfg.seed) if labels is not None else {}

    boot = dict(n_boot=pc.n_bootstrap, level=pc.ci_level, seed=cfg.seed)
    metrics = {
        "task_acc": summarise(task_correct, **boot, groups=groups),
        **{m: summarise(knowledge[m], **boot, groups=groups) for m in MEASURES},
        "first_token_prob": summarise(scores.first_token_prob, **boot, groups=groups),
        "perturb_acc": summarise(perturb_correct, **boot),
    }
    # The suite's breakdown of task_acc (refusal: refusal_rate on violating requests,
    # benign_answer_rate on benign ones), each over its own items.
    for name, (attr, value) in data.task_breakdown.items():
        sel = np.array([it.attributes.get(attr) == value for it in data.eval])
        if sel.any():
            metrics[name] = summarise(task_correct[sel], **boot,
                                      groups=None if groups is None else [g for g, k in zip(groups, sel) if k])
    preds = pd.DataFrame({
        "item_id": [it.id for it in data.eval],
        "question": [it.question for it in data.eval],
        "expected": [it.answer for it in data.eval],
        "response": answers,
        "task_correct": task_correct.astype(bool),
        "candidates": [list(it.candidates) for it in data.eval],
        "candidate_logprobs": [list(map(float, r)) for r in scores.candidate_logprobs],
        "knowledge_correct": knowledge_correct >= 0.5,
        **{m: knowledge[m] for m in MEASURES},
        "n_phrasings": scores.n_phrasings.astype(int),
        "rank_exact": scores.rank_exact,
        "first_token_prob": scores.first_token_prob,
        "answer_tokens": scores.gold_lengths,
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    preds.to_parquet(out_dir / "predictions.parquet", index=False)
    save_file({"features": torch.from_numpy(features).contiguous()}, str(out_dir / "features.safetensors"))
    result = {
        "checkpoint": ckpt.name,
        "metrics": metrics,
        "knowledge_chance": scores.chance["knowledge_acc"],
        "knowledge_chances": scores.chance,
        "probe_acc": {str(layer): summarise(c, **boot) for layer, c in probe_correct.items()},
        "probe": None if labels is None else {
            "attribute": data.probe_attribute, "chance": labels.chance, "n_items": int(len(labels.y)),
            "n_classes": labels.n_classes, "folds": labels.folds, "pooling": pc.probe_pooling,
            "dropped": labels.dropped, "item_ids": [data.eval[i].id for i in labels.index],
        },
        "per_item": {
            "task_correct": task_correct.tolist(),
            "knowledge_correct": knowledge_correct.tolist(),
            **{m: knowledge[m].tolist() for m in MEASURES},
            "groups": groups,
            "first_token_prob": scores.first_token_prob.tolist(),
            "probe_correct": {str(layer): c.tolist() for layer, c in probe_correct.items()},
        },
        "answer_tokens": scores.gold_lengths.tolist(),
        "perturb_responses": p_answers,
    }
    (out_dir / "probe.json").write_text(json.dumps(result, indent=1))
    return result


def load_ref_logprobs(probe_dir: Path) -> torch.Tensor:
    """The (P, V) gold-answer log-probs a probe saved (safetensors, no pickle)."""
    return load_file(str(Path(probe_dir) / "ref_logprobs.safetensors"))["logprobs"]
