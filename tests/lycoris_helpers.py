"""Helpers shared by the LoHa and LoKr peft-parity tests: copy peft's weights into peftkit's adapter."""

from __future__ import annotations

import torch

import peftkit


def peft_param_name(ours: str) -> str:
    """``model.layers.0.q_proj.adapters.default.hada_w1_a`` →
    peft's ``base_model.model.model.layers.0.q_proj.hada_w1_a.default``."""
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


def assert_files_both_ways(arch: str, peft_config, ours_config, tmp_path) -> None:
    """A peft-saved file loads in peftkit with peft's outputs, and peftkit's HF export loads in peft with ours."""
    from peft import PeftModel, get_peft_model

    from .models import MODELS, outputs

    model, inputs, out = MODELS[arch](0)
    pm = get_peft_model(model, peft_config).eval()
    ref = outputs(pm, inputs, out)
    pm.save_pretrained(tmp_path / "peft")
    base, _, _ = MODELS[arch](0)
    peftkit.load(base, tmp_path / "peft")
    assert torch.allclose(outputs(base, inputs, out), ref, atol=1e-5, rtol=1e-4)

    ours, _, _ = MODELS[arch](0)
    peftkit.attach(ours, ours_config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(ours).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    mine = outputs(ours, inputs, out)
    peftkit.save(ours, tmp_path / "ours", format="hf")
    fresh, _, _ = MODELS[arch](0)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    assert torch.allclose(outputs(loaded, inputs, out), mine, atol=1e-5, rtol=1e-4)
