"""Weight drift: where each stage's update went, and how it lies against the tune update.

For a stage that turned checkpoint P into checkpoint C, per layer l::

    weight_drift[l] = ||dW_l||_F / ||W_l||_F,   dW_l = W_l(C) - W_l(P)

over the layer's weight matrices (for a decoder block: all of its linear layers; layer 0
is the token embedding matrix), with W_l(P) the weights the stage started from. A LoRA
update is ``dW = scale * B @ A`` per module (``scale = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA), read from the adapter's safetensors: no model is
loaded, and no two full models are held at once. A full update (full fine-tuning, or the
``reinit`` perturbation) is the difference of the two weight sets, read tensor by tensor.

Principal angles (Zheng et al. 2025, arXiv 2501.13453, who connect spurious forgetting to
the orthogonality of the new task's weight updates to the old ones): per module, the
angles between the column spaces (output directions) of the perturb update and of the
tune update, each spanned by its ``k`` leading left singular vectors
(``k = min(rank_1, rank_2, angle_rank)``); theta_i = arccos(sigma_i(U_1^T U_2)), in
degrees. 0 = the updates write into the same directions, 90 = orthogonal. For reference,
two random k-dimensional subspaces of R^d with k << d lie near 90 degrees.

These are exact properties of the weights, not estimates over items: they carry no
bootstrap interval.

Layer numbering as in :mod:`components.linear_probe`: 0 = embeddings, l = the l-th
decoder block (1-based).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from components.models import Checkpoint

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)embed_tokens\.weight$")
_PEFT_PREFIX = "base_model.model."


def layer_of(key: str) -> int | None:
    """Layer number of a weight name: ``model.layers.3.mlp.up_proj.weight`` -> 4, the
    embeddings -> 0, anything else (final norm, a separate output head) -> None."""
    m = _BLOCK.search(key)
    if m:
        return int(m.group(1)) + 1
    return 0 if _EMBED.search(key) else None


class WeightReader:
    """Lazy, tensor-by-tensor access to a transformers directory's safetensors weights."""

    def __init__(self, model_dir: str | Path):
        self.files: dict[str, Path] = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.files[k] = f
        self._last: tuple[str, torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, key: str) -> torch.Tensor:
        """One tensor as float32 (the last one read is kept: views of several
        checkpoints over the same weights read each tensor once)."""
        if self._last is None or self._last[0] != key:
            with safe_open(str(self.files[key]), framework="pt") as h:
                self._last = (key, h.get_tensor(key).float())
        return self._last[1]


@dataclass
class LowRank:
    """``dW = left @ right``: left (out, r), right (r, in)."""

    left: torch.Tensor
    right: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.left @ self.right


