"""IncreLoRA's defining properties: the total rank reaches the budget exactly, a growth step leaves the output
unchanged, ranks grow where the importance is, and the importance is AdaLoRA's scorer."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.methods.increlora import IncreLoRA, active_ranks
from peftkit.methods.svd_lowrank import SVDLayer

from .models import MODELS
from .models import outputs as _outputs

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(**kw):
    model, inputs, out = MODELS["llama"](0)
    opts = dict(init_r=1, target_r=3, max_r=5, total_step=20, tinit=2, tfinal=3, delta_t=4, target_modules=TARGETS)
    opts.update(kw)
    peftkit.attach(model, IncreLoRA(**opts))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model, inputs, out


def _drive(model, inputs, out, steps, total, loud=None):
    """``steps`` training steps on the model's own loss (SGD), after_step after each; yields (step, grew, y before, y after)."""
    params = peftkit.adapter_parameters(model)
    opt = torch.optim.SGD(params.values(), lr=0.05)
    for step in range(steps):
        model.train()
        loss = out(model(**inputs)).pow(2).mean()
        loss.backward()
        if loud is not None:  # make one layer's gradients dominate
            for n, p in params.items():
                if loud in n:
                    p.grad.mul_(100.0)
        opt.step()
        before_ranks = active_ranks(model)
        y_before = _outputs(model, inputs, out)
        peftkit.after_step(model, step, total)
        y_after = _outputs(model, inputs, out)
        opt.zero_grad()
        yield step, active_ranks(model) != before_ranks, y_before, y_after


def test_total_rank_reaches_the_budget_and_growth_keeps_the_output():
    model, inputs, out = _model()
    start = active_ranks(model)
    assert set(start.values()) == {1}
    grown_at, totals = [], []
    for step, grew, y0, y1 in _drive(model, inputs, out, 20, 20):
        if grew:
            grown_at.append(step)
            assert torch.equal(y0, y1), step  # new triplets have λ = 0: same output at that step
        totals.append(sum(active_ranks(model).values()))
    assert grown_at == [6, 10, 14]  # tinit + j·delta_t <= total_step - tfinal
    assert totals == sorted(totals)  # ranks never decrease
    ranks = active_ranks(model)
    assert sum(ranks.values()) == 3 * len(ranks)
    assert max(ranks.values()) <= 5
    cfg = next(iter(peftkit.get_adapter(model, "default").values())).config
    assert {p: sum(v) for p, v in cfg.rank_pattern.items()} == ranks


def test_rank_goes_where_the_importance_is():
    model, inputs, out = _model(target_r=2, max_r=4, delta_t=4)
    for _ in _drive(model, inputs, out, 20, 20, loud="layers.1.mlp.down_proj"):
        pass
    ranks = active_ranks(model)
    assert ranks["model.layers.1.mlp.down_proj"] == 4  # the loud layer filled its room first
    assert sum(ranks.values()) == 2 * len(ranks)


def test_uses_adalora_importance_scorer():
    model, _, _ = _model()
    layer = next(iter(peftkit.get_adapter(model, "default").values()))
    assert type(layer) is SVDLayer  # the same layer class and scorer as AdaLoRA
    for p in (layer.lora_A, layer.lora_E, layer.lora_B):
        p.grad = torch.ones_like(p)
    layer.update_importance(0.5, 0.5)
    ipt = (layer.lora_E * 1.0).abs().detach()
    avg, unc = layer.ipt["lora_E"]
    assert torch.allclose(avg, 0.5 * ipt) and torch.allclose(unc, 0.5 * (ipt - 0.5 * ipt).abs())


def test_saved_adapter_keeps_the_grown_ranks(tmp_path):
    model, inputs, out = _model(total_step=8, tinit=0, tfinal=0, delta_t=4)
    for _ in _drive(model, inputs, out, 8, 8):
        pass
    y = _outputs(model, inputs, out)
    peftkit.save(model, tmp_path / "a")
    fresh, _, _ = MODELS["llama"](0)
    peftkit.load(fresh, tmp_path / "a")
    assert active_ranks(fresh) == active_ranks(model)
    assert torch.allclose(_outputs(fresh, inputs, out), y, atol=1e-6)


@pytest.mark.parametrize("kw,field", [
    (dict(init_r=3, target_r=2), "init_r=3 is above target_r=2"),
    (dict(target_r=9, max_r=8), "target_r=9 is above max_r=8"),
    (dict(total_step=None), "total_step is required"),
    (dict(total_step=10, tinit=4, tfinal=4, delta_t=3), "delta_t=3"),
])
def test_bad_input(kw, field):
    opts = dict(init_r=1, target_r=2, max_r=4, total_step=20, delta_t=2, target_modules=["q_proj"])
    opts.update(kw)
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match=field):
        peftkit.attach(model, IncreLoRA(**opts))
    assert not peftkit.adapter_names(model)
    with pytest.raises(peftkit.TargetError, match="max_r=40"):
        peftkit.attach(model, IncreLoRA(max_r=40, total_step=20, target_modules=["q_proj"]))
