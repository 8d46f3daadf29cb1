"""SVFit: only the top-r singular values train; the rank holds the asked energy; the 16× parameter ratio."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.svfit import SVFit

from .models import MODELS, outputs


def _layers(model, name="default"):
    return peftkit.get_adapter(model, name)


def _energy_ok(w: torch.Tensor, r: int, fraction: float) -> bool:
    """r is the smallest rank whose top singular values hold ``fraction`` of Σσ²."""
    e = torch.linalg.svdvals(w.double()).pow(2)
    cum = torch.cumsum(e, 0) / e.sum()
    return bool(cum[r - 1] >= fraction - 1e-12) and (r == 1 or bool(cum[r - 2] < fraction))


def test_energy_rank_is_the_smallest_rank_holding_the_fraction():
    model, _, _ = MODELS["llama"](0)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    peftkit.attach(model, SVFit(energy=0.9, target_modules=["q_proj", "down_proj"]))
    layers = _layers(model)
    assert set(layers) == set(weights)
    for path, mod in layers.items():
        assert _energy_ok(weights[path], mod.r, 0.9), path
        # trainable = r scalars per matrix, nothing else
        assert [n for n, p in mod.named_parameters()] == ["sigma"] and mod.sigma.shape == (mod.r,)
    ranks = peftkit.get_adapter(model, "default")
    assert sum(p.numel() for p in peftkit.adapter_parameters(model).values()) == sum(m.r for m in ranks.values())
    # the chosen ranks are recorded, so a saved adapter rebuilds the same shapes
    config = next(iter(layers.values())).config
    assert config.rank_pattern == {p: m.r for p, m in layers.items()}


def test_weight_is_u_sigma_prime_v_plus_residual():
    model, inputs, out = MODELS["llama"](0)
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peftkit.attach(model, SVFit(r=5, target_modules=["layers.0.self_attn.q_proj"]))
    mod = next(iter(_layers(model).values()))
    torch.manual_seed(3)
    with torch.no_grad():
        mod.sigma.mul_(1 + 0.3 * torch.rand(5))
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    ur, sr, vr = u[:, :5], s[:5], vh[:5]
    expected = ur @ torch.diag(mod.sigma.double()) @ vr + (w0.double() - ur @ torch.diag(sr) @ vr)
    y = outputs(model, inputs, out)
    peftkit.merge(model)
    merged = model.model.layers[0].self_attn.q_proj.weight.detach().double()
    assert torch.allclose(merged, expected, atol=1e-5)
    assert torch.allclose(outputs(model, inputs, out), y, atol=1e-5)


def test_gradient_matches_a_dense_reference():
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    w0 = lin.weight.detach().clone()
    x = torch.randn(3, 12)
    model = nn.Sequential(lin)
    peftkit.attach(model, SVFit(r=4, target_modules=["0"]))
    mod = next(iter(_layers(model).values()))
    with torch.no_grad():
        mod.sigma.add_(0.1)
    model(x).pow(2).sum().backward()
    sigma = mod.sigma.detach().clone().requires_grad_(True)
    w = w0 + (mod.svd_U * (sigma - mod.sigma0)) @ mod.svd_Vh
    nn.functional.linear(x, w, lin.bias).pow(2).sum().backward()
    assert torch.allclose(mod.sigma.grad, sigma.grad, atol=1e-5)


def test_sixteen_times_fewer_parameters_than_lora_r8_on_768x768():
    """The paper's "16×": LoRA r=8 on a 768×768 matrix trains 8·(768+768) = 12,288; SVFit at most 768."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 768, bias=False))
    lora = peftkit.attach(nn.Sequential(nn.Linear(768, 768, bias=False)), peftkit.LoRA(r=8, target_modules=["0"]))
    n_lora = sum(p.numel() for p in peftkit.adapter_parameters(lora).values())
    assert n_lora == 12_288
    peftkit.attach(model, SVFit(energy=1.0, target_modules=["0"]), name="full")
    n_full = sum(p.numel() for p in peftkit.adapter_parameters(model, "full").values())
    assert n_full == 768 and n_lora / n_full == 16.0
    peftkit.attach(model, SVFit(target_modules=["0"]), name="e99")  # the default energy 0.99: fewer still
    n_99 = sum(p.numel() for p in peftkit.adapter_parameters(model, "e99").values())
    assert n_99 < 768 and n_lora / n_99 > 16.0


def test_save_load_is_exact(tmp_path):
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, SVFit(energy=0.95, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.mul_(1.1)
    y = outputs(model, inputs, out)
    peftkit.save(model, tmp_path / "a")
    saved = peftkit.read_adapters(tmp_path / "a")[0]
    for suffix in ("svd_U", "svd_Vh", "sigma0", "sigma"):  # the frozen bases are in the file
        assert sum(k.endswith("." + suffix) for k in saved.tensors) == 6
    fresh, _, _ = MODELS["llama"](0)
    peftkit.load(fresh, tmp_path / "a")
    assert torch.equal(outputs(fresh, inputs, out), y)


@pytest.mark.parametrize("kwargs, message", [
    ({"energy": 0.0}, "energy must be in \\(0, 1\\]"),
    ({"energy": 1.5}, "energy must be in \\(0, 1\\]"),
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 40}, "down_proj.*rank 40 is larger than the layer allows \\(32"),
])
def test_bad_options_are_refused_before_the_model_changes(kwargs, message):
    model, _, _ = MODELS["llama"](0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.PeftkitError, match=message):
        peftkit.attach(model, SVFit(target_modules=["layers.0.mlp.down_proj"], **kwargs))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
