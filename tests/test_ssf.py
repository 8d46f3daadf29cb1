"""SSF (Lian et al. 2022): peft has no SSF, so the defining properties — the output is γ ⊙ f(x) + β per channel,
identity at init, the folded model equals the unfolded one (W′ = diag(γ)W, b′ = γ⊙b + β, also for LayerNorm and
layers without a bias), unmerge restores the module, and the parameter count on a ViT-B-style configuration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.ssf import SSF, SSFLayer

from .models import MODELS
from .models import outputs as _outputs


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _layers(model) -> dict[str, SSFLayer]:
    return peftkit.get_adapter(model, "default")


@pytest.mark.parametrize("module,x", [
    (nn.Linear(6, 5), torch.randn(3, 4, 6)),
    (nn.Linear(6, 5, bias=False), torch.randn(3, 6)),
    (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)),
    (nn.Conv1d(3, 4, 3), torch.randn(2, 3, 7)),
    (nn.LayerNorm(6), torch.randn(3, 6)),
])
def test_output_is_scaled_and_shifted_per_channel_and_folds_exactly(module, x):
    model = nn.Sequential(module)
    y0 = model(x).detach()
    peftkit.attach(model, SSF(target_modules=["0"]))
    assert torch.equal(model(x), y0)  # γ = 1, β = 0
    _randomize(model)
    layer = _layers(model)["0"]
    g, b = layer.ssf_scale.detach(), layer.ssf_shift.detach()
    shape = (1, -1, *([1] * (x.dim() - 2))) if isinstance(module, (nn.Conv1d, nn.Conv2d)) else (-1,)
    expected = y0 * g.reshape(shape) + b.reshape(shape)
    y = model(x).detach()
    assert torch.allclose(y, expected, atol=1e-6)
    # folding: W′ = diag(γ) W, b′ = γ ⊙ b + β
    w0 = module.weight.detach().clone()
    b0 = module.bias.detach().clone() if module.bias is not None else torch.zeros_like(b)
    peftkit.merge(model)
    wshape = (-1,) + (1,) * (w0.dim() - 1)
    assert torch.allclose(module.weight, w0 * g.reshape(wshape), atol=1e-6)
    assert torch.allclose(module.bias, g * b0 + b, atol=1e-6)
    assert torch.allclose(model(x), y, atol=1e-5)
    peftkit.unmerge(model)
    assert torch.allclose(module.weight, w0, atol=1e-6)
    if b0.abs().sum() == 0 and isinstance(module, nn.Linear) and module.in_features == 6 and x.dim() == 2:
        assert module.bias is None  # the bias created by merging is gone again


def test_bias_created_by_merge_is_removed_by_unload_without_merge():
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    keys = set(model.state_dict())
    peftkit.attach(model, SSF(target_modules=["q_proj", "down_proj"]))
    _randomize(model)
    y = _outputs(model, inputs, out)
    peftkit.merge(model)
    assert model.model.layers[0].self_attn.q_proj.base.bias is not None
    assert torch.allclose(_outputs(model, inputs, out), y, atol=1e-5)
    peftkit.unload(model)  # unmerges first
    assert set(model.state_dict()) == keys
    assert model.model.layers[0].self_attn.q_proj.bias is None
    assert torch.allclose(_outputs(model, inputs, out), y0, atol=1e-5)


def test_default_targets_every_block_linear():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, SSF())
    leaves = sorted({p.rsplit(".", 1)[-1] for p in _layers(model)})
    assert leaves == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_parameter_count_vit_b():
    """On a ViT-B/16-style encoder (12 blocks, width 768, MLP 3072), SSF after the q/k/v, attention output, both
    MLP linears and both LayerNorms of every block trains 2·12·(3·768 + 768 + 3072 + 768 + 2·768) = 202,752 numbers
    (≈0.2M; the paper reports 0.2M for its ViT-B/16 body)."""
    from transformers import ViTConfig, ViTModel

    with torch.device("meta"):
        model = ViTModel(ViTConfig(), add_pooling_layer=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "layernorm_before", "layernorm_after"]
    config = SSF(target_modules=targets)
    chosen = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    assert len(chosen) == 12 * len(targets) and not any(config.check_layer(m, name) for name, m in chosen)
    n = sum(p.numel() for name, m in chosen for p in config.build(m, name).parameters())
    assert n == 2 * 12 * (3 * 768 + 768 + 3072 + 768 + 2 * 768) == 202_752


def test_unsupported_layers_named():
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.TargetError, match=r"input_layernorm.*not LlamaRMSNorm"):
        peftkit.attach(model, SSF(target_modules=["layers.0.input_layernorm"]))
    ln = nn.Sequential(nn.LayerNorm(4, elementwise_affine=False))
    with pytest.raises(peftkit.TargetError, match="elementwise_affine=True"):
        peftkit.attach(ln, SSF(target_modules=["0"]))


def test_mixed_batch_and_bf16():
    model, inputs, out = MODELS["bert"](0)
    peftkit.attach(model, SSF(target_modules=["query", "dense"]), name="a")
    _randomize(model)
    ya = _outputs(model, inputs, out)
    with peftkit.mixed_batch(model, ["a", None, "a", None]):
        ym = _outputs(model, inputs, out)
    with peftkit.disabled(model):
        y0 = _outputs(model, inputs, out)
    assert torch.allclose(ym[0::2], ya[0::2], atol=1e-5) and torch.allclose(ym[1::2], y0[1::2], atol=1e-5)
