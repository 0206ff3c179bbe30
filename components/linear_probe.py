"""Linear probes: is an item attribute linearly decodable from a checkpoint's hidden states?

Following Zhang, Choshen & Andreas 2024 ("Unforgettable Generalization in Language
Models", arXiv 2409.02228), knowledge that a model no longer *expresses* can still be
read from its representations by a linear probe. Here, for each checkpoint and each
layer, a logistic regression (scikit-learn) predicts an attribute the suite names
(``Suite.probe_attribute``, e.g. the continent of a country for ``capitals``) from the
hidden states of the evaluation prompts, and is scored by cross-validation.

Layer numbering (also of ``weight_drift``): 0 = the token embeddings, l = the output of
the l-th decoder block (1-based), i.e. the index into transformers' ``hidden_states``
(whose last entry is taken after the final normalisation, as transformers returns it).

Small evaluation sets (16-40 items, a handful of classes) shape the protocol:

- classes with a single item are left out (a probe that never saw a class cannot
  predict it; counting those items would measure the split, not the representation);
- stratified, shuffled K-fold with K = min(``probe_folds``, the largest class's size),
  so every class with >= 2 items is in every training split;
- each item is predicted once, by the probe fitted without it (``cross_val_predict``),
  so per-item correctness gives a bootstrap CI over items like every other metric;
- chance level = the majority class's share of the probed items;
- items that belong together (``Suite.probe_group``: the six questions about one
  person in ``biography``) stay in one fold (scikit-learn's ``StratifiedGroupKFold``),
  so a probe cannot score by recognising the person rather than reading the attribute;
  then a class needs items of two groups, and K is at most the groups of the largest
  class.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from components.data import Item
from components.training import format_prompt


@torch.no_grad()
def prompt_features(
    model, tok, items: list[Item], batch_size: int, pooling: str = "last", precision: str = "fp32"
) -> np.ndarray:
    """Hidden states of each item's chat-formatted prompt, pooled per layer.

    Args:
        items: N items; the prompt is ``format_prompt(tok, item.question, item.context)``.
        pooling: ``last`` (the last prompt token) or ``mean`` (mean over the prompt's
            tokens, padding excluded).

    Returns:
        (N, L+1, H) float32 array: layer 0 = embeddings, l = after decoder block l.
    """
    from components.metrics import _amp

    tok.padding_side = "left"
    prompts = [format_prompt(tok, it.question, it.context) for it in items]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[np.ndarray | None] = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        att = enc["attention_mask"]
        pos = (att.cumsum(1) - 1).clamp(min=0)
        net = model.get_decoder() if hasattr(model, "get_decoder") else model  # no vocabulary logits needed
        with _amp(precision):
            hs = net(input_ids=enc["input_ids"], attention_mask=att, position_ids=pos,
                     output_hidden_states=True).hidden_states
        h = torch.stack([x.float() for x in hs], dim=1)  # (B, L+1, T, H)
        if pooling == "last":
            pooled = h[:, :, -1, :]  # left padding: the last position is the last real token
        else:
            m = att[:, None, :, None].float()
            pooled = (h * m).sum(2) / m.sum(2)
        for b, i in enumerate(idx):
            out[i] = pooled[b].numpy()
    return np.stack(out)


@dataclass
class ProbeLabels:
    """The items a probe is scored on and their classes.

    Attributes:
        index: (M,) positions, in the evaluation set, of the probed items.
        y: (M,) class label per probed item.
        chance: majority-class share of ``y`` (the chance level).
        folds: cross-validation folds used.
        dropped: items left out (missing attribute or a class with one item, or with
            one group).
        groups: (M,) group per probed item (kept in one fold), or None.
    """

    index: np.ndarray
    y: np.ndarray
    chance: float
    folds: int
    dropped: int
    groups: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        return len(set(self.y.tolist()))


def probe_labels(items: list[Item], attribute: str, folds: int, group: str | None = None) -> ProbeLabels | None:
    """Select the probed items and their labels; None when fewer than two classes have
    two or more items (with ``group``: items of two or more groups), so that no probe
    can be scored.

    Args:
        group: item attribute whose value keeps items together in one fold (None: none).
    """
    values = [it.attributes.get(attribute) or None for it in items]
    if group is None:
        units = {v: Counter(i for i, x in enumerate(values) if x == v) for v in set(values) if v is not None}
    else:
        units = {v: Counter(items[i].attributes.get(group) for i, x in enumerate(values) if x == v)
                 for v in set(values) if v is not None}
    ok = {v for v, u in units.items() if len(u) >= 2}
    keep = [i for i, v in enumerate(values) if v in ok]
    y = np.array([values[i] for i in keep])
    kept = Counter(y.tolist())
    if len(kept) < 2:
        return None
    k = max(2, min(folds, max(len(units[v]) for v in ok)))
    groups = None if group is None else np.array([str(items[i].attributes.get(group)) for i in keep])
    return ProbeLabels(np.array(keep), y, max(kept.values()) / len(y), k, len(items) - len(keep), groups)


def cross_validated_correct(X: np.ndarray, labels: ProbeLabels, C: float, seed: int) -> np.ndarray:
    """Per-item correctness of a cross-validated logistic-regression probe.

    Args:
        X: (M, H) features of the probed items (rows in ``labels.index`` order).
        C: inverse L2 regularisation strength (features are standardised first).

    Returns:
        (M,) 1.0 where the probe fitted without the item (and without its group,
        when ``labels.groups`` is set) predicts its class, else 0.0.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    if labels.groups is None:
        cv = StratifiedKFold(n_splits=labels.folds, shuffle=True, random_state=seed)
    else:
        cv = StratifiedGroupKFold(n_splits=labels.folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only n members": expected with small sets
        warnings.simplefilter("ignore", UserWarning)
        pred = cross_val_predict(clf, X, labels.y, cv=cv, groups=labels.groups)
    return (pred == labels.y).astype(float)


def layer_probes(features: np.ndarray, labels: ProbeLabels, C: float, seed: int) -> dict[int, np.ndarray]:
    """Cross-validated probe correctness at every layer.

    Args:
        features: (N, L+1, H) from :func:`prompt_features` (all evaluation items).

    Returns:
        ``{layer: (M,) per-item correctness}`` for layers 0..L.
    """
    X = features[labels.index]
    return {layer: cross_validated_correct(X[:, layer, :], labels, C, seed) for layer in range(X.shape[1])}
