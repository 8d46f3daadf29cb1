"""Mixture of LoRA experts: N=1, k=1 is LoRA; gates on the simplex; the top-k formula; the balancing loss
on a hand example; not mergeable; bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core.site import AdapterSite
from peftkit.methods.molora import MoLoRA

from .models import tiny_llama


def _randomise(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_one_expert_top1_is_lora_forward_and_gradients():
    moe, inputs, _ = tiny_llama(0)
    lora, _, _ = tiny_llama(0)
    targets = ["q_proj", "v_proj", "down_proj"]
    peftkit.attach(moe, MoLoRA(r=4, alpha=8, num_experts=1, top_k=1, target_modules=targets))
    peftkit.attach(lora, peftkit.LoRA(r=4, alpha=8, target_modules=targets))
    _randomise(peftkit.adapter_parameters(lora).values())
    ours = peftkit.get_adapter(moe, "default")
    with torch.no_grad():
        for path, m in peftkit.get_adapter(lora, "default").items():
            ours[path].lora_A[0].copy_(m.lora_A)
            ours[path].lora_B[0].copy_(m.lora_B)
    y_moe, y_lora = moe(**inputs).logits, lora(**inputs).logits
    torch.testing.assert_close(y_moe, y_lora, atol=1e-5, rtol=1e-4)
    y_moe.pow(2).mean().backward()
    y_lora.pow(2).mean().backward()
    for path, m in peftkit.get_adapter(lora, "default").items():
        torch.testing.assert_close(ours[path].lora_A.grad[0], m.lora_A.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(ours[path].lora_B.grad[0], m.lora_B.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("n, k", [(4, 1), (4, 2), (5, 5)])
def test_gates_lie_on_the_simplex_with_k_experts(n, k):
    model, _, _ = tiny_llama(0)
    peftkit.attach(model, MoLoRA(r=2, num_experts=n, top_k=k, target_modules=["q_proj"]))
    layer = next(iter(peftkit.get_adapter(model, "default").values()))
    _randomise([layer.router], seed=1)
    probs, chosen, gates = layer.gates(torch.randn(50, 32))
    for t in (probs, gates):
        assert (t >= 0).all()
        torch.testing.assert_close(t.sum(-1), torch.ones(50))
    assert ((gates > 0).sum(-1) == k).all()
    assert torch.equal(gates.gather(-1, chosen) > 0, torch.ones(50, k, dtype=torch.bool))
    # the chosen experts are the k most probable ones
    assert (probs.gather(-1, chosen).min(-1).values >= probs.sort(-1, descending=True).values[:, k - 1] - 1e-7).all()


def test_output_is_the_top_k_formula_and_base_at_init():
    model, inputs, _ = tiny_llama(0)
    with torch.no_grad():
        base = model(**inputs).logits
    peftkit.attach(model, MoLoRA(r=3, alpha=6, num_experts=4, top_k=2, target_modules=["q_proj"]))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base, atol=0, rtol=0)
    _randomise(peftkit.adapter_parameters(model).values(), seed=2)
    site = model.model.layers[0].self_attn.q_proj
    layer = site.adapters["default"]
    x = torch.randn(3, 32)
    with torch.no_grad():
        delta = site(x) - site.base(x)
        for t in range(3):
            g = torch.softmax(layer.router @ x[t], -1)
            top = g.topk(2)
            expected = sum((g[j] / top.values.sum()) * (layer.lora_B[j] @ (layer.lora_A[j] @ x[t]))
                           for j in top.indices.tolist()) * 2.0
            torch.testing.assert_close(delta[t], expected, atol=1e-5, rtol=1e-4)


def _two_expert_model(top_k: int, coef: float):
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    peftkit.attach(model, MoLoRA(r=1, num_experts=2, top_k=top_k, load_balance_coef=coef, target_modules=["0"]))
    layer = model[0].adapters["default"]
    with torch.no_grad():
        layer.router.copy_(torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]]))
    return model, layer


def test_load_balancing_loss_on_a_hand_example():
    """Tokens [1,0], [1,0], [0,1] give router probabilities (.75, .25), (.75, .25), (.25, .75). Top-1: f = (2/3, 1/3),
    P = (7/12, 5/12), so L = c · 2 · (2/3·7/12 + 1/3·5/12) = c · 19/18. Top-2: f = (1/2, 1/2), so L = c · 1."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    model, layer = _two_expert_model(top_k=1, coef=0.1)
    model.train()
    assert float(peftkit.regularization_loss(model)) == 0.0  # no training forward yet
    model(x)
    loss = peftkit.regularization_loss(model)
    assert math.isclose(float(loss), 0.1 * 19 / 18, rel_tol=1e-6)
    loss.backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0  # the loss trains the router
    model2, _ = _two_expert_model(top_k=2, coef=0.5)
    model2.train()
    model2(x)
    assert math.isclose(float(peftkit.regularization_loss(model2)), 0.5, rel_tol=1e-6)
    model3, _ = _two_expert_model(top_k=1, coef=0.0)
    model3.train()
    model3(x)
    assert peftkit.training_hooks(model3) == {"default": ["regularization_loss"]}
    assert float(peftkit.regularization_loss(model3)) == 0.0


def _fit(config, x, y, steps=200):
    model = nn.Sequential(nn.Linear(x.shape[1], y.shape[1], bias=False))
    nn.init.zeros_(model[0].weight)
    peftkit.attach(model, config)
    opt = torch.optim.Adam(peftkit.adapter_parameters(model).values(), lr=0.03)
    for _ in range(steps):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


def test_mixture_learns_an_input_dependent_map():
    """Tokens near e0 must map to u, tokens near -e0 to v (u != -v): no linear map does both, a 2-expert
    top-1 mixture of rank-1 experts does (the router sends each cluster to its own expert)."""
    torch.manual_seed(0)
    d = 8
    e0 = torch.eye(d)[0]
    x = torch.cat([e0 + 0.05 * torch.randn(32, d), -e0 + 0.05 * torch.randn(32, d)])
    u, v = torch.randn(d), torch.randn(d)
    y = torch.cat([u.expand(32, d), v.expand(32, d)])
    power = y.pow(2).mean().item()
    moe = _fit(MoLoRA(r=1, alpha=1, num_experts=2, top_k=1, target_modules=["0"]), x, y)
    lora = _fit(peftkit.LoRA(r=1, alpha=1, target_modules=["0"]), x, y)
    assert moe < 0.05 * power, (moe, power)
    assert lora > 0.2 * power, (lora, power)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=2, top_k=3), r"top_k=3 is above num_experts=2"),
    (dict(load_balance_coef=-1.0), r"load_balance_coef must be >= 0"),
    (dict(r=64), r"rank 64 is larger than the layer allows"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_bad_config_is_refused_before_the_model_is_touched(kwargs, match):
    model, _, _ = tiny_llama(0)
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.attach(model, MoLoRA(target_modules=["q_proj"], **kwargs))
    assert not any(isinstance(m, AdapterSite) for m in model.modules())


def test_merge_is_refused_naming_the_method():
    model, _, _ = tiny_llama(0)
    peftkit.attach(model, MoLoRA(r=2, target_modules=["q_proj"]))
    with pytest.raises(peftkit.NotMergeableError, match=r"'default' \(molora.*depends on the input"):
        peftkit.merge(model)
