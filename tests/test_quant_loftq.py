"""LoftQ initialisation (peftkit.quant.loftq): the residual error falls with iterations, below plain QLoRA's."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import peftkit
from peftkit import quant
from peftkit.core.layers import dense_tensor, dense_weight, is_quantized

pytest.importorskip("torchao")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128))
    with torch.no_grad():  # a weight with a strong low-rank part, as pre-trained weights have
        m[0].weight.add_(torch.randn(64, 4) @ torch.randn(4, 128) * 0.2)
    return m


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_loftq_error_decreases_and_beats_plain_qlora(scheme):
    model = _model()
    w0 = model[0].weight.detach().clone()
    peftkit.attach(model, peftkit.LoRA(r=8, alpha=16, target_modules=["0", "2"]))
    errs = quant.loftq(model, scheme, iters=4)
    assert set(errs) == {"0", "2"}
    for e in errs.values():
        assert len(e) == 5
        assert e[1] < e[0]  # one iteration already beats Q(W) with B A = 0
        assert e[-1] <= e[1] + 1e-6 and all(b <= a + 1e-4 for a, b in itertools.pairwise(e[1:]))
    site = model[0]
    assert is_quantized(site.base.weight)
    ad = site.adapters["default"]
    approx = dense_weight(site.base).float() + ad.delta_matrix()
    assert float((w0 - approx).norm() / w0.norm()) == pytest.approx(errs["0"][-1], rel=1e-4)
    plain = quant.schemes.get_scheme(scheme).quantize(w0)
    assert (w0 - approx).norm() < (w0 - dense_tensor(plain)).norm()


def test_loftq_refuses_what_it_cannot_initialise():
    model = _model()
    with pytest.raises(peftkit.ConfigError, match="no adapter named 'default'"):
        quant.loftq(model)
    peftkit.attach(model, peftkit.DoRA(r=4, target_modules=["0"]))
    with pytest.raises(peftkit.ConfigError, match=r"0: loftq needs a plain LoRA on nn\.Linear, got DoRALayer"):
        quant.loftq(model)
