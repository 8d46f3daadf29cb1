"""KRAdapter math: the row-wise Khatri–Rao construction, sizes, identity at init, effective rank ≫ LoRA's."""

from __future__ import annotations

import math

import pytest
import torch

import peftkit
from peftkit.methods.kradapter import kr_shape

from .models import MODELS
from .models import outputs as _outputs


def effective_rank(m: torch.Tensor) -> float:
    """Roy & Vetterli's entropy effective rank: exp(H(σ/Σσ))."""
    s = torch.linalg.svdvals(m.double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def test_effective_rank_reference_values():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0)
    assert effective_rank(torch.outer(torch.arange(1.0, 6.0), torch.ones(4))) == pytest.approx(1.0)


@pytest.mark.parametrize("out_f,in_f", [(20, 33), (33, 20), (16, 16), (7, 50)])
def test_delta_is_the_cropped_row_wise_khatri_rao_product(out_f, in_f):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f))
    peftkit.attach(model, peftkit.KRAdapter(scale=1.5, target_modules=["0"]))
    layer = peftkit.get_adapter(model, "default")["0"]
    k, r, d = kr_shape(out_f, in_f)
    assert (k, r) == (min(out_f, in_f), math.isqrt(min(out_f, in_f)))
    assert r * (r + d) >= max(out_f, in_f) > r * (r + d - 1) or d == 0
    assert layer.kr_u.shape == (k, r) and layer.kr_v.shape == (k, r + d)
    with torch.no_grad():
        layer.kr_u.normal_()
    u, v = layer.kr_u.detach(), layer.kr_v.detach()
    full = torch.stack([torch.kron(v[i], u[i]) for i in range(k)])  # row i = V_i ⊗ U_i
    if out_f > in_f:
        full = full.t()
    expected = 1.5 * full[:out_f, :in_f]
    assert torch.allclose(layer.delta_weight(model[0].base), expected)
    x = torch.randn(3, in_f)
    assert torch.allclose(model(x), model[0].base(x) + x @ expected.t(), atol=1e-5)


def test_identity_at_init_and_parameter_count():
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    peftkit.attach(model, peftkit.KRAdapter(target_modules=["q_proj"]))
    assert torch.equal(_outputs(model, inputs, out), y0)
    params = peftkit.adapter_parameters(model)
    # q_proj is 32×32: k = 32, r = 5, d = 2 (5·7 = 35 ≥ 32): 32·5 + 32·7 per layer
    assert sum(p.numel() for p in params.values()) == 2 * (32 * 5 + 32 * 7)


def test_effective_rank_far_above_lora_at_equal_parameters():
    torch.manual_seed(0)
    n = 64
    model = torch.nn.Sequential(torch.nn.Linear(n, n))
    peftkit.attach(model, peftkit.KRAdapter(target_modules=["0"]))
    layer = peftkit.get_adapter(model, "default")["0"]
    with torch.no_grad():
        layer.kr_u.normal_()
    budget = sum(p.numel() for p in layer.parameters())  # 64·8 + 64·8 = 1024
    lora_r = budget // (2 * n)  # a LoRA with the same number of parameters: rank 8
    lora = torch.randn(n, lora_r) @ torch.randn(lora_r, n)
    kr = layer.delta_weight(model[0].base).detach()
    assert int(torch.linalg.matrix_rank(kr.double())) == n  # full rank
    assert effective_rank(kr) > 3 * effective_rank(lora)
    assert effective_rank(lora) <= lora_r + 1e-6


def test_bad_scale_refused():
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match="scale"):
        peftkit.attach(model, peftkit.KRAdapter(scale=float("nan"), target_modules=["q_proj"]))
    with pytest.raises(peftkit.TargetError, match="Embedding"):
        peftkit.attach(model, peftkit.KRAdapter(target_modules=["embed_tokens"]))
    assert peftkit.adapter_names(model) == []
