"""The fused LoRA linear: ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ`` as one autograd node.

Composing the base layer and the low-rank path from separate ops costs, per layer and step,
a scale and an add over the ``(tokens × out)`` output in the forward, and a scale over the
output gradient plus an add over the ``(tokens × in)`` input gradient in the backward. Here
the low-rank product is accumulated into the base output buffer (``addmm_``) and, in the
backward, into the base input gradient:

    ∂x = g W + s (g B) A        ∂A = s (g B)ᵀ x        ∂B = s gᵀ (x Aᵀ)

Saved for backward: ``x`` (which the base layer keeps anyway), ``h = x Aᵀ`` (tokens × r) and
the weights. The frozen ``W`` and ``b`` get gradients only if they require them.
"""

from __future__ import annotations

from typing import Any

import torch


class FusedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
        # ``weight`` is (out, in), or (in, out) when ``transposed`` (transformers' Conv1D)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        wt = weight if transposed else weight.t()
        y = torch.addmm(bias, x2, wt) if bias is not None else torch.mm(x2, wt)
        h = torch.mm(x2, a.t())
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x, h, weight, a, b)  # x itself: a reshaped copy would be kept in addition
        ctx.scaling, ctx.transposed, ctx.shape, ctx.has_bias = scaling, transposed, shape, bias is not None
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        x, h, weight, a, b = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gb = torch.mm(g, b)  # (tokens, r)
        dx = dw = dbias = da = dbb = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, weight.t() if ctx.transposed else weight)
            dx.addmm_(gb, a, alpha=s)
            dx = dx.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(x2.t(), g) if ctx.transposed else torch.mm(g.t(), x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = g.sum(0)
        if ctx.needs_input_grad[3]:
            da = torch.mm(gb.t(), x2).mul_(s)
        if ctx.needs_input_grad[4]:
            dbb = torch.mm(g.t(), h).mul_(s)
        return dx, dw, dbias, da, dbb, None, None


class QuantLoRALinear(torch.autograd.Function):
    """``y = x deq(Q)ᵀ + b + s·(x Aᵀ) Bᵀ`` for a quantized frozen ``Q`` (QLoRA), as one autograd node.

    Only the quantized ``Q`` is saved for backward (never its dense dequantization, which the
    backward recomputes for ``∂x = g deq(Q) + s (g B) A``): the base runs in the input's dtype,
    the low-rank path in the adapter's (float32 adapters on a bfloat16 base).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, dequantize: Any) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        wd = dequantize(weight).to(x.dtype)
        y = torch.addmm(bias.to(x.dtype), x2, wd.t()) if bias is not None else torch.mm(x2, wd.t())
        del wd
        xa = x2 if x2.dtype == a.dtype else x2.to(a.dtype)
        h = torch.mm(xa, a.t())
        if y.dtype == a.dtype:
            y.addmm_(h, b.t(), alpha=scaling)
        else:
            y += torch.mm(h, b.t()).mul_(scaling).to(y.dtype)
        ctx.save_for_backward(x, h, weight, a, b)
        ctx.scaling, ctx.shape, ctx.dequantize, ctx.has_bias = scaling, shape, dequantize, bias is not None
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        x, h, weight, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        ga = g if g.dtype == a.dtype else g.to(a.dtype)
        gb = torch.mm(ga, b)
        dx = dbias = da = dbb = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, ctx.dequantize(weight).to(g.dtype))
            low = torch.mm(gb, a).mul_(s)
            dx += low if low.dtype == dx.dtype else low.to(dx.dtype)
            dx = dx.view(ctx.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = g.sum(0)
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(-1, x.shape[-1])
            da = torch.mm(gb.t(), x2 if x2.dtype == a.dtype else x2.to(a.dtype)).mul_(s)
        if ctx.needs_input_grad[4]:
            dbb = torch.mm(ga.t(), h).mul_(s)
        return dx, None, dbias, da, dbb, None, None
