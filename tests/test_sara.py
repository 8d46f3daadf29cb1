"""SaRA (Hu et al. 2024): peft has none, so the defining properties.

The trained fraction of each weight equals ``quantile`` and the trained entries are the
smallest ``|W0|``; every other entry stays bitwise unchanged through training and merging; the
model is the base model at init; the nuclear-norm penalty and its gradient match hand examples.
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.methods.sara import NuclearNorm, SaRA

from .sparse_helpers import Small, base_state, hook_loop, llama, llama_loss, train_tiny


def test_trainable_fraction_is_the_quantile_and_the_smallest_entries():
    model, _, _ = llama()
    w = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("_proj")}
    peftkit.attach(model, SaRA(quantile=0.15, target_modules="all-linear"))
    for path, mod in peftkit.get_adapter(model, "default").items():
        numel = w[path].numel()
        assert mod.values.numel() == round(0.15 * numel)
        absw = w[path].abs().reshape(-1)
        inside = torch.zeros(numel, dtype=torch.bool)
        inside[mod.indices] = True
        assert absw[inside].max() <= absw[~inside].min()
    total = sum(t.numel() for t in w.values())
    trained = sum(p.numel() for p in peftkit.adapter_parameters(model).values())
    assert abs(trained / total - 0.15) < 1e-3


def test_other_entries_bitwise_unchanged_after_training_and_merge():
    model, inputs, out = llama()
    peftkit.attach(model, SaRA(quantile=0.1, nuclear_weight=1e-3, target_modules=["q_proj", "up_proj"]))
    before = base_state(model)
    w0 = {p: model.get_submodule(p).base.weight.detach().clone() for p in peftkit.get_adapter(model, "default")}
    with torch.no_grad():
        y0 = out(model(**inputs))
    opt = torch.optim.AdamW(peftkit.adapter_parameters(model).values(), lr=1e-2, weight_decay=0.1)
    hook_loop(model, 3, llama_loss(model, inputs), opt)  # with the penalty (regularization_loss)
    after = base_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        y = out(model(**inputs))
    assert not torch.allclose(y, y0)
    mods = peftkit.get_adapter(model, "default")
    peftkit.merge(model)
    for p, mod in mods.items():
        merged = model.get_submodule(p).base.weight.detach().reshape(-1)
        off = torch.ones(merged.numel(), dtype=torch.bool)
        off[mod.indices] = False
        assert torch.equal(merged[off], w0[p].reshape(-1)[off])
        assert torch.count_nonzero(merged[~off] - w0[p].reshape(-1)[~off]) > 0
    with torch.no_grad():
        assert torch.allclose(out(model(**inputs)), y, atol=1e-5)


def test_nuclear_norm_value_and_gradient_by_hand():
    model = Small(out=2, inp=2)
    peftkit.attach(model, SaRA(quantile=1.0, nuclear_weight=0.5, target_modules=["fc"]))
    mod = model.fc.adapters["default"]
    assert mod.indices.tolist() == [0, 1, 2, 3]
    # Δ = diag(3, -2): ‖Δ‖_* = 5, subgradient U Vᵀ = diag(1, -1)
    with torch.no_grad():
        mod.values.copy_(torch.tensor([3.0, 0.0, 0.0, -2.0]))
    reg = peftkit.regularization_loss(model)
    assert torch.allclose(reg, torch.tensor(2.5))
    reg.backward()
    assert torch.allclose(mod.values.grad, 0.5 * torch.tensor([1.0, 0.0, 0.0, -1.0]), atol=1e-6)
    # rank one: Δ = [[1, 2], [2, 4]] = 5 · v vᵀ, U Vᵀ = Δ / 5
    mod.values.grad = None
    with torch.no_grad():
        mod.values.copy_(torch.tensor([1.0, 2.0, 2.0, 4.0]))
    reg = peftkit.regularization_loss(model)
    assert torch.allclose(reg, torch.tensor(2.5), atol=1e-6)
    reg.backward()
    assert torch.allclose(mod.values.grad, 0.5 * torch.tensor([0.2, 0.4, 0.4, 0.8]), atol=1e-6)


def test_penalty_gradient_is_finite_and_zero_at_zero():
    d = torch.zeros(4, 3, requires_grad=True)
    v = NuclearNorm.apply(d)
    v.backward()
    assert v.item() == 0 and torch.equal(d.grad, torch.zeros(4, 3))
    d2 = torch.randn(5, 3, requires_grad=True)
    NuclearNorm.apply(d2).backward()
    ref = d2.detach().clone().requires_grad_(True)
    torch.linalg.matrix_norm(ref, ord="nuc").backward()
    assert torch.allclose(d2.grad, ref.grad, atol=1e-5)


def test_no_penalty_without_weight():
    model = Small()
    peftkit.attach(model, SaRA(target_modules=["fc"]))
    assert peftkit.regularization_loss(model).item() == 0.0


def test_reselection_moves_to_the_smallest_current_entries_and_keeps_the_function(tmp_path):
    model = Small()
    w0 = model.fc.weight.detach().clone()
    peftkit.attach(model, SaRA(quantile=0.25, reselect_every=1, target_modules=["fc"]))  # k = 3 of 12
    mod = model.fc.adapters["default"]
    old = mod.indices.clone()
    opt = torch.optim.Adam([mod.values], lr=0.1)
    mod.values.grad = torch.ones(3)
    opt.step()
    with torch.no_grad():
        mod.values.copy_(torch.tensor([5.0, 0.0, -0.0]))  # the first entry becomes large ("effective")
        opt.state[mod.values]["exp_avg"].copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(5, 4)
    y = model(x)
    current = (w0.reshape(-1).clone().index_add(0, old, mod.values.detach())).abs()
    expected = torch.topk(-current, 3).indices.sort().values
    assert mod.reselect(model.fc.base.weight, opt) == 1
    assert torch.equal(mod.indices, expected) and mod.values.numel() == 3
    assert mod.fixed_indices.tolist() == [int(old[0])] and mod.fixed_values.tolist() == [5.0]
    assert torch.allclose(model(x), y)  # re-selection does not change the model
    for j, i in enumerate(mod.indices.tolist()):
        if i in old.tolist():
            assert opt.state[mod.values]["exp_avg"][j] == old.tolist().index(i) + 1
        else:
            assert mod.values[j] == 0 and opt.state[mod.values]["exp_avg"][j] == 0
    # merge and save/load carry the frozen part
    with torch.no_grad():
        mod.values.add_(0.5)
    y2 = model(x)
    peftkit.save(model, tmp_path / "a")
    fresh = Small()
    peftkit.load(fresh, tmp_path / "a")
    assert torch.allclose(fresh(x), y2, atol=1e-6)
    assert fresh.fc.adapters["default"].fixed_indices.tolist() == [int(old[0])]
    peftkit.merge(model)
    merged = model.fc.base.weight.detach().reshape(-1)
    touched = set(mod.indices.tolist()) | set(mod.fixed_indices.tolist())
    for i in range(12):
        if i not in touched:
            assert merged[i] == w0.reshape(-1)[i]
    assert torch.allclose(model(x), y2, atol=1e-6)


def test_reselection_through_the_hooks_keeps_the_fraction_and_the_untouched_entries(tmp_path):
    model, inputs, out = llama()
    peftkit.attach(model, SaRA(quantile=0.1, reselect_every=2, target_modules=["q_proj", "v_proj"]))
    w0 = {p: model.get_submodule(p).base.weight.detach().clone() for p in peftkit.get_adapter(model, "default")}
    train_tiny(model, inputs, tmp_path / "run", steps=5, lr=0.5)
    mods = peftkit.get_adapter(model, "default")
    assert any(m.fixed_indices.numel() for m in mods.values())  # large steps made some entries leave
    with torch.no_grad():
        y = out(model(**inputs))
    for p, m in mods.items():
        assert m.values.numel() == round(0.1 * w0[p].numel())
    peftkit.merge(model)
    for p, m in mods.items():
        merged = model.get_submodule(p).base.weight.detach().reshape(-1)
        off = torch.ones(merged.numel(), dtype=torch.bool)
        off[m.indices] = False
        off[m.fixed_indices] = False
        assert torch.equal(merged[off], w0[p].reshape(-1)[off])
    with torch.no_grad():
        assert torch.allclose(out(model(**inputs)), y, atol=1e-5)
    loaded = peftkit.load(llama()[0], tmp_path / "run" / "adapter")
    with torch.no_grad():
        assert torch.allclose(out(loaded(**inputs)), y, atol=1e-5)


@pytest.mark.parametrize("kw,culprit", [
    (dict(quantile=0.0), "quantile"),
    (dict(reselect_every=-2), "reselect_every"),
    (dict(quantile=1.2), "quantile"),
    (dict(nuclear_weight=-1.0), "nuclear_weight"),
    (dict(nuclear_weight=float("nan")), "nuclear_weight"),
])
def test_bad_input_named_before_the_model_is_touched(kw, culprit):
    model, _, _ = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.ConfigError, match=culprit):
        peftkit.attach(model, SaRA(target_modules=["q_proj"], **kw))
    assert not peftkit.adapter_names(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
