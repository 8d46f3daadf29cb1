"""The output head and cross-entropy as one autograd node that computes its gradients in the forward.

For hidden states ``h_t`` (N × d) of the labelled positions, a linear head ``W`` (V × d, bias ``b``)
and targets ``y_t``, the summed loss and its gradients are

    z_t = W h_t + b,        L = Σ_t (logsumexp(z_t) − z_{t, y_t})
    ∂L/∂z_t = softmax(z_t) − e_{y_t} =: g_t
    ∂L/∂h_t = Wᵀ g_t,       ∂L/∂W = Σ_t g_t h_tᵀ,       ∂L/∂b = Σ_t g_t

The forward runs over chunks of positions: each chunk's logits (float32) give its loss and, in the
same buffer, ``g_t``, which is multiplied out at once into ``∂L/∂h`` (and ``∂L/∂W``, ``∂L/∂b`` when
the head trains); then the logits are dropped. The backward only scales the stored gradients by the
incoming one. Compared with checkpointing each chunk (recomputing its logits in the backward), this
saves one ``N × d × V`` product per step, the largest single product of a small LM's step; compared
with the plain loss it never holds more than one chunk of logits (the idea of the "fused linear
cross-entropy" of Liger-Kernel, written here for PyTorch's CPU and GPU ops).
"""

from __future__ import annotations

from typing import Any

import torch


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        acc = torch.promote_types(weight.dtype, torch.float32)  # half-precision logits are upcast, as transformers does
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
            z = hc @ weight.t()
            if bias is not None:
                z = z + bias
            z = z.to(acc)
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                g = z.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
                g[torch.arange(yc.shape[0], device=g.device), yc] -= 1.0
                if need_h:
                    dh[start:start + chunk_size] = g.to(weight.dtype) @ weight
                if need_w:
                    dw.addmm_(g.t(), hc.to(acc))
                if need_b:
                    db += g.sum(0)
        ctx.save_for_backward(*(t for t in (dh, dw, db) if t is not None))
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        out: list[torch.Tensor | None] = []
        for has, dtype in zip(ctx.has, ctx.dtypes, strict=True):
            out.append((next(saved) * grad).to(dtype) if has else None)
        return out[0], out[1], out[2], None, None


def fused_linear_cross_entropy(h: torch.Tensor, head: torch.nn.Linear, y: torch.Tensor,
                               chunk_size: int) -> torch.Tensor:
    """``Σ_t −log softmax(head(h_t))_{y_t}`` over the rows of ``h`` (targets ``y``), chunked, gradients fused."""
    return FusedLinearCrossEntropy.apply(h, head.weight, head.bias, y, chunk_size)
