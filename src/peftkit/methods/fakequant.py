"""Fake quantization with a straight-through estimator: the one core L4Q and LR-QAT share.

A symmetric signed ``b``-bit grid has the integers ``qmin = −2^(b−1) … qmax = 2^(b−1) − 1``. A
weight matrix ``W ∈ R^{out×in}`` is cut into groups of ``g`` consecutive inputs per output row
(``g = in``: one step size per output channel) and each group ``k`` of row ``i`` has a step size
``s_ik``. In the *integer domain* ``u`` (``u = W/s`` for a float weight) the fake-quantized weight is

    Ŵ = s · q,        q = clamp(round(u), qmin, qmax)                      (:class:`QuantizedWeight`)

with the straight-through estimator (Bengio et al. 2013) for ``round`` in the convention of LSQ
(Esser et al. 2020, arXiv:1902.08153): ``∂q/∂u = 1`` where ``qmin < u < qmax`` and 0 where ``u`` is
clipped. Hence ``∂Ŵ/∂u = s · 1[qmin < u < qmax]`` and ``∂Ŵ/∂s = q`` when ``u`` does not depend on ``s``
(LR-QAT, whose ``u = Φ0 + (α/r)·B A`` lives in the integer domain). When ``u = W'/s`` (L4Q) the path
through ``u`` adds ``s · m · (−W'/s²) = −u`` inside the grid, and the total is LSQ's step-size gradient

    ∂Ŵ/∂s = round(W'/s) − W'/s   if qmin < W'/s < qmax,     qmin or qmax where clipped.

LSQ scales the step-size gradient by ``1/√(N · qmax)`` (``N`` weights share one step size;
:func:`lsq_grad_factor`). :class:`QuantizedWeight` computes ``Ŵ`` and these gradients as one
autograd node that keeps no weight-sized tensor for backward. :func:`init_scale` gives the
starting step sizes: ``"absmax"`` (``max_j |W_ij| / qmax`` per group, so the first forward is plain
round-to-nearest) or ``"lsq"`` (LSQ's ``2 · mean|W| / √qmax``).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from ..core.errors import ConfigError

BITS = (2, 3, 4, 8)
SCALE_INITS = ("absmax", "lsq")


def grid(bits: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of the signed ``bits``-bit grid."""
    if bits not in BITS:
        raise ConfigError(f"bits={bits!r} is not supported; choose one of {', '.join(map(str, BITS))}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class QATSpec(Protocol):
    """What :class:`QuantizedWeight` needs from a layer: the grid, the grouping and the rounded value."""

    qmin: int
    qmax: int
    group: int
    scaling: float
    grad_factor: float
    #: True when ``u = (W0 + c·B A) / s`` (L4Q: LSQ's step-size gradient), False when ``u`` is free of ``s`` (LR-QAT)
    divides_by_scale: bool

    def integer_domain(self, frozen: torch.Tensor, low_rank: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``u`` grouped ``(out, G, g)`` from the frozen tensor, ``c·B A`` grouped and the step sizes ``(out, G)``."""
        ...


class QuantizedWeight(torch.autograd.Function):
    """``Ŵ = s · clamp(round(u), qmin, qmax)`` as one autograd node, from ``A``, ``B``, ``s`` and a frozen tensor.

    Backward keeps only the inputs (the frozen tensor is the layer's own ``W0`` or ``Φ0``, resident
    anyway; ``A``, ``B``, ``s`` are small) and recomputes ``u`` (one rank-r product and a few
    elementwise passes), so no weight-sized tensor is kept for backward: L4Q's memory-optimised
    backward. With ``G = ∂L/∂Ŵ`` grouped and ``m = 1[qmin < u < qmax]`` (the STE):

    * L4Q (``u = V/s``, ``V = W0 + c·B A``): ``∂L/∂V = G ⊙ m``,
      ``∂L/∂s = Σ_group G ⊙ (m ? round(u) − u : clamp(round(u)))`` (LSQ);
    * LR-QAT (``u = Φ0 + c·B A``): ``∂L/∂(c·B A) = G ⊙ s ⊙ m``, ``∂L/∂s = Σ_group G ⊙ clamp(round(u))``;

    then ``∂L/∂B = c·D Aᵀ`` and ``∂L/∂A = c·Bᵀ D`` with ``D`` the gradient of ``V`` (resp. of ``c·B A``)
    as an ``(out, in)`` matrix, and ``∂L/∂s`` is multiplied by LSQ's gradient scale ``grad_factor``.
    """

    @staticmethod
    def forward(ctx, frozen: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
                spec: QATSpec) -> torch.Tensor:
        u = _domain(spec, frozen, lora_A, lora_B, scale)
        ctx.save_for_backward(frozen, lora_A, lora_B, scale)
        ctx.spec = spec
        q = torch.clamp(torch.round(u), spec.qmin, spec.qmax)
        return (scale.unsqueeze(-1) * q).reshape(lora_B.shape[0], lora_A.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        frozen, lora_A, lora_B, scale = ctx.saved_tensors
        spec: QATSpec = ctx.spec
        with torch.no_grad():
            u = _domain(spec, frozen, lora_A, lora_B, scale)
            q = torch.clamp(torch.round(u), spec.qmin, spec.qmax)
            inside = (u > spec.qmin) & (u < spec.qmax)
            g = grouped(grad.to(u.dtype), spec.group)
            if spec.divides_by_scale:
                d_low = g * inside
                d_scale = (g * torch.where(inside, q - u, q)).sum(-1)
            else:
                d_low = g * scale.unsqueeze(-1) * inside
                d_scale = (g * q).sum(-1)
            d = d_low.reshape(lora_B.shape[0], lora_A.shape[1]) * spec.scaling
            grads = (None,
                     lora_B.t() @ d if ctx.needs_input_grad[1] else None,
                     d @ lora_A.t() if ctx.needs_input_grad[2] else None,
                     d_scale * spec.grad_factor if ctx.needs_input_grad[3] else None,
                     None)
        return grads


def _domain(spec: QATSpec, frozen: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
            scale: torch.Tensor) -> torch.Tensor:
    low_rank = grouped((lora_B @ lora_A) * spec.scaling, spec.group)
    return spec.integer_domain(frozen, low_rank, scale)


def lsq_grad_factor(group: int, qmax: int) -> float:
    """LSQ's step-size gradient scale ``1 / √(N · qmax)`` for ``N = group`` weights per step size."""
    return 1.0 / math.sqrt(group * qmax)


def grouped(m: torch.Tensor, group: int) -> torch.Tensor:
    """``(out, in)`` → ``(out, in/group, group)`` (a view)."""
    return m.reshape(m.shape[0], m.shape[1] // group, group)


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
