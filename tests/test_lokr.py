"""LoKr math: peft parity (forward, gradients), Kronecker factor shapes, rank(C⊗M) = rank(C)·rank(M), bad input."""

from __future__ import annotations

import pytest
import torch
from peft import LoKrConfig, get_peft_model
from peft.tuners.lokr.layer import factorization as peft_factorization

import peftkit
from peftkit.methods.lokr import factorization

from .lycoris_helpers import assert_files_both_ways, assert_same_forward_and_gradients
from .models import MODELS
from .models import outputs as _outputs

PEFT_CASES = [
    ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),  # low-rank M, full C
    ("llama", dict(r=2, alpha=8, decompose_both=True, decompose_factor=4, target_modules=["q_proj", "up_proj"],
                   rank_pattern={"up_proj": 1})),
    ("bert", dict(r=8, alpha=4, target_modules=["query", "value"])),  # r ≥ max(b, d)/2: full M
    ("cnn", dict(r=1, alpha=4, target_modules=["conv1", "conv2", "seq", "fc"])),
    ("cnn", dict(r=8, alpha=4, target_modules=["conv1", "conv2", "seq", "fc"])),
    ("cnn", dict(r=1, alpha=4, use_effective_conv2d=True, target_modules=["conv1", "conv2"])),
]
IDS = [f"{a}-{i}" for i, (a, _) in enumerate(PEFT_CASES)]


def ours_config(kw: dict) -> peftkit.LoKr:
    return peftkit.LoKr(**{k: v for k, v in kw.items()})


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_forward_and_gradients_equal_peft(arch, kw):
    model, inputs, out = MODELS[arch](0)
    y0 = _outputs(model, inputs, out)
    pm = get_peft_model(model, LoKrConfig(init_weights=False, **kw))
    ours, _, _ = MODELS[arch](0)
    peftkit.attach(ours, ours_config(kw))
    assert (_outputs(pm, inputs, out) - y0).abs().max() > 1e-5
    assert_same_forward_and_gradients(pm, ours, inputs, out)


@pytest.mark.parametrize("n", [1, 2, 7, 12, 32, 64, 96, 127, 128, 192, 576, 1536])
@pytest.mark.parametrize("factor", [-1, 2, 4, 5, 16])
def test_factorization_matches_peft(n, factor):
    assert factorization(n, factor) == peft_factorization(n, factor)



FILE_CASES = [PEFT_CASES[i] for i in [1, 3, 4, 5]]


@pytest.mark.parametrize("arch,kw", FILE_CASES, ids=[f"{a}-{i}" for i, (a, _) in zip([1, 3, 4, 5], FILE_CASES, strict=True)])
def test_files_both_ways_with_peft(arch, kw, tmp_path):
    assert_files_both_ways(arch, LoKrConfig(init_weights=False, **kw), ours_config(kw), tmp_path)


def test_factor_shapes_multiply_to_the_weight_shape_and_init_is_identity():
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    peftkit.attach(model, peftkit.LoKr(r=2, alpha=4, decompose_both=True, target_modules="all-linear",
                                       exclude_modules=["lm_head"]))
    assert torch.allclose(_outputs(model, inputs, out), y0)
    for path, layer in peftkit.get_adapter(model, "default").items():
        w = model.get_submodule(path).base.weight
        c, m = layer.first_factor(), layer.second_factor()
        assert (c.shape[0] * m.shape[0], c.shape[1] * m.shape[1]) == tuple(w.shape), path
        assert torch.count_nonzero(c) == 0
        assert layer.delta_weight(None).shape == w.shape


def test_rank_of_kronecker_is_product_of_ranks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(36, 48)).double()
    # 48 = 6·8, 36 = 6·6: C is 6×6 (full), M is 8×6 of rank ≤ r = 2
    peftkit.attach(model, peftkit.LoKr(r=2, alpha=2, target_modules=["0"]))
    layer = peftkit.get_adapter(model, "default")["0"]
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        layer.lokr_w1[:, 4:] = 0  # rank(C) = 4
    c, m = layer.first_factor(), layer.second_factor()
    rc, rm = int(torch.linalg.matrix_rank(c)), int(torch.linalg.matrix_rank(m))
    assert (rc, rm) == (4, 2)
    dw = layer.delta_weight(model[0].base)
    assert int(torch.linalg.matrix_rank(dw)) == rc * rm == 8
    # the factored forward equals the dense ΔW
    x = torch.randn(3, 5, 36, dtype=torch.double)
    assert torch.allclose(model(x), model[0].base(x) + x @ dw.t())


def test_rank_dropout_scale_and_module_dropout():
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, peftkit.LoKr(r=2, alpha=4, rank_dropout=0.5, rank_dropout_scale=True, module_dropout=0.3,
                                       target_modules=["q_proj"]))
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.normal_(0, 0.3)
    y = _outputs(model, inputs, out)
    model.train()
    torch.manual_seed(0)
    outs = [_outputs(model, inputs, out) for _ in range(6)]
    assert any(not torch.allclose(o, y) for o in outs)
    model.eval()
    assert torch.equal(_outputs(model, inputs, out), y)


def test_bad_input_is_refused_before_the_model_changes():
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match="decompose_factor"):
        peftkit.attach(model, peftkit.LoKr(decompose_factor=0, target_modules=["q_proj"]))
    with pytest.raises(peftkit.ConfigError, match="module_dropout"):
        peftkit.attach(model, peftkit.LoKr(module_dropout=-0.1, target_modules=["q_proj"]))
    with pytest.raises(peftkit.TargetError, match="Embedding"):
        peftkit.attach(model, peftkit.LoKr(target_modules=["embed_tokens"]))
    assert peftkit.adapter_names(model) == []
