"""Fake quantization with a straight-through estimator: the one core L4Q and LR-QAT share.

A symmetric signed ``b``-bit grid has the integers ``qmin = −2^(b−1) … qmax = 2^(b−1) − 1``. A
weight matrix ``W ∈ R^{out×in}`` is cut into groups of ``g`` consecutive inputs per output row
(``g = in``: one step size per output channel) and each group ``k`` of row ``i`` has a step size
``s_ik``. In the *integer domain* ``u`` (``u = W/s`` for a float weight) the fake-quantized weight is

    Ŵ = s · q,        q = clamp(round(u), qmin, qmax)                          (:func:`fake_quant`)

with the straight-through estimator (Bengio et al. 2013) for ``round`` in the convention of LSQ
(Esser et al. 2020, arXiv:1902.08153): ``∂q/∂u = 1`` where ``qmin < u < qmax`` and 0 where ``u`` is
clipped. Hence ``∂Ŵ/∂u = s · 1[qmin < u < qmax]`` and ``∂Ŵ/∂s = q`` when ``u`` does not depend on ``s``
(LR-QAT, whose ``u = Φ0 + (α/r)·B A`` lives in the integer domain). When ``u = W'/s`` (L4Q) autograd
adds the path through ``u`` and the total is exactly LSQ's step-size gradient

    ∂Ŵ/∂s = round(W'/s) − W'/s   if qmin < W'/s < qmax,     qmin or qmax where clipped.

LSQ scales the step-size gradient by ``1/√(N · qmax)`` (``N`` weights share one step size):
:func:`scale_grad` does that without changing the forward value. :func:`init_scale` gives the
starting step sizes: ``"absmax"`` (``max_j |W_ij| / qmax`` per group, so the first forward is plain
round-to-nearest) or ``"lsq"`` (LSQ's ``2 · mean|W| / √qmax``).
"""

from __future__ import annotations

import math

import torch

from ..core.errors import ConfigError

BITS = (2, 3, 4, 8)
SCALE_INITS = ("absmax", "lsq")


def grid(bits: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of the signed ``bits``-bit grid."""
    if bits not in BITS:
        raise ConfigError(f"bits={bits!r} is not supported; choose one of {', '.join(map(str, BITS))}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class _RoundClip(torch.autograd.Function):
    """``clamp(round(u), qmin, qmax)``; backward passes the gradient where ``qmin < u < qmax`` (STE)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        ctx.save_for_backward((u > qmin) & (u < qmax))
        return torch.clamp(torch.round(u), qmin, qmax)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


class _ScaleGrad(torch.autograd.Function):
    """The identity in forward; multiplies the gradient by ``factor`` in backward (LSQ's gradient scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def round_clip(u: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return _RoundClip.apply(u, qmin, qmax)


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _ScaleGrad.apply(x, factor)


def lsq_grad_factor(group: int, qmax: int) -> float:
    """LSQ's step-size gradient scale ``1 / √(N · qmax)`` for ``N = group`` weights per step size."""
    return 1.0 / math.sqrt(group * qmax)


def grouped(m: torch.Tensor, group: int) -> torch.Tensor:
    """``(out, in)`` → ``(out, in/group, group)`` (a view)."""
    return m.reshape(m.shape[0], m.shape[1] // group, group)


def fake_quant(u: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``s · clamp(round(u), qmin, qmax)`` with ``u`` grouped ``(out, G, g)`` and ``scale`` ``(out, G)``."""
    return scale.unsqueeze(-1) * round_clip(u, qmin, qmax)


@torch.no_grad()
def init_scale(w: torch.Tensor, group: int, bits: int, how: str = "absmax") -> torch.Tensor:
    """Starting step sizes ``(out, in/group)`` for the ``(out, in)`` matrix ``w`` (float32)."""
    _, qmax = grid(bits)
    wg = grouped(w.float(), group)
    if how == "absmax":
        s = wg.abs().amax(-1) / qmax
    elif how == "lsq":
        s = 2.0 * wg.abs().mean(-1) / math.sqrt(qmax)
    else:
        raise ConfigError(f"scale_init={how!r} is not one of {', '.join(SCALE_INITS)}")
    return s.clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero group keeps a positive step


def valid_group_sizes(in_features: int) -> list[int]:
    """The divisors of ``in_features`` (0 means one group per row)."""
    return [d for d in range(1, in_features + 1) if in_features % d == 0]
