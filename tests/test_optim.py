"""GaLore (G01) and LoRA-FA: the defining properties, and the training options."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit.optim import GaLoreAdamW, build_optimizer, state_bytes
from tests.models import tiny_llama


def _fit(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 24, generator=g)
    y = torch.randn(16, 40, generator=g)
    losses = []
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_galore_with_full_rank_is_adamw():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 40))
    b = copy.deepcopy(a)
    la = _fit(a, GaLoreAdamW(a.parameters(), lr=1e-2, weight_decay=0.1, rank=64), 5)
    lb = _fit(b, torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False), 5)
    assert la == pytest.approx(lb, rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_galore_state_is_r_by_n_and_updates_stay_in_the_projected_subspace():
    torch.manual_seed(0)
    m, n, r = 32, 48, 4
    w = nn.Parameter(torch.randn(m, n))
    opt = GaLoreAdamW([w], lr=1e-2, rank=r, update_gap=100)
    before = w.detach().clone()
    target = torch.randn(m, n)
    for _ in range(3):
        ((w - target) ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    st = opt.state[w]
    assert st["exp_avg"].shape == (r, n) and st["exp_avg_sq"].shape == (r, n) and st["proj"].shape == (m, r)
    assert state_bytes(opt) == 4 * (2 * r * n + m * r)  # two moments and the projector (the step is an int)
    delta = w.detach() - before
    p = st["proj"]
    assert torch.linalg.matrix_rank(delta).item() <= r
    assert torch.allclose(p @ (p.t() @ delta), delta, atol=1e-5)  # ΔW lies in span(P)
    tall = nn.Parameter(torch.randn(48, 32))
    opt2 = GaLoreAdamW([tall], rank=r)
    tall.sum().backward()
    opt2.step()
    assert opt2.state[tall]["exp_avg"].shape == (48, r)  # m > n: right projection


def test_galore_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 40))
    losses = _fit(model, GaLoreAdamW(model.parameters(), lr=1e-2, rank=4, update_gap=5), 30)
    assert losses[-1] < 0.8 * losses[0]


def test_lora_fa_freezes_a_and_halves_the_state():
    model, inputs, _ = tiny_llama()
    peftkit.attach(model, peftkit.LoRA(r=4, target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.normal_(0, 0.1)
    params = list(peftkit.adapter_parameters(model).values())
    a_before = {n: p.detach().clone() for n, p in peftkit.adapter_parameters(model).items() if n.endswith("lora_A")}
    opt = build_optimizer("lora-fa", model, [{"params": params}], lr=1e-2)
    batch = dict(inputs, labels=inputs["input_ids"])
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    now = peftkit.adapter_parameters(model)
    for n, a in a_before.items():
        assert torch.equal(now[n], a) and not now[n].requires_grad
    b_numel = sum(p.numel() for n, p in now.items() if n.endswith("lora_B"))
    assert state_bytes(opt) == 2 * 4 * b_numel + 4 * 4  # moments of B only (+ one step count per B)
    with pytest.raises(peftkit.ConfigError, match="no LoRA or DoRA adapter"):
        build_optimizer("lora-fa", nn.Linear(2, 2), [{"params": [nn.Parameter(torch.zeros(1))]}], lr=1e-3)


def test_train_config_optimizer_option(tmp_path):
    from peftkit.train import TrainConfig

    with pytest.raises(peftkit.ConfigError, match=r"'galor'.*galore"):
        TrainConfig(output=str(tmp_path), optimizer="galor").validate()
    TrainConfig(output=str(tmp_path), optimizer="lora-fa").validate()