def adapter_updates(adapter_dir: str | Path) -> dict[str, LowRank]:
    """The weight update of every module of a peft LoRA adapter.

    Returns:
        ``{base weight name: LowRank}`` with ``left = B`` (out, r) and
        ``right = scale * A`` (r, in); the name is as in the base model's safetensors
        (``model.layers.0.self_attn.q_proj.weight``).

    Raises:
        ValueError: an adapter that is not LoRA.
    """
    adapter_dir = Path(adapter_dir)
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir}: not a LoRA adapter ({conf.get('peft_type')})")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    alpha_pattern = conf.get("alpha_pattern") or {}
    out = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        B = tensors[module + ".lora_B.weight"].float()
        name = module.removeprefix(_PEFT_PREFIX)
        r = A.shape[0]
        alpha = next((v for pat, v in alpha_pattern.items() if name.endswith(pat)), conf.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
        out[name + ".weight"] = LowRank(B, A.float() * scale)
    return out


class WeightView:
    """The effective weights of a :class:`Checkpoint`: its base (or full) weights with
    every adapter's update added, one tensor at a time."""

    def __init__(self, ckpt: Checkpoint, readers: dict[str, WeightReader], updates: dict[str, dict]):
        src = ckpt.full_dir or ckpt.base_dir
        if src not in readers:
            readers[src] = WeightReader(src)
        self.reader = readers[src]
        self.src = src
        for a in ckpt.adapters:
            if a not in updates:
                updates[a] = adapter_updates(a)
        self.adapters = [updates[a] for a in ckpt.adapters]

    def get(self, key: str) -> torch.Tensor:
        w = self.reader.get(key)
        for upd in self.adapters:
            if key in upd:
                w = w + upd[key].dense()
        return w


def stage_update(parent: Checkpoint, child: Checkpoint, readers: dict, updates: dict):
    """How ``child`` differs from ``parent``: ``("lora", {key: LowRank})`` for adapters
    stacked on the same weights, ``("full", None)`` for different full weights, or
    ``("none", {})`` when the child is the parent (``perturb.kind: none``)."""
    if (child.full_dir or None) == (parent.full_dir or None) and child.adapters[: len(parent.adapters)] == parent.adapters:
        new = child.adapters[len(parent.adapters):]
        if not new:
            return "none", {}
        merged: dict[str, list[LowRank]] = {}
        for a in new:
            if a not in updates:
                updates[a] = adapter_updates(a)
            for k, v in updates[a].items():
                merged.setdefault(k, []).append(v)
        return "lora", {
            k: LowRank(torch.cat([u.left for u in v], 1), torch.cat([u.right for u in v], 0)) for k, v in merged.items()
        }
    return "full", None


def left_basis(delta: LowRank | torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal basis (out, k') of the ``k`` leading left singular directions of an
    update (k' <= k: directions with a singular value below 1e-6 of the largest dropped)."""
    if isinstance(delta, LowRank):
        q, r = torch.linalg.qr(delta.left.double())
        u, s, _ = torch.linalg.svd(r @ delta.right.double(), full_matrices=False)
        u = q @ u
    else:
        u, s, _ = torch.linalg.svd(delta.float(), full_matrices=False)
    u = u.double()
    if len(s) == 0 or s[0] <= 0:
        return u[:, :0]
    keep = int(min(k, int((s > s[0] * 1e-6).sum())))
    return u[:, :keep]


def principal_angles(u1: torch.Tensor, u2: torch.Tensor) -> np.ndarray:
    """Principal angles (degrees, ascending) between the spans of two orthonormal bases
    (out, k1), (out, k2): arccos of the singular values of ``u1^T u2``."""
    if u1.shape[1] == 0 or u2.shape[1] == 0:
        return np.array([])
    s = torch.linalg.svdvals(u1.T @ u2).clamp(-1, 1)
    return np.degrees(np.arccos(s.numpy()))


def weight_drift_report(
    checkpoints: dict[str, Checkpoint],
    parent_of: dict[str, str],
    angle_pair: tuple[str, str] | None = ("perturbed", "aligned"),
    angle_rank: int = 8,
) -> dict:
    """Per-layer relative drift of every stage's update, and principal angles between
    two stages' updates.

    Args:
        checkpoints: stage name -> checkpoint (``base``, ``aligned``, ...).
        parent_of: stage name -> the stage it was trained from (stages without a parent
            get no drift).
        angle_pair: the two stages whose updates are compared (the perturb update and the
            tune update by default).
        angle_rank: leading singular directions per update (see module docstring).

    Returns:
        ``{"weight_drift": {stage: {layer: value}}, "update_norm": {stage: {layer:
        ||dW_l||_F}}, "update_kind": {stage: "lora"|"full"|"none"},
        "principal_angle_mean": {layer: degrees}, "principal_angle_min": {layer: degrees}}``
        (layers as ``int``; the angle maps are empty when either update is empty).
    """
    readers: dict[str, WeightReader] = {}
    updates: dict[str, dict] = {}
    views = {name: WeightView(c, readers, updates) for name, c in checkpoints.items()}
    kinds, lowrank = {}, {}
    for name, parent in parent_of.items():
        kinds[name], lowrank[name] = stage_update(checkpoints[parent], checkpoints[name], readers, updates)
    root = next(n for n in checkpoints if n not in parent_of)
    keys = [k for k in views[root].reader.keys() if layer_of(k) is not None]
    sq_delta = {name: {} for name in parent_of}
    sq_ref = {name: {} for name in parent_of}
    angles: dict[int, list[np.ndarray]] = {}
    for key in keys:
        layer = layer_of(key)
        cache: dict[str, torch.Tensor] = {}

        def weights(stage: str) -> torch.Tensor:
            if stage not in cache:
                cache[stage] = views[stage].get(key)
            return cache[stage]

        if weights(root).dim() != 2:
            continue
        deltas: dict[str, LowRank | torch.Tensor | None] = {}
        for name, parent in parent_of.items():
            ref = weights(parent)
            if kinds[name] == "lora":
                d = lowrank[name].get(key)
            elif kinds[name] == "full":
                d = weights(name) - ref
            else:
                d = None
            deltas[name] = d
            dn = 0.0 if d is None else float(torch.linalg.matrix_norm(d.dense() if isinstance(d, LowRank) else d) ** 2)
            sq_delta[name][layer] = sq_delta[name].get(layer, 0.0) + dn
            sq_ref[name][layer] = sq_ref[name].get(layer, 0.0) + float(torch.linalg.matrix_norm(ref) ** 2)
        if angle_pair and all(deltas.get(s) is not None for s in angle_pair):
            u1, u2 = (left_basis(deltas[s], angle_rank) for s in angle_pair)
            k = min(u1.shape[1], u2.shape[1])
            th = principal_angles(u1[:, :k], u2[:, :k])
            if len(th):
                angles.setdefault(layer, []).append(th)
    drift = {
        name: {layer: math.sqrt(sq_delta[name][layer]) / math.sqrt(sq_ref[name][layer]) if sq_ref[name][layer] > 0
               else None for layer in sorted(sq_delta[name])}
        for name in parent_of
    }
    norms = {name: {layer: math.sqrt(v) for layer, v in sorted(sq_delta[name].items())} for name in parent_of}
    return {
        "weight_drift": drift,
        "update_norm": norms,
        "update_kind": kinds,
        "principal_angle_mean": {layer: float(np.mean([t.mean() for t in v])) for layer, v in sorted(angles.items())},
        "principal_angle_min": {layer: float(min(t.min() for t in v)) for layer, v in sorted(angles.items())},
    }
