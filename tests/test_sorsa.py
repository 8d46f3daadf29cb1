"""SORSA: trains the top-r singular triplets; the orthonormality regulariser is 0 at init, positive after a
perturbation, with the analytic gradient; merging equals the unmerged model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.sorsa import SORSA

from .models import MODELS, outputs


def _layers(model, name="default"):
    return peftkit.get_adapter(model, name)


def test_starts_at_the_principal_triplets_and_the_base():
    model, inputs, out = MODELS["llama"](0)
    w0 = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    y0 = outputs(model, inputs, out)
    peftkit.attach(model, SORSA(r=4, target_modules=["layers.1.mlp.down_proj", "q_proj"]))
    assert torch.equal(outputs(model, inputs, out), y0)  # the two rank-r paths cancel exactly
    mod = _layers(model)["model.layers.1.mlp.down_proj"]
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    assert torch.allclose(mod.sorsa_S.double(), s[:4], atol=1e-5)
    # U_p diag(σ_p) V_pᵀ is the best rank-4 part of W₀ (signs of singular vectors may differ)
    top = (mod.sorsa_U * mod.sorsa_S) @ mod.sorsa_Vh
    assert torch.allclose(top.double(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
    assert {n for n, _ in mod.named_parameters()} == {"sorsa_U", "sorsa_S", "sorsa_Vh"}
    assert mod.sorsa_S.shape == (4,)  # Σ_p is a vector


def test_regulariser_is_zero_at_init_then_positive_with_the_analytic_gradient():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, SORSA(r=4, gamma=0.5, target_modules=["q_proj", "v_proj"]))
    assert float(peftkit.regularization_loss(model)) < 1e-9
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    reg = peftkit.regularization_loss(model)
    layers = _layers(model)
    eye = torch.eye(4)
    expected = 0.5 * sum(float((m.sorsa_U.t() @ m.sorsa_U - eye).pow(2).sum()
                               + (m.sorsa_Vh @ m.sorsa_Vh.t() - eye).pow(2).sum()) for m in layers.values())
    assert float(reg) > 1e-4 and float(reg) == pytest.approx(expected, rel=1e-5)
    reg.backward()
    for m in layers.values():
        u, vh = m.sorsa_U.detach(), m.sorsa_Vh.detach()
        # d‖UᵀU − I‖²/dU = 4 U (UᵀU − I);  d‖VhVhᵀ − I‖²/dVh = 4 (VhVhᵀ − I) Vh
        assert torch.allclose(m.sorsa_U.grad, 0.5 * 4 * u @ (u.t() @ u - eye), atol=1e-6)
        assert torch.allclose(m.sorsa_Vh.grad, 0.5 * 4 * (vh @ vh.t() - eye) @ vh, atol=1e-6)
        assert m.sorsa_S.grad is None or float(m.sorsa_S.grad.abs().max()) == 0.0


def test_gamma_zero_adds_no_term():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, SORSA(r=2, gamma=0.0, target_modules=["q_proj"]))
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(0.1)
    assert float(peftkit.regularization_loss(model)) == 0.0


def test_merge_is_the_residual_plus_the_trained_triplets():
    model, inputs, out = MODELS["llama"](0)
    w0 = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    peftkit.attach(model, SORSA(r=3, target_modules=["layers.0.self_attn.v_proj"]))
    mod = next(iter(_layers(model).values()))
    with torch.no_grad():
        for p in mod.parameters():
            p.mul_(1.2)
    y = outputs(model, inputs, out)
    peftkit.merge(model)
    u0, s0, vh0 = mod.init_U, mod.init_S, mod.init_Vh
    expected = (w0 - (u0 * s0) @ vh0) + (mod.sorsa_U * mod.sorsa_S) @ mod.sorsa_Vh
    assert torch.allclose(model.model.layers[0].self_attn.v_proj.weight, expected, atol=1e-5)
    assert torch.allclose(outputs(model, inputs, out), y, atol=1e-5)


def test_training_lowers_the_loss_with_the_regulariser():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x, target = torch.randn(32, 16), torch.randn(32, 4)
    peftkit.attach(model, SORSA(r=4, gamma=0.1, target_modules=["0", "2"]))
    opt = torch.optim.Adam(peftkit.adapter_parameters(model).values(), lr=1e-2)
    losses = []
    for step in range(30):
        loss = nn.functional.mse_loss(model(x), target) + peftkit.regularization_loss(model, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"gamma": -1.0}, "gamma .* must be >= 0"),
    ({"r": 33}, "q_proj: rank 33 is larger than the layer allows \\(32"),
])
def test_bad_options_are_refused(kwargs, message):
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.PeftkitError, match=message):
        peftkit.attach(model, SORSA(target_modules=["layers.0.self_attn.q_proj"], **kwargs))
    assert not peftkit.adapter_names(model)
