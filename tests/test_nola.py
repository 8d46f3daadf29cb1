"""NOLA's defining properties: bases regenerate bit-identically from the seed, trainable = k + l per layer,
identity at init, ΔW = s·(Σβ_j B_j)(Σα_i A_i), and the "half of LoRA rank 1" parameter count."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.methods.nola import nola_bases

from .models import MODELS
from .models import outputs as _outputs

TARGETS = ["q_proj", "v_proj", "up_proj"]  # 32×32, 16×32, 64×32


def test_trainable_count_is_k_plus_l_whatever_the_rank_and_width():
    counts = []
    for r in (2, 8):
        model, _, _ = MODELS["llama"](0)
        peftkit.attach(model, peftkit.NOLA(r=r, num_basis_a=10, num_basis_b=6, target_modules=TARGETS))
        layers = peftkit.get_adapter(model, "default")
        for layer in layers.values():
            assert sum(p.numel() for p in layer.parameters()) == 16
        counts.append(sum(p.numel() for p in peftkit.adapter_parameters(model).values()))
    assert counts[0] == counts[1] == 16 * 6  # 3 targets × 2 blocks


def test_bases_regenerate_bit_identically_from_the_seed(tmp_path):
    a1, b1 = nola_bases(5, 4, 3, 32, 64, seed=9)
    a2, b2 = nola_bases(5, 4, 3, 32, 64, seed=9)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, nola_bases(5, 4, 3, 32, 64, seed=10)[0])
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, peftkit.NOLA(r=3, num_basis_a=5, num_basis_b=4, seed=9, target_modules=TARGETS))
    shared = next(iter(peftkit.get_adapter(model, "default").values())).shared
    assert torch.equal(shared.nola_A, a1) and torch.equal(shared.nola_B, b1)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.normal_()
    y = _outputs(model, inputs, out)
    peftkit.save(model, tmp_path)
    fresh, _, _ = MODELS["llama"](0)
    peftkit.load(fresh, tmp_path)
    shared2 = next(iter(peftkit.get_adapter(fresh, "default").values())).shared
    assert torch.equal(shared2.nola_A, a1) and torch.equal(shared2.nola_B, b1)
    assert torch.allclose(_outputs(fresh, inputs, out), y, atol=1e-6)


def test_identity_at_init_and_delta_formula():
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    peftkit.attach(model, peftkit.NOLA(r=4, alpha=8, num_basis_a=6, num_basis_b=5, target_modules=TARGETS))
    assert torch.equal(_outputs(model, inputs, out), y0)
    layer = peftkit.get_adapter(model, "default")["model.layers.1.self_attn.v_proj"]
    assert torch.count_nonzero(layer.nola_beta) == 0 and torch.count_nonzero(layer.nola_alpha) == 6
    with torch.no_grad():
        layer.nola_beta.normal_()
    al, be = layer.nola_alpha, layer.nola_beta
    a = sum(al[i] * layer.shared.nola_A[i, :4, :32] for i in range(6))
    b = sum(be[j] * layer.shared.nola_B[j, :16, :4] for j in range(5))
    expected = 2.0 * b @ a
    assert torch.allclose(layer.delta_weight(model.model.layers[1].self_attn.v_proj.base), expected, atol=1e-6)


def test_half_the_parameters_of_lora_rank_one():
    """The paper's claim: fewer than half of rank-1 LoRA's parameters (LoRA-r1: in + out per matrix)."""
    model, _, _ = MODELS["llama"](0)
    lora = peftkit.attach(MODELS["llama"](0)[0], peftkit.LoRA(r=1, alpha=1, target_modules=TARGETS))
    lora_count = sum(p.numel() for p in peftkit.adapter_parameters(lora).values())
    peftkit.attach(model, peftkit.NOLA(r=8, num_basis_a=12, num_basis_b=12, target_modules=TARGETS))
    nola_count = sum(p.numel() for p in peftkit.adapter_parameters(model).values())
    assert nola_count <= lora_count / 2, (nola_count, lora_count)


def test_bad_input_refused_naming_the_culprit():
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match="num_basis_a"):
        peftkit.attach(model, peftkit.NOLA(num_basis_a=0, target_modules=TARGETS))
    with pytest.raises(peftkit.TargetError, match=r"v_proj.*rank 17"):
        peftkit.attach(model, peftkit.NOLA(r=17, target_modules=TARGETS))
    assert peftkit.adapter_names(model) == []
