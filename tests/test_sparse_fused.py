"""The one-node fast paths of the sparse-delta layer (SparseFT, SpIEL, SaRA, RoSA) and HFT on linear layers.

The fused node must give the general path's output and gradients (input and adapter parameters),
keep less for backward (no dense ``W'``), and step aside where it does not apply (gradient
capture, a half-precision base, a non-linear layer).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.hft import HFT
from peftkit.methods.rosa import RoSA
from peftkit.methods.sara import SaRA
from peftkit.methods.sparse import SparseFT
from peftkit.methods.sparse_delta import sampled_weight_grad
from peftkit.methods.spiel import SpIEL

CONFIGS = {
    "sparse": lambda: SparseFT(density=0.3, selection="random"),
    "spiel": lambda: SpIEL(density=0.3),
    "sara": lambda: SaRA(quantile=0.3),
    "rosa": lambda: RoSA(r=2, density=0.3, support="random"),
    "hft": lambda: HFT(),
}


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 4, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def outputs_and_grads(model, x, fused: bool):
    for _, site in peftkit.core.model.iter_sites(model):
        mod = site.adapters["default"]
        if not fused:
            mod.fused_forward = lambda x, site: None  # force the general path
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in peftkit.adapter_parameters(model).items()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("method", list(CONFIGS))
def test_fused_equals_general_path(method):
    x = torch.randn(3, 7, 6)
    results = []
    for fused in (True, False):
        model = Two()
        cfg = CONFIGS[method]()
        cfg.target_modules = ["a", "b"]
        peftkit.attach(model, cfg)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in peftkit.adapter_parameters(model).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        if method == "sara":  # a frozen part too
            mod = model.a.adapters["default"]
            mod.fixed_indices = torch.tensor([0, 7])
            mod.fixed_values = torch.tensor([0.5, -0.25])
        results.append(outputs_and_grads(model, x, fused))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    assert torch.allclose(y1, y2, atol=1e-6)
    assert torch.allclose(gx1, gx2, atol=1e-6)
    for n in gp1:
        assert torch.allclose(gp1[n], gp2[n], atol=1e-5), n


def test_sampled_weight_grad_equals_the_dense_product():
    g = torch.randn(2, 9, 5)
    x = torch.randn(2, 9, 300)
    idx = torch.randperm(1500)[:700].sort().values
    dense = (g.reshape(-1, 5).t() @ x.reshape(-1, 300)).reshape(-1)[idx]
    assert torch.allclose(sampled_weight_grad(g, x, idx, 300), dense, atol=1e-4)


def test_fused_node_keeps_no_dense_weight_for_backward():
    from peftkit.core.site import AdapterSite

    layer = nn.Linear(64, 48).requires_grad_(False)
    site = AdapterSite(layer)
    mod = SpIEL(density=0.05).build(layer, "fc")
    site.adapters["d"] = mod
    site.active = ["d"]
    extra = {}
    resident = layer.weight.data_ptr()  # read now: functional_call swaps layer.weight during the general path
    for fused in (True, False):
        if not fused:
            mod.fused_forward = lambda x, s: None
        dense = []

        def pack(t, dense=dense):
            if t.numel() == 64 * 48 and t.data_ptr() != resident:
                dense.append(t)
            return t

        x = torch.randn(4, 64, requires_grad=True)  # inside a model the input needs a gradient
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            site(x)
        extra[fused] = len(dense)
    assert extra == {True: 0, False: 1}  # the general path keeps W' = W + scatter(values), the node does not


def test_capture_trainable_base_and_half_precision_use_the_general_path():
    layer = nn.Linear(8, 4).requires_grad_(False)
    from peftkit.core.site import AdapterSite

    site = AdapterSite(layer)
    mod = SpIEL(density=0.5).build(layer, "fc")
    site.adapters["d"] = mod
    site.active = ["d"]
    x = torch.randn(2, 8)
    assert mod.fused_forward(x, site) is not None
    mod.capture_gradients("sum")
    assert mod.fused_forward(x, site) is None
    mod.capture_gradients(None)
    layer.weight.requires_grad_(True)  # a base weight being trained needs its own gradient
    assert mod.fused_forward(x, site) is None
    layer.weight.requires_grad_(False)
    layer.to(torch.bfloat16)
    assert mod.fused_forward(x.to(torch.bfloat16), site) is None
