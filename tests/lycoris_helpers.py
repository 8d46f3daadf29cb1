"""Helpers shared by the LoHa and LoKr peft-parity tests: copy peft's weights into peftkit's adapter."""

from __future__ import annotations

import torch

import peftkit


def peft_param_name(ours: str) -> str:
    """``model.layers.0.q_proj.adapters.default.hada_w1_a`` → peft's ``base_model.model.model.layers.0.q_proj.hada_w1_a.default``."""
    path, leaf = ours.split(".adapters.default.")
    return f"base_model.model.{path}.{leaf}.default"


def copy_from_peft(peft_model, model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Copy every trainable peft tensor into the peftkit adapter of the same place; both parameter dicts."""
    theirs = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    mine = peftkit.adapter_parameters(model)
    assert len(theirs) == len(mine), (sorted(theirs), sorted(mine))
    with torch.no_grad():
        for n, p in mine.items():
            ref = theirs[peft_param_name(n)]
            assert p.shape == ref.shape, (n, p.shape, ref.shape)
            p.copy_(ref)
    return theirs, mine


def assert_same_forward_and_gradients(peft_model, model, inputs, out, gradients: bool = True) -> None:
    theirs, mine = copy_from_peft(peft_model, model)
    a, b = out(peft_model(**inputs)), out(model(**inputs))
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())
    if not gradients:
        return
    a.pow(2).mean().backward()
    b.pow(2).mean().backward()
    for n, p in mine.items():
        ref = theirs[peft_param_name(n)].grad
        err = float((p.grad - ref).abs().max())
        assert err <= 1e-4 * float(ref.abs().max()) + 1e-7, (n, err, float(ref.abs().max()))
