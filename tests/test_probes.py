"""Linear probes: label selection on small sets, cross-validated accuracy on features whose
truth is known, and per-layer results on the tiny model's hidden states."""

from __future__ import annotations

import numpy as np
import pytest

from components.data import Item
from components.linear_probe import cross_validated_correct, layer_probes, probe_labels


def _items(labels: list[str | None]) -> list[Item]:
    return [Item(id=str(i), question="q", answer="a", attributes={} if v is None else {"continent": v})
            for i, v in enumerate(labels)]


def test_labels_drop_singletons_and_fit_folds_to_small_sets():
    items = _items(["EU"] * 6 + ["AF"] * 4 + ["AS"] * 2 + ["OC"] + [None])
    lab = probe_labels(items, "continent", folds=5)
    assert lab.dropped == 2 and len(lab.y) == 12 and lab.n_classes == 3
    assert list(lab.index) == list(range(12))
    assert lab.chance == pytest.approx(6 / 12)  # the majority class's share
    assert lab.folds == 5
    small = probe_labels(_items(["EU", "EU", "AF", "AF", "AS"]), "continent", folds=5)
    assert small.folds == 2  # never more folds than the largest class has items
    assert probe_labels(_items(["EU", "EU", "AF"]), "continent", folds=5) is None  # one class left


def test_probe_reads_a_linear_attribute_and_not_noise():
    rng = np.random.default_rng(0)
    y = np.array(["EU"] * 10 + ["AF"] * 10 + ["AS"] * 10)
    lab = probe_labels(_items(list(y)), "continent", folds=5)
    means = {c: rng.normal(size=16) * 1.5 for c in ("EU", "AF", "AS")}  # the attribute: a class mean
    signal = np.stack([means[c] + rng.normal(size=16) for c in y])
    noise = rng.normal(size=(30, 16))
    assert cross_validated_correct(signal, lab, C=1.0, seed=0).mean() >= 0.9
    assert cross_validated_correct(noise, lab, C=1.0, seed=0).mean() <= 0.6
    per_layer = layer_probes(np.stack([noise, signal], axis=1), lab, C=1.0, seed=0)
    assert set(per_layer) == {0, 1} and per_layer[1].mean() > per_layer[0].mean()
    assert per_layer[1].shape == (30,)
