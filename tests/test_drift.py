"""Weight drift and principal angles against merged weights and scipy, on a small random Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from components.drift import LowRank, left_basis, principal_angles, weight_drift_report
from components.models import Checkpoint


def _layer(key: str) -> int | None:
    if ".layers." in key:
        return int(key.split(".layers.")[1].split(".")[0]) + 1
    return 0 if key.endswith("embed_tokens.weight") else None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random 2-layer Llama, two LoRA adapters stacked on it (B drawn at random, as after
    training), and the merged weights after each (peft's own merge)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("drift")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(root / "base", safe_serialization=True)
    merged = []
    model = LlamaForCausalLM.from_pretrained(root / "base")
    for i, (r, alpha) in enumerate([(4, 8), (3, 12)]):
        peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        peft.save_pretrained(root / f"adapter{i}", safe_serialization=True)
        model = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(root / "base") if i == 0 else model, root / f"adapter{i}"
        ).merge_and_unload()
        merged.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    base = {k: v.detach().clone() for k, v in LlamaForCausalLM.from_pretrained(root / "base").state_dict().items()}
    ckpts = {
        "base": Checkpoint("base", str(root / "base")),
        "aligned": Checkpoint("aligned", str(root / "base"), [str(root / "adapter0")]),
        "perturbed": Checkpoint("perturbed", str(root / "base"), [str(root / "adapter0"), str(root / "adapter1")]),
    }
    return root, ckpts, base, merged


def _expected_drift(before: dict, after: dict) -> dict[int, float]:
    num, den = {}, {}
    for k, w in before.items():
        lay = _layer(k)
        if lay is None or w.dim() != 2:
            continue
        num[lay] = num.get(lay, 0.0) + float(((after[k] - w) ** 2).sum())
        den[lay] = den.get(lay, 0.0) + float((w ** 2).sum())
    return {lay: (num[lay] / den[lay]) ** 0.5 for lay in num}


def test_lora_drift_equals_merged_weight_difference(setup):
    _, ckpts, base, merged = setup
    rep = weight_drift_report(ckpts, {"aligned": "base", "perturbed": "aligned"}, angle_rank=8)
    assert rep["update_kind"] == {"aligned": "lora", "perturbed": "lora"}
    for name, before, after in (("aligned", base, merged[0]), ("perturbed", merged[0], merged[1])):
        want = _expected_drift(before, after)
        got = rep["weight_drift"][name]
        assert set(got) == {0, 1, 2}
        assert got[0] == 0.0  # LoRA on linear layers leaves the embeddings alone
        for lay in (1, 2):
            assert got[lay] == pytest.approx(want[lay], rel=1e-4)
            assert got[lay] > 0


def test_principal_angles_agree_with_scipy(setup):
    _, ckpts, base, merged = setup
    rep = weight_drift_report(ckpts, {"aligned": "base", "perturbed": "aligned"}, angle_rank=8)
    for lay in (1, 2):
        means = []
        for k, w in base.items():
            if _layer(k) != lay or w.dim() != 2:
                continue
            d1 = (merged[0][k] - w).double().numpy()
            d2 = (merged[1][k] - merged[0][k]).double().numpy()
            # rank 4 vs rank 3: compare the 3 leading directions of each
            u1 = np.linalg.svd(d1)[0][:, :3]
            u2 = np.linalg.svd(d2)[0][:, :3]
            means.append(np.degrees(subspace_angles(u1, u2)).mean())
        assert rep["principal_angle_mean"][lay] == pytest.approx(np.mean(means), abs=1e-3)
        assert 0 < rep["principal_angle_min"][lay] <= rep["principal_angle_mean"][lay] <= 90


def test_full_update_and_no_update(setup, tmp_path):
    from transformers import LlamaForCausalLM

    root, ckpts, base, merged = setup
    model = LlamaForCausalLM.from_pretrained(root / "base")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(3.0)  # one matrix of block 2 changed
    model.save_pretrained(tmp_path / "full", safe_serialization=True)
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cks = {"base": ckpts["base"], "aligned": Checkpoint("aligned", ckpts["base"].base_dir, [], str(tmp_path / "full")),
           "same": Checkpoint("same", ckpts["base"].base_dir, [], str(tmp_path / "full"))}
    rep = weight_drift_report(cks, {"aligned": "base", "same": "aligned"}, angle_pair=None)
    assert rep["update_kind"] == {"aligned": "full", "same": "none"}
    want = _expected_drift(base, after)
    assert rep["weight_drift"]["aligned"][1] == 0.0
    assert rep["weight_drift"]["aligned"][2] == pytest.approx(want[2], rel=1e-5) and want[2] > 0.1
    assert all(v == 0.0 for v in rep["weight_drift"]["same"].values())


def test_principal_angles_of_known_subspaces():
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(20, 6, dtype=torch.float64))[0]
    same = principal_angles(q[:, :3], q[:, :3])
    ortho = principal_angles(q[:, :3], q[:, 3:])
    assert np.allclose(same, 0, atol=1e-5) and np.allclose(ortho, 90, atol=1e-5)
    # the basis of a low-rank update spans its column space, whatever its scale
    lr = LowRank(q[:, :2].float() * 5, torch.randn(2, 7))
    assert np.allclose(principal_angles(left_basis(lr, 8), q[:, :2]), 0, atol=1e-3)
    assert left_basis(lr, 8).shape == (20, 2)
