"""Checkpoints the user already has, standing in for the tune and perturb stages
(``--aligned REF``, ``--perturbed REF``; config ``stages.<stage>.from``; issue 17).

A given stage is not trained: its checkpoint is the user's weights, and its store key is
the digest of those weights (their content, not their path), so every probe, the KL and
weight drift and every recovery arm run from it through the store as usual. Before any
work, :func:`check_given` compares each given checkpoint with the audit's base model
(architecture, hidden size, layer count, vocabulary, tokenizer; an adapter's module
shapes) and refuses, in one line naming both sides, what would not be the same model.

REF kinds (:func:`ref_kind`): ``dir`` (a transformers directory, safetensors weights),
``adapter`` (a peft LoRA adapter directory: ``adapter_config.json`` and
``adapter_model.safetensors``), ``gguf`` (dequantised once, as ``model.id`` is),
``mlflow`` (``runs:/``, ``models:/``: downloaded by the driver from the audit's tracking
store into ``cache/given/``, :func:`mlflow_dir`; this module imports no MLflow) and
``hub`` (``owner/name``, only with ``HF_HUB_OFFLINE=0``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from components.artifacts import sha256_file
from components.config import AuditConfig, stable_hash
from components.errors import UserError

FLAGS = {"aligned": "--aligned", "perturbed": "--perturbed"}
MLFLOW_SCHEMES = ("runs:/", "models:/")
# a probe string for the tokenizer check: letters, digits, punctuation, a non-ASCII word
TOKENIZER_PROBE = "The capital of Burkina Faso is Ouagadougou (pop. 2,415,266) — naïve café 42."
_PEFT_PREFIX = "base_model.model."


@dataclass
class Given:
    """A resolved REF: what the user gave and the local directory it is now.

    Attributes:
        stage: ``aligned`` or ``perturbed``.
        ref: REF as given (path, URI or hub id).
        kind: ``dir``, ``adapter``, ``gguf``, ``mlflow`` or ``hub`` (:func:`ref_kind`).
        path: the local directory read (for ``gguf`` the converted copy, for
            ``mlflow`` the downloaded one).
        adapter: True when ``path`` is a peft LoRA adapter.
    """

    stage: str
    ref: str
    kind: str
    path: Path
    adapter: bool

    @property
    def flag(self) -> str:
        return FLAGS[self.stage]


def ref_kind(ref: str) -> str:
    """What a REF names: ``mlflow``, ``adapter``, ``dir``, ``gguf``, ``hub``, ``file`` (another
    file: refused) or ``missing``."""
    from components.models import HUB_ID

    if ref.startswith(MLFLOW_SCHEMES):
        return "mlflow"
    path = Path(ref).expanduser()
    if path.is_dir():
        return "adapter" if (path / "adapter_config.json").exists() else "dir"
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if not path.exists() and HUB_ID.match(ref) and not ref.startswith((".", "~", "/")):
        return "hub"
    return "file" if path.exists() else "missing"


def mlflow_dir(cache_dir: Path, ref: str) -> Path:
    """Where the driver puts the download of an MLflow model URI (``cache/given/mlflow-<hash
    of the URI>``); the driver downloads it again at the start of every audit, so an alias
    that moved is followed (the stage's key is the downloaded weights' digest)."""
    return Path(cache_dir) / "given" / f"mlflow-{stable_hash(ref, 16)}"


def _find_model_dir(root: Path) -> Path | None:
    """``root`` or the folder below it (at most two levels) holding an adapter or a
    transformers model: what MLflow logged, whatever artifact path it was logged under."""
    for depth in range(3):
        for d in sorted([root] if depth == 0 else root.glob("/".join(["*"] * depth))):
            if d.is_dir() and ((d / "adapter_config.json").exists() or (d / "config.json").exists()):
                return d
    return None


def resolve(stage: str, ref: str, cache_dir: Path, ) -> Given:
    """Resolve a REF to a local directory and check what can be checked without the base
    model: it exists, holds safetensors weights (a pickle-only ``.bin`` checkpoint is
    refused), is a causal LM, or is a LoRA adapter.

    Raises:
        UserError: one line naming the flag and REF: a missing path; an MLflow URI not
            downloaded (the driver downloads it first); a hub id while ``HF_HUB_OFFLINE``
            is set; pickle-only weights; a config whose architecture is no causal LM;
            an adapter that is not LoRA.
    """
    from components.models import fetch_hub_model, hub_offline, materialise_gguf

    flag = FLAGS[stage]
    kind = ref_kind(ref)
    if kind == "missing":
        raise UserError(f"{flag} {ref}: no such file or directory; expected a transformers model directory, a peft "
                        "adapter directory, a .gguf file, an MLflow model URI (runs:/..., models:/...) or a hub id")
    if kind == "file":
        raise UserError(f"{flag} {ref}: a file; expected a transformers model directory, a peft adapter directory "
                        "or a .gguf file (give the folder that holds config.json or adapter_config.json)")
    if kind == "mlflow":
        found = _find_model_dir(mlflow_dir(cache_dir, ref))
        if found is None:
            raise UserError(f"{flag} {ref}: the MLflow model holds no adapter_config.json or config.json "
                            "(expected a logged transformers directory or peft adapter)")
        path = found
    elif kind == "hub":
        if hub_offline():
            raise UserError(f"{flag} {ref}: looks like a Hugging Face Hub id, but HF_HUB_OFFLINE is set; set "
                            "HF_HUB_OFFLINE=0 to download it, or give a local directory, .gguf file, adapter or "
                            "MLflow model URI")
        try:
            path = fetch_hub_model(ref, Path(cache_dir))
        except UserError as e:
            raise UserError(f"{flag} {str(e).removeprefix('model.id: ')}") from None
    elif kind == "gguf":
        try:
            path = materialise_gguf(Path(ref).expanduser(), Path(cache_dir))
        except UserError as e:
            raise UserError(f"{flag} {str(e).removeprefix('model.id: ')}") from None
    else:
        path = Path(ref).expanduser().resolve()
    adapter = (path / "adapter_config.json").exists()
    shown = ref if kind in ("mlflow", "hub") else str(path)
    if adapter:
        _check_adapter_files(flag, shown, path)
    else:
        _check_model_files(flag, shown, path)
    return Given(stage, ref, kind, path, adapter)


def _read_json(flag: str, shown: str, f: Path) -> dict:
    try:
        out = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {shown}: {f.name}: not readable JSON ({e})") from None
    if not isinstance(out, dict):
        raise UserError(f"{flag} {shown}: {f.name}: expected a JSON object")
    return out


def _check_model_files(flag: str, shown: str, path: Path) -> None:
    if not (path / "config.json").exists():
        raise UserError(f"{flag} {shown}: expected a transformers model directory (config.json) or a peft adapter "
                        "directory (adapter_config.json)")
    if not list(path.glob("*.safetensors")):
        pickled = list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth"))
        what = f"only pickled weights ({pickled[0].name})" if pickled else "no weights"
        raise UserError(f"{flag} {shown}: {what}; only safetensors weights are loaded "
                        "(re-save with save_pretrained(..., safe_serialization=True))")
    conf = _read_json(flag, shown, path / "config.json")
    if not _is_causal_lm(conf):
        arch = ", ".join(conf.get("architectures") or []) or conf.get("model_type", "?")
        raise UserError(f"{flag} {shown}: {arch} is not a causal language model (expected an architecture "
                        "...ForCausalLM)")


def _is_causal_lm(conf: dict) -> bool:
    archs = conf.get("architectures") or []
    if archs:
        return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return conf.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _check_adapter_files(flag: str, shown: str, path: Path) -> None:
    conf = _read_json(flag, shown, path / "adapter_config.json")
    if conf.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{flag} {shown}: a {conf.get('peft_type')} adapter; only LoRA adapters are audited")
    if conf.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{flag} {shown}: an adapter for {conf.get('task_type')}, not a causal language model "
                        "(task_type CAUSAL_LM)")
    if not (path / "adapter_model.safetensors").exists():
        pickled = (path / "adapter_model.bin").exists()
        what = "only pickled weights (adapter_model.bin)" if pickled else "no adapter_model.safetensors"
        raise UserError(f"{flag} {shown}: {what}; only safetensors weights are loaded "
                        "(re-save with save_pretrained(..., safe_serialization=True))")


def _shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a directory's safetensors files (headers only)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


def _model_label(cfg: AuditConfig) -> str:
    return f"the base model {cfg.model.id}"


def check_given(g: Given, cfg: AuditConfig, base_dir: Path, parent: Given | None = None) -> None:
    """Compare a given checkpoint with the audit's base model, before any work.

    A full checkpoint must have the base's architecture, hidden size, layer count and
    vocabulary size, and, when it carries a tokenizer, give the same token ids on
    :data:`TOKENIZER_PROBE` and on the chat template's rendering (the audit scores
    every checkpoint with the base tokenizer). An adapter must fit the model it is
    applied to (``parent``, a given full aligned checkpoint, else the base): every LoRA
    module must name a weight of that model with the adapter's in and out sizes.

    Raises:
        UserError: one line naming both sides, e.g. ``--perturbed /x: hidden size 576,
            but the base model tiny-llama has 64``.
    """
    shown = g.ref if g.kind in ("mlflow", "hub") else str(g.path)
    label = _model_label(cfg)
    if g.adapter:
        onto = parent.path if parent is not None and not parent.adapter else Path(base_dir)
        onto_label = f"{FLAGS['aligned']} {parent.ref}" if parent is not None and not parent.adapter else label
        conf = _read_json(g.flag, shown, g.path / "adapter_config.json")
        named = conf.get("base_model_name_or_path") or "?"
        base_shapes = _shapes(onto)
        for key, shape in _shapes(g.path).items():
            for part in (".lora_A.", ".lora_B."):
                if part not in key:
                    continue
                module = key.split(part)[0].removeprefix(_PEFT_PREFIX)
                target = base_shapes.get(module + ".weight")
                if target is None:
                    raise UserError(f"{g.flag} {shown}: adapter (for base {named!r}) changes {module}, which "
                                    f"{onto_label} does not have")
                size = shape[1] if part == ".lora_A." else shape[0]
                want = target[1] if part == ".lora_A." else target[0]
                if size != want:
                    side = "input" if part == ".lora_A." else "output"
                    raise UserError(f"{g.flag} {shown}: adapter (for base {named!r}) has {side} size {size} at "
                                    f"{module}, but {onto_label} has {want}")
        return
    mine = _read_json(g.flag, shown, g.path / "config.json")
    base = _read_json("model.id", str(base_dir), Path(base_dir) / "config.json")
    arch = (mine.get("architectures") or [mine.get("model_type")])[0]
    barch = (base.get("architectures") or [base.get("model_type")])[0]
    if arch != barch:
        raise UserError(f"{g.flag} {shown}: architecture {arch}, but {label} is {barch}")
    for key, what in (("hidden_size", "hidden size"), ("num_hidden_layers", "layer count"),
                      ("vocab_size", "vocabulary size")):
        if mine.get(key) != base.get(key):
            raise UserError(f"{g.flag} {shown}: {what} {mine.get(key)}, but {label} has {base.get(key)}")
    _check_tokenizer(g, shown, label, cfg, Path(base_dir))


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _check_tokenizer(g: Given, shown: str, label: str, cfg: AuditConfig, base_dir: Path) -> None:
    """Same ids on the probe string and on the chat template's rendering (skipped when the
    checkpoint carries no tokenizer: the base's is used for every checkpoint)."""
    from components.models import load_tokenizer

    if not _has_tokenizer(g.path):
        return
    mine = load_tokenizer(g.path, cfg.model.trust_remote_code)
    base = load_tokenizer(base_dir, cfg.model.trust_remote_code)
    if len(mine) != len(base):
        raise UserError(f"{g.flag} {shown}: tokenizer of {len(mine)} tokens, but {label} has {len(base)}")
    a = mine(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    b = base(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise UserError(f"{g.flag} {shown}: its tokenizer splits the probe text differently from {label}'s "
                        f"(token {at}: {a[at:at + 1]} vs {b[at:at + 1]})")
    chat = [{"role": "user", "content": TOKENIZER_PROBE}]

    def render(tok) -> list[int] | None:
        if not getattr(tok, "chat_template", None):
            return None
        return tok(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]

    ra, rb = render(mine), render(base)
    if ra != rb:
        what = "has no chat template" if ra is None else ("has a chat template" if rb is None else
                                                          "renders the chat template to other token ids")
        raise UserError(f"{g.flag} {shown}: its tokenizer {what}, unlike {label}'s")


def weights_digest(g: Given) -> str:
    """sha256 (hex) of the weights a given checkpoint adds: every safetensors file of a
    model directory, or an adapter's ``adapter_model.safetensors`` with the
    ``adapter_config.json`` fields that scale it. Content only: the same weights under
    another path or URI have the same digest. Nothing is written into the user's folder."""
    h = hashlib.sha256()
    if g.adapter:
        conf = json.loads((g.path / "adapter_config.json").read_text())
        keep = {k: conf.get(k) for k in ("peft_type", "r", "lora_alpha", "use_rslora", "alpha_pattern",
                                        "rank_pattern", "fan_in_fan_out", "use_dora")}
        h.update(b"adapter")
        h.update(stable_hash(keep, 64).encode())
        h.update(sha256_file(g.path / "adapter_model.safetensors").encode())
    else:
        for f in sorted(g.path.glob("*.safetensors")):
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def resolve_all(cfg: AuditConfig, cache_dir: Path, base_dir: Path | None = None) -> dict[str, Given]:
    """Resolve (and with ``base_dir``, check against the base) every given stage of ``cfg``.

    Raises:
        UserError: as :func:`resolve` and :func:`check_given`.
    """
    out: dict[str, Given] = {}
    for stage, ref in cfg.stages.given().items():
        out[stage] = resolve(stage, ref, cache_dir)
    if base_dir is not None:
        for stage, g in out.items():
            check_given(g, cfg, base_dir, out.get("aligned") if stage == "perturbed" else None)
    return out


def given_result(stage: str, cfg: AuditConfig, cache_dir: Path, parent: dict) -> dict:
    """The stage result of a given (not trained) stage, shaped like a trained one's
    (:func:`components.runner.train`): its checkpoint (an adapter stacked on ``parent``,
    or full weights), no history, and ``given`` (what was given: ``kind``, ``ref``,
    ``path``, ``weights_sha256``) for the provenance. The key is ``given-`` and the
    digest of the weights (an adapter's with its parent's key).

    With ``stage == "aligned"`` and no ``stages.aligned.from``: the base model itself,
    renamed (``kind: base``; its key is the base's, so its probe is the base's).
    """
    from components.models import Checkpoint

    par = Checkpoint(**parent["checkpoint"])
    ref = cfg.stages.given().get(stage)
    if ref is None:  # --perturbed alone: the aligned stage is the model itself
        ckpt = Checkpoint("aligned", par.base_dir, list(par.adapters), par.full_dir, par.digest)
        return {"checkpoint": ckpt.to_dict(), "history": [], "n_items": 0, "seconds": 0.0, "dir": par.base_dir,
                "train_run": {"given": True}, "given": {"kind": "base", "ref": cfg.model.id, "adapter": False}}
    g = resolve(stage, ref, cache_dir)
    wd = weights_digest(g)
    if g.adapter:
        key = "given-" + stable_hash([par.digest, wd], 20)
        ckpt = Checkpoint(stage, par.base_dir, [*par.adapters, str(g.path)], par.full_dir, key)
    else:
        key = "given-" + wd[:20]
        ckpt = Checkpoint(stage, par.base_dir, [], str(g.path), key)
    info = {"kind": g.kind, "ref": ref, "path": str(g.path), "weights_sha256": wd, "adapter": g.adapter}
    if g.adapter:  # what the LoRA update was applied to
        info["applied_to"] = "aligned" if stage == "perturbed" and cfg.stages.aligned.from_ else "base"
    return {"checkpoint": ckpt.to_dict(), "history": [], "n_items": 0, "seconds": 0.0, "dir": str(g.path),
            "train_run": {"given": True}, "given": info}
