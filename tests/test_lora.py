"""LoRA math against peft: gradients, PiSSA/MiLoRA, LoRA+ (files both ways: tests/parity_cases.py)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

import peftkit

from .models import MODELS
from .models import outputs as _outputs


def test_gradients_equal_peft():
    model, inputs, out = MODELS["llama"](0)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "down_proj"]))
    ours, _, _ = MODELS["llama"](0)
    peftkit.attach(ours, peftkit.LoRA(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    mine = peftkit.adapter_parameters(ours)
    with torch.no_grad():
        for n, p in mine.items():
            path, leaf = n.split(".adapters.default.")
            p.copy_(theirs[f"base_model.model.{path}.{leaf}.default.weight"])
    for m in (pm, ours):
        out(m(**inputs)).pow(2).mean().backward()
    for n, p in mine.items():
        path, leaf = n.split(".adapters.default.")
        ref = theirs[f"base_model.model.{path}.{leaf}.default.weight"].grad
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-7), n


def test_pissa_matches_peft():
    init = "pissa"
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=["q_proj", "up_proj"]))
    ours, _, _ = MODELS["llama"](0)
    peftkit.attach(ours, peftkit.LoRA(r=4, alpha=8, init=init, target_modules=["q_proj", "up_proj"]))
    assert torch.allclose(_outputs(ours, inputs, out), y0, atol=1e-5)  # residual + BA = W
    for n, p in peftkit.adapter_parameters(ours).items():
        path, leaf = n.split(".adapters.default.")
        ref = pm.get_parameter(f"base_model.model.{path}.{leaf}.default.weight")
        assert torch.allclose(p, ref, atol=1e-5), n
    w_ours = ours.model.layers[0].self_attn.q_proj.base.weight
    w_peft = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.allclose(w_ours, w_peft, atol=1e-6)  # both keep the residual in the base


def test_pissa_trains_principal_directions():
    model, _, _ = MODELS["llama"](0)
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=4, init="pissa", target_modules=["layers.0.self_attn.q_proj"]))
    layer = next(iter(peftkit.get_adapter(model, "default").values()))
    s = torch.linalg.svdvals(w)
    ba = (layer.lora_B @ layer.lora_A).detach() * layer.scaling
    assert torch.allclose(torch.linalg.svdvals(ba)[:4], s[:4], rtol=1e-4)
    peftkit.unload(model)
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight, w, atol=1e-6)


def test_milora_trains_minor_directions():
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    w = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    peftkit.attach(model, peftkit.LoRA(r=3, alpha=6, init="milora", target_modules=["up_proj"]))
    assert torch.allclose(_outputs(model, inputs, out), y0, atol=1e-5)
    layer = peftkit.get_adapter(model, "default")["model.layers.1.mlp.up_proj"]
    ba = (layer.lora_B @ layer.lora_A).detach() * layer.scaling
    s = torch.linalg.svdvals(w)
    assert torch.allclose(torch.linalg.svdvals(ba)[:3], s[-3:], rtol=1e-4, atol=1e-6)
    residual = model.model.layers[1].mlp.up_proj.base.weight
    assert torch.allclose(torch.linalg.svdvals(residual)[:-3], s[:-3], rtol=1e-4, atol=1e-6)


def test_rslora_scale():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, peftkit.LoRA(r=16, alpha=8, use_rslora=True, target_modules=["q_proj"]))
    layer = next(iter(peftkit.get_adapter(model, "default").values()))
    assert layer.scaling == pytest.approx(8 / math.sqrt(16))


def test_lora_plus_groups():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, peftkit.LoRA(r=4, target_modules=["q_proj", "embed_tokens"]))
    groups = peftkit.lora_plus_param_groups(model, lr=1e-4, ratio=16)
    by_lr = {g["lr"]: g["params"] for g in groups}
    bs = {id(p) for n, p in peftkit.adapter_parameters(model).items() if n.endswith("lora_B") and "q_proj" in n}
    assert {id(p) for p in by_lr[1.6e-3]} == bs
    assert len(by_lr[1e-6]) == 2  # the embedding adapter's A and B
    assert sum(len(g["params"]) for g in groups) == len(peftkit.adapter_parameters(model))
    torch.optim.AdamW(groups)  # a valid optimizer spec


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"]),
                                          ("bert", ["query", "dense"])])
def test_fused_path_equals_composed_path(arch, targets):
    """The one-node LoRA linear gives the same outputs and gradients (adapter and input) as base + adapt_output."""
    from peftkit.core.site import AdapterSite

    model, inputs, out = MODELS[arch](0)
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()  # the models' own dropout off; gradients still flow

    def grads():
        for p in model.parameters():
            p.grad = None
        y = out(model(**inputs))
        y.pow(2).mean().backward()
        return y.detach(), {k: p.grad.clone() for k, p in peftkit.adapter_parameters(model).items()}

    y_fused, g_fused = grads()
    sites = [m for m in model.modules() if isinstance(m, AdapterSite)]
    calls = []
    for s in sites:
        mod = s.adapters["default"]
        mod.fused_forward = lambda x, site, calls=calls: calls.append(1)  # disabled: returns None
    y_ref, g_ref = grads()
    assert len(calls) >= len(sites)
    assert torch.allclose(y_fused, y_ref, atol=1e-5, rtol=1e-5)
    for k in g_ref:
        assert torch.allclose(g_fused[k], g_ref[k], atol=1e-6, rtol=1e-4), k
