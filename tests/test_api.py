"""Engine behaviour: stacking, disabling, mixed batches, merging, summary, parameters."""

from __future__ import annotations

import pytest
import torch

import peftkit

from .models import MODELS


def run(model, inputs, out):
    with torch.no_grad():
        return out(model(**inputs))


def two_adapters(ranks=(4, 4)):
    model, inputs, out = MODELS["llama"](0)
    for name, r in zip("ab", ranks, strict=True):
        peftkit.attach(model, peftkit.LoRA(r=r, alpha=2 * r, target_modules="all-linear"), name=name)
        with torch.no_grad():
            for p in peftkit.adapter_parameters(model, name).values():
                p.normal_(0, 0.1)
    return model, inputs, out


def test_stacked_adapters_add_their_deltas():
    model, inputs, out = two_adapters()
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    peftkit.activate(model, ["a", "b"])
    with torch.no_grad():
        got = q(x)
        want = q.base(x) + sum(q.adapters[n].delta_matrix() @ x.T for n in "ab").T
    assert torch.allclose(got, want, atol=1e-5)
    y = run(model, inputs, out)
    peftkit.merge(model)
    assert torch.allclose(run(model, inputs, out), y, atol=1e-4)


def test_disabled_gives_base_even_when_merged():
    model, inputs, out = two_adapters()
    with peftkit.disabled(model):
        y0 = run(model, inputs, out)
    peftkit.merge(model, "a")
    peftkit.activate(model, "a")
    ya = run(model, inputs, out)
    with peftkit.disabled(model):
        assert torch.allclose(run(model, inputs, out), y0, atol=1e-5)
    assert torch.allclose(run(model, inputs, out), ya, atol=1e-5)  # merged again afterwards
    assert model.model.layers[0].self_attn.q_proj.merged == ["a"]


@pytest.mark.parametrize("ranks", [(4, 4), (4, 2)])  # same rank: gathered bmm path; different: grouped path
def test_mixed_batch_paths(ranks):
    model, inputs, out = two_adapters(ranks)
    rows = ["b", "a", None, "b"]
    refs = {}
    for n in "ab":
        peftkit.activate(model, n)
        refs[n] = run(model, inputs, out)
    with peftkit.disabled(model):
        refs[None] = run(model, inputs, out)
    with peftkit.mixed_batch(model, rows):
        got = run(model, inputs, out)
    for i, n in enumerate(rows):
        assert torch.allclose(got[i], refs[n][i], atol=1e-5), i


def test_mixed_batch_wrong_length():
    model, inputs, out = two_adapters()
    with pytest.raises(peftkit.PeftkitError, match="3 adapter names but the batch has 4 rows"):
        with peftkit.mixed_batch(model, ["a", "b", None]):
            run(model, inputs, out)


def test_unload_with_merge_keeps_outputs_and_removes_everything():
    model, inputs, out = two_adapters()
    peftkit.activate(model, ["a", "b"])
    y = run(model, inputs, out)
    peftkit.unload(model, merge=True)
    assert torch.allclose(run(model, inputs, out), y, atol=1e-4)
    assert peftkit.adapter_names(model) == []
    assert not any("adapters" in n for n, _ in model.named_parameters())


def test_summary_and_parameters():
    model, _, _ = two_adapters((4, 2))
    table = peftkit.summary(model)
    assert "a" in table and "lora" in table and "14" in table
    params = peftkit.adapter_parameters(model, "b")
    n = sum(p.numel() for p in params.values())
    expected = sum(2 * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if name.endswith(".base") and isinstance(m, torch.nn.Linear))
    assert n == expected
    assert f"{n:,}" in table
    named = dict(model.named_parameters())
    assert all(named[k] is p for k, p in params.items())


def test_train_one_adapter_while_others_stay_frozen():
    model, inputs, out = two_adapters()
    peftkit.set_trainable(model, "a")
    peftkit.activate(model, ["a", "b"])
    before = {k: v.detach().clone() for k, v in peftkit.adapter_parameters(model, "b").items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out(model(**inputs)).pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in peftkit.adapter_parameters(model, "b").items())
    assert all(p.grad is not None for p in peftkit.adapter_parameters(model, "a").values())


def test_site_exposes_base_attributes():
    model, _, _ = two_adapters()
    q = model.model.layers[0].self_attn.q_proj
    assert q.in_features == 32 and q.weight is q.base.weight


def test_adapters_follow_to():
    model, inputs, out = two_adapters()
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in peftkit.adapter_parameters(model).values())
    assert run(model, inputs, out).dtype == torch.float64
