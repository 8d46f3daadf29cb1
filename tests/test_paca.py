"""PaCA: only the chosen columns change, gradients equal a dense reference, one GEMM in the forward,
and the layer keeps r/in of LoRA's input bytes for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peftkit
from peftkit.methods.paca import PaCA, choose_columns

from .models import MODELS

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv"}


class CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.rstrip("_") in MATMULS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _layer(model, name="default"):
    return next(iter(peftkit.get_adapter(model, name).values()))


def _linear(seed=0, d_in=24, d_out=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def test_only_the_chosen_columns_change_after_a_step():
    model, inputs, out = MODELS["llama"](0)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    peftkit.attach(model, PaCA(r=3, target_modules="all-linear"))
    opt = torch.optim.SGD(peftkit.adapter_parameters(model).values(), lr=0.5)
    model.train()
    out(model(**inputs)).float().pow(2).mean().backward()
    opt.step()
    # the forward put every base weight back exactly
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n.endswith(".base"):
            assert torch.equal(m.weight, before[n[: -len(".base")]]), n
    layers = peftkit.get_adapter(model, "default")
    peftkit.merge(model)
    for path, mod in layers.items():
        w = model.get_submodule(path).weight.detach()
        idx = mod.indices
        others = torch.ones(w.shape[1], dtype=torch.bool)
        others[idx] = False
        assert torch.equal(w[:, others], before[path][:, others]), path  # untouched, bitwise
        assert torch.equal(w[:, idx], mod.paca_P.detach()), path        # merge writes P back
        assert not torch.equal(w[:, idx], before[path][:, idx]), path


def _conv1d(seed=0, d_in=24, d_out=16):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    layer = Conv1D(d_out, d_in)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return nn.Sequential(layer)


@pytest.mark.parametrize("layer", ["linear", "hf_conv1d"])
@pytest.mark.parametrize("path", ["fused", "general"])
def test_gradients_equal_a_dense_reference(path, layer):
    model = _linear() if layer == "linear" else _conv1d()
    lin = model[0]
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    if layer == "hf_conv1d":
        w0 = w0.t().contiguous()  # the (out, in) matrix view
    peftkit.attach(model, PaCA(r=5, target_modules=["0"]))
    if path == "general":  # a second adapter (zero update) stacked on it forces the functional-weight path
        peftkit.attach(model, peftkit.LoRA(r=2, target_modules=["0"]), name="other")
        peftkit.activate(model, ["default", "other"])
        peftkit.set_trainable(model, ["default"])
        with torch.no_grad():
            _layer(model, "other").lora_B.zero_()
    mod = _layer(model)
    with torch.no_grad():
        mod.paca_P.add_(torch.randn(mod.paca_P.shape, generator=torch.Generator().manual_seed(4)))
    x = torch.randn(2, 3, 24, requires_grad=True)
    model(x).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    w = w0.clone().requires_grad_(True)
    with torch.no_grad():
        w[:, mod.indices] = mod.paca_P
    nn.functional.linear(xr, w, b0).pow(2).sum().backward()
    assert torch.allclose(mod.paca_P.grad, w.grad[:, mod.indices], atol=1e-5)
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)


@pytest.mark.parametrize("layer", ["linear", "hf_conv1d"])
def test_forward_is_one_matmul_and_lora_is_three(layer):
    x = torch.randn(4, 24)
    model = peftkit.attach(_linear() if layer == "linear" else _conv1d(), PaCA(r=4, target_modules=["0"]))
    for grad in (False, True):
        with torch.set_grad_enabled(grad), CountMatmuls() as c:
            model(x)
        assert c.count == 1
    lora = peftkit.attach(_linear(), peftkit.LoRA(r=4, target_modules=["0"]))
    with torch.no_grad(), CountMatmuls() as c:
        lora(x)
    assert c.count == 3


def _saved_activation_bytes(model, x) -> int:
    """Bytes saved for backward that are not parameters or buffers, counted once per storage."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


@pytest.mark.parametrize("layer", ["linear", "hf_conv1d"])
def test_saved_bytes_are_r_over_d_in_of_loras_input(layer):
    d_in, r, tokens = 48, 6, 2 * 10
    x = torch.randn(2, 10, d_in)
    base = _linear(d_in=d_in) if layer == "linear" else _conv1d(d_in=d_in)
    paca = peftkit.attach(base, PaCA(r=r, target_modules=["0"]))
    lora = peftkit.attach(_linear(d_in=d_in), peftkit.LoRA(r=r, target_modules=["0"]))
    b_paca, b_lora = _saved_activation_bytes(paca, x), _saved_activation_bytes(lora, x)
    assert b_paca == tokens * r * 4                 # x[..., idx] only
    assert b_lora == tokens * (d_in + r) * 4        # x for ∂A plus h = xAᵀ for ∂B
    assert b_paca / (tokens * d_in * 4) == r / d_in  # r/d_in of the input LoRA keeps


def test_whole_model_keeps_fewer_bytes_than_lora():
    model, inputs, _ = MODELS["llama"](0)
    lora, _, _ = MODELS["llama"](0)
    peftkit.attach(model, PaCA(r=4, target_modules="all-linear"))
    peftkit.attach(lora, peftkit.LoRA(r=4, target_modules="all-linear"))
    assert _saved_activation_bytes(model, inputs["input_ids"]) < _saved_activation_bytes(lora, inputs["input_ids"])


def test_columns_are_reproducible_and_differ_between_layers():
    a = choose_columns(64, 8, 0, "layers.0.q_proj")
    assert torch.equal(a, choose_columns(64, 8, 0, "layers.0.q_proj"))
    assert not torch.equal(a, choose_columns(64, 8, 0, "layers.1.q_proj"))
    assert not torch.equal(a, choose_columns(64, 8, 1, "layers.0.q_proj"))
    assert a.unique().numel() == 8 and bool((a >= 0).all() and (a < 64).all())


def test_bad_inputs_name_the_culprit(tmp_path):
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.TargetError, match="down_proj: r=70 columns but the layer has only 64"):
        peftkit.attach(model, PaCA(r=70, target_modules=["layers.0.mlp.down_proj"]))
    cnn, _, _ = MODELS["cnn"](0)
    with pytest.raises(peftkit.TargetError, match=r"conv1: paca does not support Conv2d layers \(supported: linear, hf_conv1d"):
        peftkit.attach(cnn, PaCA(r=2, target_modules=["conv1"]))
    with pytest.raises(peftkit.ConfigError, match="r must be a positive integer"):
        peftkit.attach(model, PaCA(r=0))
    assert not peftkit.adapter_names(model)
    # a file whose column indices do not fit the layer is refused on load
    peftkit.attach(model, PaCA(r=2, target_modules=["layers.0.self_attn.q_proj"]))
    with torch.no_grad():
        _layer(model).indices[0] = 1000
    peftkit.save(model, tmp_path / "bad")
    fresh, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.AdapterLoadError, match="indices"):
        peftkit.load(fresh, tmp_path / "bad")
