"""The contract every registered method meets, run over every case in ``tests/cases``."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.site import AdapterSite

from .cases import all_cases
from .models import MODELS

CASES = all_cases()
IDS = [c.id for c in CASES]


def build(case, seed: int = 0):
    model, inputs, out = MODELS[case.model](seed)
    return model, inputs, out


def run(model, inputs, out) -> torch.Tensor:
    with torch.no_grad():
        return out(model(**inputs)).float()


def perturb(model, name: str | None = None, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model, name).values():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." not in k}


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


def test_registry_covers_cases():
    methods = {c.config().method for c in CASES}
    assert methods <= set(peftkit.METHODS)
    missing = set(peftkit.METHODS) - methods
    assert not missing, f"registered methods without a contract case: {missing}"


def test_only_adapter_parameters_train(case):
    model, _inputs, _out = build(case)
    peftkit.attach(model, case.config())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    adapter = {id(p) for p in peftkit.adapter_parameters(model).values()}
    assert trainable == adapter and adapter


def test_gradients_reach_every_adapter_parameter(case):
    model, inputs, out = build(case)
    peftkit.attach(model, case.config())
    perturb(model)
    model.train()
    out(model(**inputs)).float().pow(2).mean().backward()
    for name, p in peftkit.adapter_parameters(model).items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)


def test_identity_at_init(case):
    if not case.identity_at_init:
        pytest.skip("the method does not start at the base model")
    model, inputs, out = build(case)
    y0 = run(model, inputs, out)
    peftkit.attach(model, case.config())
    assert rel_err(run(model, inputs, out), y0) <= case.tol


def test_merge_equals_unmerged_and_unmerge_restores(case):
    model, inputs, out = build(case)
    peftkit.attach(model, case.config())
    perturb(model)
    before = base_weights(model)
    y = run(model, inputs, out)
    if not case.mergeable:
        with pytest.raises(peftkit.NotMergeableError, match="default"):
            peftkit.merge(model)
        after = base_weights(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
        return
    peftkit.merge(model)
    assert rel_err(run(model, inputs, out), y) <= case.tol
    peftkit.unmerge(model)
    after = base_weights(model)
    for k in before:
        assert rel_err(after[k].float(), before[k].float()) <= 1e-5, k
    assert rel_err(run(model, inputs, out), y) <= case.tol


def test_unload(case):
    model, inputs, out = build(case)
    y0 = run(model, inputs, out)
    peftkit.attach(model, case.config())
    perturb(model)
    y = run(model, inputs, out)
    if case.mergeable:
        peftkit.unload(model, merge=True)
        assert rel_err(run(model, inputs, out), y) <= case.tol
        model, inputs, out = build(case)
        peftkit.attach(model, case.config())
        perturb(model)
    peftkit.unload(model)
    assert not any(isinstance(m, AdapterSite) for m in model.modules())
    assert rel_err(run(model, inputs, out), y0) <= case.tol


@pytest.mark.parametrize("fmt", ["peftkit", "hf"])
def test_save_load_round_trip(case, fmt, tmp_path):
    if fmt == "hf" and not case.hf:
        pytest.skip("no Hugging Face PEFT form")
    model, inputs, out = build(case)
    peftkit.attach(model, case.config())
    perturb(model)
    y = run(model, inputs, out)
    peftkit.save(model, tmp_path / "a", format=fmt)
    fresh, _, _ = build(case)
    peftkit.load(fresh, tmp_path / "a")
    assert rel_err(run(fresh, inputs, out), y) <= case.tol
    assert not any(p.requires_grad for p in fresh.parameters())
    fresh2, _, _ = build(case)
    peftkit.load(fresh2, tmp_path / "a", name="other", trainable=True)
    assert peftkit.adapter_names(fresh2) == ["other"]
    assert all(p.requires_grad for p in peftkit.adapter_parameters(fresh2).values())


def test_mixed_batch_equals_each_adapter_alone(case):
    model, inputs, out = build(case)
    peftkit.attach(model, case.config(), name="a")
    peftkit.attach(model, case.config(), name="b")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    rows = ["a", None, "b", "a"]
    if not case.mixed:
        with pytest.raises(peftkit.PeftkitError):
            with peftkit.mixed_batch(model, rows):
                run(model, inputs, out)
        return
    peftkit.activate(model, "a")
    ya = run(model, inputs, out)
    peftkit.activate(model, "b")
    yb = run(model, inputs, out)
    with peftkit.disabled(model):
        y0 = run(model, inputs, out)
    with peftkit.mixed_batch(model, rows):
        ym = run(model, inputs, out)
    for i, (n, ref) in enumerate(zip(rows, [ya, y0, yb, ya], strict=True)):
        assert rel_err(ym[i], ref[i]) <= case.tol, f"row {i} ({n})"


def test_half_precision_base_with_float32_adapter(case):
    model, inputs, out = build(case)
    model.to(torch.bfloat16)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    peftkit.attach(model, case.config())
    perturb(model)
    params = peftkit.adapter_parameters(model)
    assert all(p.dtype == torch.float32 for p in params.values() if p.is_floating_point())
    model.train()
    y = out(model(**inputs))
    assert torch.isfinite(y.float()).all()
    y.float().pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    model.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in params.values() if p.is_floating_point())


def test_two_adapters_delete_one(case):
    model, inputs, out = build(case)
    peftkit.attach(model, case.config(), name="a")
    perturb(model, "a")
    ya = run(model, inputs, out)
    peftkit.attach(model, case.config(), name="b")
    perturb(model, "b", seed=5)
    assert peftkit.active_names(model) == ["b"]
    assert not any(p.requires_grad for p in peftkit.adapter_parameters(model, "a").values())
    peftkit.delete(model, "b")
    assert peftkit.adapter_names(model) == ["a"]
    peftkit.activate(model, "a")
    assert rel_err(run(model, inputs, out), ya) <= case.tol
