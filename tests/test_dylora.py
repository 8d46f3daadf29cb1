"""DyLoRA's defining properties: the rank-k truncation is the rank-k forward of training, and one run trains every rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.dylora import DyLoRA, set_rank

from .models import MODELS
from .models import outputs as _outputs


def _perturbed_llama(r=4, **kw):
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, DyLoRA(r=r, alpha=6, target_modules=["q_proj", "v_proj"], **kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model, inputs, out


def test_truncation_is_the_leading_k_factor_product():
    model, _, _ = _perturbed_llama()
    for k in range(1, 5):
        set_rank(model, k)
        for path, m in peftkit.get_adapter(model, "default").items():
            base = model.get_submodule(path).base
            x = torch.randn(3, base.in_features)
            expected = base(x) + (x @ m.lora_A[:k].t() @ m.lora_B[:, :k].t()) * (6 / k)
            site = model.get_submodule(path)
            assert torch.allclose(site(x), expected, atol=1e-6), (path, k)


def test_eval_at_rank_k_reproduces_the_training_forward_with_b_equal_k():
    model, inputs, out = _perturbed_llama()
    seen = {}
    for step in range(40):
        torch.manual_seed(step)
        peftkit.before_step(model, step)
        b = next(iter(peftkit.get_adapter(model, "default").values())).train_rank
        if b in seen:
            continue
        model.train()
        with torch.no_grad():
            seen[b] = out(model(**inputs))
    assert sorted(seen) == [1, 2, 3, 4]  # every rank drawn
    peftkit.after_step(model, 40)  # the draw holds for one step only
    assert all(m.train_rank is None for m in peftkit.get_adapter(model, "default").values())
    model.eval()
    for k, y_train in seen.items():
        set_rank(model, k)
        assert torch.allclose(_outputs(model, inputs, out), y_train, atol=1e-6), k
    set_rank(model, None)
    full = _outputs(model, inputs, out)
    assert not torch.allclose(full, seen[1], atol=1e-4)


def test_a_step_at_rank_b_trains_only_the_leading_b_components():
    model, inputs, out = _perturbed_llama()
    mods = peftkit.get_adapter(model, "default")
    for m in mods.values():
        m.train_rank = 2
    model.train()
    out(model(**inputs)).pow(2).mean().backward()
    for m in mods.values():
        assert m.lora_A.grad[:2].abs().sum() > 0 and m.lora_B.grad[:, :2].abs().sum() > 0
        assert torch.all(m.lora_A.grad[2:] == 0) and torch.all(m.lora_B.grad[:, 2:] == 0)


def test_one_run_trains_every_rank():
    """A rank-4 target: after one DyLoRA run, every truncation k fits better than the base and better as k grows,
    and the first component alone is (almost) the best rank-1 fit."""
    torch.manual_seed(0)
    d = 16
    u, _ = torch.linalg.qr(torch.randn(d, d))
    v, _ = torch.linalg.qr(torch.randn(d, d))
    target = u[:, :4] @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ v[:, :4].t()
    model = nn.Sequential(nn.Linear(d, d, bias=False))
    nn.init.zeros_(model[0].weight)
    peftkit.attach(model, DyLoRA(r=4, alpha=4, target_modules=["0"]))
    opt = torch.optim.Adam(peftkit.adapter_parameters(model).values(), lr=0.03)
    x = torch.randn(256, d)
    y = x @ target.t()
    model.train()
    for step in range(800):
        peftkit.before_step(model, step, 800)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        peftkit.after_step(model, step, 800)
        opt.zero_grad()
    model.eval()
    base_err = y.pow(2).mean().item()
    errs = []
    for k in range(1, 5):
        set_rank(model, k)
        with torch.no_grad():
            errs.append((model(x) - y).pow(2).mean().item())
    assert all(e < 0.6 * base_err for e in errs), (errs, base_err)
    assert all(errs[i + 1] < errs[i] for i in range(3)), errs
    assert errs[-1] < 0.15 * base_err, errs
    best1 = u[:, :1] @ u[:, :1].t() @ target  # the optimal rank-1 map (Eckart–Young)
    assert errs[0] < 1.05 * (x @ (target - best1).t()).pow(2).mean().item(), errs


def test_set_rank_and_bad_input():
    model, _, _ = _perturbed_llama(r=4, r_min=2)
    with pytest.raises(peftkit.ConfigError, match=r"rank=1 must be an integer in \[r_min, r\] = \[2, 4\]"):
        set_rank(model, 1)
    peftkit.merge(model)
    with pytest.raises(peftkit.ConfigError, match="unmerge"):
        set_rank(model, 3)
    with pytest.raises(peftkit.ConfigError, match="r_min=5 is above r=4"):
        peftkit.attach(MODELS["llama"](0)[0], DyLoRA(r=4, r_min=5, target_modules=["q_proj"]))
    with pytest.raises(peftkit.ConfigError, match="eval_rank"):
        peftkit.attach(MODELS["llama"](0)[0], DyLoRA(r=4, eval_rank=9, target_modules=["q_proj"]))
    with pytest.raises(peftkit.TargetError, match="r=64 is larger"):
        peftkit.attach(MODELS["llama"](0)[0], DyLoRA(r=64, target_modules=["q_proj"]))


def test_eval_rank_is_saved(tmp_path):
    model, inputs, out = _perturbed_llama()
    set_rank(model, 2)
    y = _outputs(model, inputs, out)
    peftkit.save(model, tmp_path / "a")
    fresh, _, _ = MODELS["llama"](0)
    peftkit.load(fresh, tmp_path / "a")
    assert torch.allclose(_outputs(fresh, inputs, out), y, atol=1e-6)
