"""Recover stage: train the perturbed model on n examples of one arm, or (the
``in_context`` arm) give the n in-task examples as few-shot chat turns before every
question, with no weight update.

In-context recovery separates the two parts of a task's performance the audit asks
about: the examples change no weight, so when the task returns in context the facts it
draws on were still in the weights and only the disposition to use them was lost
(transient adaptation in context, persistent behaviour in the weights, as Fast-Slow
Training puts it). docs/metrics.md, "Recovery in context", says how it enters the verdict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from components.config import AuditConfig
from components.data import Item, SuiteData
from components.errors import UserError
from components.models import Checkpoint

if TYPE_CHECKING:  # torch is imported by the training stages, not by the audit's driver
    from components.training import TrainSpec


def recovery_set(data: SuiteData, arm: str, n: int) -> list[Item]:
    """The first ``n`` items of the arm's pool: ``in_task`` (the task on items disjoint
    from every evaluation item), ``in_context`` (the same n items as ``in_task``, given
    as few-shot turns) or ``irrelevant`` (an unrelated task).

    Raises:
        UserError: ``n`` larger than the pool.
    """
    pool = {"in_task": data.recover, "in_context": data.recover, "irrelevant": data.irrelevant}[arm]
    if n > len(pool):
        raise UserError(f"recover.sizes: {n} is larger than the {arm} recovery pool ({len(pool)} items)")
    return pool[:n]


def recover_spec(cfg: AuditConfig, perturbed: Checkpoint, data: SuiteData, arm: str, n: int) -> TrainSpec:
    """What the recover stage trains: ``perturbed`` on ``n`` items of ``arm`` with ``cfg.recover``.

    Raises:
        UserError: ``n`` larger than the arm's pool.
    """
    from components.training import TrainSpec

    return TrainSpec(f"recovered/{arm}/{n}", perturbed, recovery_set(data, arm, n), cfg.recover, cfg.seed + 2,
                     cfg.model.precision, cfg.model.trust_remote_code)


IN_CONTEXT = "in_context"


def few_shot_turns(items: list[Item]) -> list[dict[str, str]]:
    """The ``in_context`` arm's prefix: each recovery item as a user turn (its question,
    after its own earlier turns) and an assistant turn (its full response, the training
    target of the ``in_task`` arm), in order. ``2 * n`` turns or more."""
    turns: list[dict[str, str]] = []
    for it in items:
        turns += [*(it.context or []), {"role": "user", "content": it.question},
                  {"role": "assistant", "content": it.response()}]
    return turns


def with_context(items: list[Item], turns: list[dict[str, str]]) -> list[Item]:
    """Copies of ``items`` whose prompts start with ``turns`` (before each item's own
    earlier turns)."""
    from dataclasses import replace

    return [replace(it, context=[*turns, *(it.context or [])]) for it in items]


def in_context_data(data: SuiteData, turns: list[dict[str, str]]) -> SuiteData:
    """``data`` with the few-shot ``turns`` before every evaluation and
    perturbation-evaluation prompt: what the probe of an ``in_context`` stage measures."""
    from dataclasses import replace

    return replace(data, eval=with_context(data.eval, turns), perturb_eval=with_context(data.perturb_eval, turns))


def context_length(model_dir) -> int | None:
    """The model's context length in tokens: ``max_position_embeddings`` of its
    ``config.json`` (``n_positions`` or ``max_sequence_length`` where a model names it so);
    None when the config states none."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = {**cfg.get("text_config", {}), **cfg}
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(cfg.get(k), int) and cfg[k] > 0:
            return int(cfg[k])
    return None


def check_in_context_fits(tok, limit: int | None, data: SuiteData, sizes: list[int], max_new_tokens: int) -> dict:
    """Check, before any work, that the ``in_context`` arm's longest prompt fits the
    model's context length for every n of ``sizes``.

    A prompt is the n few-shot turns (:func:`few_shot_turns`) and one question (every
    evaluation and perturbation-evaluation question, and every knowledge phrasing with
    its longest candidate continuation), chat-formatted; generation adds
    ``max_new_tokens``.

    Args:
        tok: the model's tokenizer.
        limit: the context length in tokens (:func:`context_length`); None: not checked.
        sizes: the n to check.

    Returns:
        ``{n: tokens needed}`` for every n (all fit).

    Raises:
        UserError: one line naming the first n that does not fit, the tokens it needs
            and the limit: ``recover.sizes: in_context with n=12 needs 300 tokens ... more
            than the model's context length 256 (config.json max_position_embeddings)``.
    """
    from components.training import format_prompt

    def length(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    need: dict[int, int] = {}
    pool = data.eval + data.perturb_eval
    if not pool:
        return need
    # the question / phrasing with the longest prompt is the same for every prefix: find it once
    gen = max(pool, key=lambda it: length(format_prompt(tok, it.question, it.context)))
    ranked = []
    for it in data.eval:  # the knowledge ranking: each phrasing with its longest candidate continuation
        for q, t in it.knowledge_phrasings():
            cont = max((length(t.replace("{answer}", c)) for c in it.candidates or [it.answer]), default=0)
            ranked.append((q, it.context, cont))
    ranked = sorted(ranked, key=lambda r: length(format_prompt(tok, r[0], r[1])) + r[2])[-1:]  # the longest
    for n in sorted(sizes):
        turns = few_shot_turns(recovery_set(data, IN_CONTEXT, n))
        tokens = length(format_prompt(tok, gen.question, [*turns, *(gen.context or [])])) + max_new_tokens
        for q, ctx, cont in ranked:
            tokens = max(tokens, length(format_prompt(tok, q, [*turns, *(ctx or [])])) + cont + 1)
        need[n] = tokens
        if limit is not None and tokens > limit:
            raise UserError(
                f"recover.sizes: in_context with n={n} needs {tokens} tokens (the {n} recovery examples as few-shot "
                f"turns, the longest question and probe.max_new_tokens={max_new_tokens}), more than the model's "
                f"context length {limit} (config.json max_position_embeddings); lower the sizes or leave in_context "
                "out of recover.arms"
            )
    return need
