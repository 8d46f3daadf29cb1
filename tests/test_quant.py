"""Quantized bases (peftkit.quant): NF4 and int8 through torchao, LoRA and DoRA on top, merging, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import quant
from peftkit.core.layers import dense_weight, is_quantized
from tests.models import tiny_llama

pytest.importorskip("torchao")

SCHEMES = ["nf4", "int8"]


def _layer(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 64)).to(dtype)


def _randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.normal_(0, 0.2)


def test_nf4_codebook_and_storage():
    """F01: 16 NF4 levels in [−1, 1] with an exact 0; ≈ 4.127 bits per weight with double quantization."""
    model = _layer()
    quant.quantize(model, "nf4", targets=["0"])
    w = model[0].weight
    levels = w.nf4
    assert levels.numel() == 16 and levels.min() == -1 and levels.max() == 1 and (levels == 0).any()
    bits = quant.storage_bytes(w) * 8 / w.numel()
    assert 4.0 < bits < 4.2
    deq = dense_weight(model[0])
    # every dequantized value is a level times its block's scale
    blocks = deq.reshape(-1, 64)
    scale = blocks.abs().amax(1, keepdim=True)
    ratio = blocks / scale
    assert torch.isclose(ratio.unsqueeze(-1), levels.float(), atol=1e-6).any(-1).all()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_on_quantized_base_is_dequantized_weight_plus_low_rank(scheme, dtype):
    """y = x deq(Q)ᵀ + b + s·B A x, and the gradients of x, A, B are those of that formula."""
    model = _layer(dtype)
    quant.quantize(model, scheme, targets=["0"])
    assert quant.quantized_layers(model) == {"0": scheme}
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=["0"]))
    _randomise(model)
    site = model[0]
    ad = site.adapters["default"]
    assert ad.lora_A.dtype == torch.float32
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    y = model(x)
    y.backward(torch.ones_like(y))
    a, b = ad.lora_A.detach().double().requires_grad_(), ad.lora_B.detach().double().requires_grad_()
    x2 = x.detach().double().requires_grad_()
    w = dense_weight(site.base).double()
    ref = F.linear(x2, w, site.base.bias.double()) + 2.0 * (x2 @ a.t()) @ b.t()
    ref.backward(torch.ones_like(ref))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * 10)
    assert torch.allclose(x.grad.double(), x2.grad, rtol=tol, atol=tol * 10)
    assert torch.allclose(ad.lora_A.grad.double(), a.grad, rtol=tol, atol=tol * 10)
    assert torch.allclose(ad.lora_B.grad.double(), b.grad, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_lora_saves_no_dense_weight_for_backward(scheme):
    model = _layer()
    quant.quantize(model, scheme, targets=["0"])
    peftkit.attach(model, peftkit.LoRA(r=4, target_modules=["0"]))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(torch.randn(2, 128, requires_grad=True))
    dense = [t for t in saved if type(t) is torch.Tensor and t.shape == (64, 128)]
    assert not dense and any(is_quantized(t) for t in saved)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dora_on_quantized_base_equals_dora_on_the_dequantized_base(scheme):
    model = _layer()
    quant.quantize(model, scheme, targets=["0"])
    dense = _layer()
    with torch.no_grad():
        dense[0].weight.copy_(dense_weight(model[0]))
    for m in (model, dense):
        peftkit.attach(m, peftkit.DoRA(r=4, alpha=8, target_modules=["0"]))
    _randomise(model)
    with torch.no_grad():
        ours, theirs = peftkit.adapter_parameters(model), peftkit.adapter_parameters(dense)
        assert ours.keys() == theirs.keys()
        for n, p in ours.items():
            theirs[n].copy_(p)
    x = torch.randn(4, 128)
    assert torch.allclose(model(x), dense(x), atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", [peftkit.LoRA, peftkit.DoRA])
def test_merge_requantizes_and_reports_the_error_unmerge_restores(scheme, method):
    model = _layer()
    quant.quantize(model, scheme, targets=["0"])
    peftkit.attach(model, method(r=4, alpha=8, target_modules=["0"]))
    _randomise(model)
    x = torch.randn(4, 128)
    before = model(x).detach()
    q0 = model[0].base.weight
    target = dense_weight(model[0].base) + model[0].adapters["default"].delta_weight(model[0].base)
    peftkit.merge(model)
    errs = quant.merge_errors(model)
    assert list(errs) == ["0"]
    new = dense_weight(model[0].base)
    expected = float(torch.linalg.vector_norm(new - target) / torch.linalg.vector_norm(target))
    assert errs["0"] == pytest.approx(expected, rel=1e-4) and 0 < errs["0"] < 0.2
    assert is_quantized(model[0].base.weight)
    merged = model(x).detach()
    assert (merged - before).norm() / before.norm() < 2 * errs["0"] + 1e-3
    peftkit.unmerge(model)
    assert model[0].base.weight is q0 and quant.merge_errors(model) == {}
    assert torch.allclose(model(x), before)


def test_unload_merge_refuses_a_quantized_base_then_works_after_dequantize():
    model, inputs, out = tiny_llama()
    quant.quantize(model, "nf4")
    peftkit.attach(model, peftkit.LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise(model)
    with pytest.raises(peftkit.NotMergeableError, match=r"model\.layers\.0\.self_attn\.q_proj.*dequantize"):
        peftkit.unload(model, merge=True)
    assert peftkit.adapter_names(model) == ["default"]  # nothing was changed
    with torch.no_grad():
        expected = out(model(**inputs))
    quant.dequantize(model)
    assert quant.quantized_layers(model) == {}
    peftkit.unload(model, merge=True)
    with torch.no_grad():
        assert torch.allclose(out(model(**inputs)), expected, atol=1e-5)


def test_qlora_trains_the_adapter_and_leaves_the_quantized_base_untouched():
    model, inputs, _ = tiny_llama()
    quant.quantize(model, "nf4")
    assert len(quant.quantized_layers(model)) == 14  # 7 linears × 2 blocks; the head is left dense
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules="all-linear"))
    q = model.model.layers[0].mlp.up_proj.base.weight
    data = q.quantized_data.clone()
    opt = torch.optim.AdamW(peftkit.adapter_parameters(model).values(), lr=1e-2)
    batch = dict(inputs, labels=inputs["input_ids"])
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.model.layers[0].mlp.up_proj.base.weight is q and torch.equal(q.quantized_data, data)


def test_quantize_errors_name_the_culprit_before_any_change():
    model, _, _ = tiny_llama()
    with pytest.raises(peftkit.ConfigError, match=r"'nf5' is not one of nf4, int8.*nf4"):
        quant.quantize(model, "nf5")
    with pytest.raises(peftkit.TargetError, match="q_prj"):
        quant.quantize(model, "nf4", targets=["q_prj"])
    odd = nn.Sequential(nn.Linear(8, 4), nn.Linear(128, 64))  # 32 weights: not a multiple of 64
    with pytest.raises(peftkit.TargetError, match="0: nf4 needs a weight whose size is a multiple of 64"):
        quant.quantize(odd, "nf4", targets=["0", "1"])
    assert quant.quantized_layers(odd) == {}
    quant.quantize(model, "int8", targets=["q_proj"])
    with pytest.raises(peftkit.TargetError, match="already quantized"):
        quant.quantize(model, "nf4", targets=["q_proj"])
    with pytest.raises(peftkit.TargetError, match="ia3 cannot adapt a layer with a quantized weight"):
        peftkit.attach(copy.deepcopy(model), peftkit.IA3(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(peftkit.TargetError, match="init='pissa' rewrites the base weight"):
        peftkit.attach(model, peftkit.LoRA(r=2, init="pissa", target_modules=["q_proj"]))


def test_cli_train_quantize_flag(tmp_path):
    """`peftkit train --quantize nf4` refuses an unknown scheme before loading anything."""
    from peftkit.cli.main import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    rc = main(["train", "--model", "smollm2-135m", "--task", "causal-lm", "--method", "lora", "--data", str(data),
               "--output", str(tmp_path / "o"), "--quantize", "nf3"])
    assert rc == 2 and not (tmp_path / "o").exists()
