"""SpIEL (Ansell et al. 2024), AG variant: peft has none, so the defining properties.

The density never changes through drop and regrow; the dropped entries are those whose delta
changed least since the last update and the regrown ones the largest accumulated gradients
outside the support (checked on a hand example); regrown deltas start at 0 with a zeroed
optimizer state; merging ``θ0 + scatter(η, φ)`` equals the unmerged model; the saved state and
the parameter bytes are proportional to the density; it trains through ``peftkit.train``.
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.methods.spiel import SpIEL

from .sparse_helpers import Small, base_state, hook_loop, llama, train_tiny

X = [torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.5, -1.0, 0.0, 2.0]]), torch.tensor([[1.0, 1.0, -1.0, 0.5]])]
C = torch.tensor([1.0, -2.0])


def test_drop_least_changed_and_regrow_largest_gradient_by_hand():
    model = Small()
    peftkit.attach(model, SpIEL(density=0.5, target_modules=["fc"]))  # k = 6 of 12
    mod = model.fc.adapters["default"]
    opt = torch.optim.Adam([mod.values], lr=0.1)
    mod.values.grad = torch.ones(6)
    opt.step()  # Adam state exists for every slot
    with torch.no_grad():
        mod.anchor.copy_(torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.5]))
        mod.values.copy_(torch.tensor([0.9, 1.05, -0.3, 2.0, 0.01, 1.5]))  # changes 0.9 .05 .3 0 .01 1.0
    old_idx = mod.indices.clone()
    old_vals = mod.values.detach().clone()
    exp_avg = opt.state[mod.values]["exp_avg"]
    with torch.no_grad():
        exp_avg.copy_(torch.arange(1.0, 7.0))
    score = torch.arange(12.0)  # accumulated |Σ g|: the largest positions outside the support win
    mod.grad_score, mod.capture = score.view(3, 4).clone(), "sum"
    assert mod.drop_and_regrow(2, opt) == 2
    dropped = {int(old_idx[3]), int(old_idx[4])}  # changes 0 and 0.01
    outside = [i for i in range(12) if i not in set(old_idx.tolist())]
    grown = set(sorted(outside)[-2:])
    expected = sorted((set(old_idx.tolist()) - dropped) | grown)
    assert mod.indices.tolist() == expected
    assert mod.indices.numel() == 6 and mod.grad_score is None and mod.capture is None
    for j, i in enumerate(mod.indices.tolist()):
        if i in grown:
            assert mod.values[j] == 0 and exp_avg[j] == 0 and opt.state[mod.values]["exp_avg_sq"][j] == 0
        else:
            src = old_idx.tolist().index(i)
            assert mod.values[j] == old_vals[src] and exp_avg[j] == src + 1
    assert torch.equal(mod.anchor, mod.values.detach())


def test_hooks_accumulate_the_gradient_over_the_window_and_keep_the_density():
    model = Small()
    peftkit.attach(model, SpIEL(density=0.25, update_every=3, accumulation_steps=2, drop_fraction=0.34,
                                target_modules=["fc"]))
    mod = model.fc.adapters["default"]
    opt = torch.optim.SGD([mod.values], lr=0.1)
    old = mod.indices.clone()
    u = model.head.weight.detach().t() @ C
    acc = torch.outer(u, X[1][0] + X[2][0]).abs().reshape(-1)  # steps 1 and 2 are the window
    acc[old] = -1
    grown = int(torch.argmax(acc))
    for step in range(3):
        peftkit.before_step(model, step, 10, opt)
        assert mod.capture == (None if step == 0 else "sum")
        (model(X[step]) * C).sum().backward()
        peftkit.after_backward(model, step, 10, opt)
        opt.step()
        if step == 2:
            changes = mod.values.detach().abs()
            dropped = int(old[torch.argmin(changes)])
        peftkit.after_step(model, step, 10, opt)
        opt.zero_grad()
    assert mod.indices.numel() == 3
    assert set(mod.indices.tolist()) == (set(old.tolist()) - {dropped}) | {grown}


def test_density_constant_and_merge_equals_unmerged_after_training(tmp_path):
    model, inputs, out = llama()
    peftkit.attach(model, SpIEL(density=0.05, update_every=2, accumulation_steps=1, drop_fraction=0.5,
                                target_modules=["q_proj", "down_proj"]))
    mods = peftkit.get_adapter(model, "default")
    first = {p: m.indices.clone() for p, m in mods.items()}
    sizes = {p: m.indices.numel() for p, m in mods.items()}
    before = base_state(model)
    train_tiny(model, inputs, tmp_path / "run", steps=5)
    for p, m in mods.items():
        assert m.indices.numel() == sizes[p] and m.indices.unique().numel() == sizes[p]
        assert not torch.equal(m.indices, first[p])  # the support moved
        assert m.grad_score is None
    after = base_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        y = out(model(**inputs))
    expected = {}
    for p, m in mods.items():
        w = model.get_submodule(p).base.weight.detach()
        expected[p] = (w.reshape(-1).clone().index_add(0, m.indices, m.values.detach())).view(w.shape)
    peftkit.merge(model)
    for p in mods:
        assert torch.allclose(model.get_submodule(p).base.weight, expected[p], atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(out(model(**inputs)), y, atol=1e-5)
    loaded = peftkit.load(llama()[0], tmp_path / "run" / "adapter")
    peftkit.unmerge(model)
    with torch.no_grad():
        assert torch.allclose(out(loaded(**inputs)), y, atol=1e-5)


def test_memory_is_proportional_to_density():
    def state_bytes(density: float) -> tuple[int, int]:
        model, _, _ = llama()
        peftkit.attach(model, SpIEL(density=density, target_modules="all-linear"))
        mods = peftkit.get_adapter(model, "default")
        params = sum(p.numel() * p.element_size() for p in peftkit.adapter_parameters(model).values())
        saved = sum(t.numel() * t.element_size() for m in mods.values() for t in m.state_dict().values())
        return params, saved

    model, _, _ = llama()
    numels = [m.weight.numel() for n, m in model.named_modules() if n.endswith("_proj")]
    for d in (0.02, 0.04, 0.08):
        params, saved = state_bytes(d)
        k = sum(round(d * n) for n in numels)
        assert params == 4 * k  # float32 deltas
        assert saved == 12 * k  # + int64 indices
    p1, _ = state_bytes(0.02)
    p4, _ = state_bytes(0.08)
    assert 3.9 < p4 / p1 < 4.1


def test_the_last_update_keeps_the_learned_deltas():
    model = Small()
    peftkit.attach(model, SpIEL(density=0.5, update_every=2, accumulation_steps=1, target_modules=["fc"]))
    mod = model.fc.adapters["default"]
    opt = torch.optim.SGD([mod.values], lr=0.1)
    hook_loop(model, 2, lambda s: (model(X[s]) * C).sum(), opt)  # step 1 is the last: no drop
    idx = mod.indices.clone()
    assert mod.grad_score is None and mod.capture is None
    hook_loop(model, 2, lambda s: (model(X[s]) * C).sum(), opt)
    assert torch.equal(mod.indices, idx)


@pytest.mark.parametrize("kw,culprit", [
    (dict(density=0), "density"),
    (dict(update_every=0), "update_every"),
    (dict(drop_fraction=1.5), "drop_fraction"),
    (dict(accumulation_steps=30, update_every=10), "accumulation_steps=30"),
    (dict(accumulation_steps=-1), "accumulation_steps"),
])
def test_bad_input_named_before_the_model_is_touched(kw, culprit):
    model, _, _ = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.ConfigError, match=culprit):
        peftkit.attach(model, SpIEL(target_modules=["q_proj"], **kw))
    assert not peftkit.adapter_names(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["spiel", "sara", "hft"])
def test_to_dtype_after_attach(method):
    from peftkit.methods.hft import HFT
    from peftkit.methods.sara import SaRA

    cfg = {"spiel": lambda: SpIEL(density=0.1), "sara": lambda: SaRA(nuclear_weight=1e-3), "hft": lambda: HFT()}[method]()
    cfg.target_modules = ["q_proj", "v_proj"]
    model, inputs, out = llama()
    peftkit.attach(model, cfg)
    model.to(torch.float64)
    model.train()
    y = out(model(**inputs))
    assert y.dtype == torch.float64
    (y.pow(2).mean() + peftkit.regularization_loss(model)).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in peftkit.adapter_parameters(model).values())


def test_a_loaded_adapter_measures_the_change_from_its_loaded_deltas(tmp_path):
    model = Small()
    peftkit.attach(model, SpIEL(density=0.5, target_modules=["fc"]))
    with torch.no_grad():
        model.fc.adapters["default"].values.normal_()
    peftkit.save(model, tmp_path / "a")
    fresh = Small()
    peftkit.load(fresh, tmp_path / "a", trainable=True)
    mod = fresh.fc.adapters["default"]
    assert torch.equal(mod.anchor, mod.values.detach()) and torch.count_nonzero(mod.anchor) > 0
