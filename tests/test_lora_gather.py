"""LoRA mixed batches through stacked factors (peftkit.methods.lora_gather): ranks, caching, gradients."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.model import iter_sites
from tests.models import tiny_llama


def _randomise(model, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _alone(model, inputs, name):
    if name is None:
        with peftkit.disabled(model):
            return model(**inputs).logits
    peftkit.activate(model, name)
    return model(**inputs).logits


def _check_rows(model, inputs, rows) -> torch.Tensor:
    """A mixed batch gives every row what its adapter (or the base) gives alone; the mixed logits."""
    with torch.no_grad():
        refs = {n: _alone(model, inputs, n) for n in set(rows)}
        with peftkit.mixed_batch(model, rows):
            ym = model(**inputs).logits
    for i, n in enumerate(rows):
        torch.testing.assert_close(ym[i], refs[n][i], rtol=1e-5, atol=1e-5)
    return ym


@pytest.fixture
def three():
    model, inputs, _ = tiny_llama()
    for i, r in enumerate((2, 8, 4)):
        peftkit.attach(model, peftkit.LoRA(r=r, alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"]),
                       name=f"a{i}")
        _randomise(model, f"a{i}", seed=i)
    return model, inputs


def _stacks(model):
    return [s.__dict__.get("_lora_factor_stack") for _, s in iter_sites(model)]


def test_adapters_of_different_ranks_share_one_gathered_product(three):
    model, inputs = three
    rows = ["a1", None, "a0", "a2"]
    _check_rows(model, inputs, rows)
    stacks = _stacks(model)
    assert all(s is not None for s in stacks), "every site took the gathered path"
    assert {tuple(s.a.shape[:2]) for s in stacks} == {(4, 8)}  # 3 adapters + the zero slot, padded to r_max = 8


def test_the_cached_stack_follows_in_place_writes_deletes_and_new_adapters(three):
    model, inputs = three
    rows = ["a0", "a1", "a2", "a0"]

    def check():
        return _check_rows(model, inputs, rows)

    first = check()
    before = _stacks(model)
    check()
    assert all(a is b for a, b in zip(before, _stacks(model), strict=True)), "unchanged adapters reuse the stacks"
    _randomise(model, "a1", seed=11)  # in place: version counters move
    second = check()
    assert not torch.allclose(first[1], second[1])
    torch.testing.assert_close(first[0], second[0])
    peftkit.delete(model, "a2")  # a new adapter under an old name, with another rank
    peftkit.attach(model, peftkit.LoRA(r=3, target_modules=["q_proj", "v_proj", "down_proj"]), name="a2")
    _randomise(model, "a2", seed=12)
    check()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.adapters["a0"].scaling *= 2.0  # a plain attribute, also tracked
    check()


def test_gradients_of_a_mixed_batch_equal_each_adapters_own(three):
    model, inputs = three
    rows = ["a0", "a2", "a0", "a1"]
    params = {n: peftkit.adapter_parameters(model, n) for n in ("a0", "a1", "a2")}
    for ps in params.values():
        for p in ps.values():
            p.requires_grad_(True)
    with peftkit.mixed_batch(model, rows):
        model(**inputs).logits.pow(2).sum().backward()
    mixed = {n: {k: p.grad.clone() for k, p in ps.items()} for n, ps in params.items()}
    for n, ps in params.items():
        for p in ps.values():
            p.grad = None
        keep = torch.tensor([i for i, r in enumerate(rows) if r == n])
        peftkit.activate(model, n)
        sub = {k: v.index_select(0, keep) for k, v in inputs.items()}
        model(**sub).logits.pow(2).sum().backward()
        for k, p in ps.items():
            torch.testing.assert_close(mixed[n][k], p.grad, rtol=1e-3, atol=1e-4)
            p.grad = None


def test_a_cast_model_rebuilds_the_stacks(three):
    model, inputs = three
    rows = ["a0", "a1", None, "a2"]
    with torch.no_grad(), peftkit.mixed_batch(model, rows):
        model(**inputs)
    model.to(torch.float64)
    with torch.no_grad():
        refs = {n: _alone(model, inputs, n) for n in set(rows)}
        with peftkit.mixed_batch(model, rows):
            ym = model(**inputs).logits
    assert ym.dtype == torch.float64 and all(s.a.dtype == torch.float64 for s in _stacks(model))
    for i, n in enumerate(rows):
        torch.testing.assert_close(ym[i], refs[n][i], rtol=1e-10, atol=1e-10)


def test_the_cached_site_list_follows_new_sites_and_unloads(three):
    """mixed_batch keeps the model's site list between calls; attaching to new modules or unloading renews it."""
    from peftkit.core.model import site_list

    model, inputs = three
    with torch.no_grad(), peftkit.mixed_batch(model, ["a0"] * 4):
        model(**inputs)
    first, _ = site_list(model)
    assert site_list(model)[0] is first  # no second walk while nothing changed
    peftkit.attach(model, peftkit.LoRA(r=2, target_modules=["o_proj"]), name="new")  # sites on other modules
    _randomise(model, "new", seed=7)
    rows = ["new", "a0", "new", None]  # "new" is not on q_proj/v_proj, "a0" not on o_proj
    _check_rows(model, inputs, rows)
    assert len(site_list(model)[0]) > len(first)
    peftkit.unload(model)
    assert site_list(model)[0] == []
    with pytest.raises(peftkit.PeftkitError, match="new"):
        with peftkit.mixed_batch(model, ["new"]):
            pass
