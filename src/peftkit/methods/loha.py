"""LoHa: low-rank Hadamard product adaptation (Hyeon-Woo et al., FedPara, 2022, arXiv:2108.06098; LyCORIS).

For a frozen layer ``y = W x + b`` (``W ∈ R^{out×in}``) LoHa trains two pairs of rank-``r``
factors and adds their elementwise (Hadamard) product:

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),   W1a, W2a ∈ R^{out×r},  W1b, W2b ∈ R^{r×in},  s = alpha / r

    y = W x + b + ΔW x

Since ``rank(P ⊙ Q) ≤ rank(P)·rank(Q)``, ``ΔW`` reaches rank ``r²`` for the parameters of a
rank-``2r`` LoRA. At init ``W2b = 0`` (the others Kaiming-uniform), so ``ΔW = 0``. ``W`` and
``b`` are frozen; the four factors train. Convolutions use the flattened kernel
(``in = in_channels/groups · k``), or with ``use_effective_conv2d`` (kernel > 1) a CP/Tucker
form ``ΔW1 = T1 ×₁ W1a ×₂ W1b`` with a trained core ``T1 ∈ R^{r×r×k_h×k_w}`` per product
(then ``W1a ∈ R^{r×out}``, ``W1b ∈ R^{r×in}``, peft's layout).

Matches peft 0.21.2's ``LoHaConfig`` (``hada_w1_a`` ... ``hada_t2`` tensors, same init,
``rank_dropout``/``module_dropout`` semantics, see :mod:`peftkit.methods.lycoris`).

Linear layers never keep ``ΔW`` for backward: one autograd node keeps ``x`` and the factors and
rebuilds the two ``out×in`` products in backward (peft keeps ``ΔW`` too). When the adapter runs
alone on a plain ``nn.Linear`` without active dropout, base and adapter are one product
``x (W + ΔW)ᵀ + b`` (one pass over the tokens forward, two backward, instead of two and three).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.layers import CONV1D, CONV2D, LINEAR, layer_kind
from ..core.registry import register
from ..formats.codec import HFCodec
from .lycoris import (
    LYCORIS_HF_OPTIONS,
    LycorisOptions,
    conv_delta,
    lycoris_options_from_hf,
    lycoris_options_to_hf,
    rank_mask,
    skip_module,
)


@register
@dataclass
class LoHa(LycorisOptions):
    """Hadamard product of two rank-``r`` products, ``s·(W1a W1b) ⊙ (W2a W2b)``, ``s = alpha/r``.

    ``rank_dropout`` / ``module_dropout``: training-time dropout of ``ΔW``'s output rows / of the
    whole adapter. ``use_effective_conv2d``: the CP form for convolution kernels larger than 1.
    ``rank_pattern`` / ``alpha_pattern``: per-module rank / alpha (peft's pattern rule).
    """

    method = "loha"
    family = "low-rank"
    paper = "Hyeon-Woo et al. 2022 (arXiv:2108.06098), LyCORIS"
    formula = "W x + s·((W1a W1b) ⊙ (W2a W2b)) x; W1a, W1b, W2a, W2b"

    def build(self, base: nn.Module, module_name: str) -> LoHaLayer:
        return LoHaLayer(self, base, module_name)


class LoHaLayer(AdapterModule):
    """``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and ``hada_t1``, ``hada_t2`` in the CP form)."""

    def __init__(self, config: LoHa, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        self.kind = layer_kind(base)
        self.r = r = config.rank_for(module_name)
        self.scaling = config.scale_for(module_name)
        self.rank_dropout = float(config.rank_dropout)
        self.module_dropout = float(config.module_dropout)
        shape = tuple(base.weight.shape)  # (out, in/groups, *kernel)
        out_f, kernel = shape[0], shape[2:]
        self.cp = bool(config.use_effective_conv2d) and self.kind in (CONV1D, CONV2D) and math.prod(kernel) > 1
        if self.cp:
            k = (*kernel, 1) if self.kind == CONV1D else kernel  # peft keeps a trailing 1 for Conv1d
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *k))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *k))
            self.hada_w1_a = nn.Parameter(torch.empty(r, out_f))
            self.hada_w1_b = nn.Parameter(torch.empty(r, shape[1]))
            self.hada_w2_a = nn.Parameter(torch.empty(r, out_f))
            self.hada_w2_b = nn.Parameter(torch.empty(r, shape[1]))
        else:
            in_flat = math.prod(shape[1:])
            self.hada_w1_a = nn.Parameter(torch.empty(out_f, r))
            self.hada_w1_b = nn.Parameter(torch.empty(r, in_flat))
            self.hada_w2_a = nn.Parameter(torch.empty(out_f, r))
            self.hada_w2_b = nn.Parameter(torch.empty(r, in_flat))
        with torch.no_grad():
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            nn.init.zeros_(self.hada_w2_b)
            if self.cp:
                nn.init.kaiming_uniform_(self.hada_t1, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.hada_t2, a=math.sqrt(5))
        self._weight_shape = shape

    # -- ΔW ------------------------------------------------------------------------------
    def delta_weight_tensor(self) -> torch.Tensor:
        """``ΔW`` laid out like the base weight (with autograd)."""
        if self.cp:
            w = cp_hadamard_weight(self.hada_t1, self.hada_w1_a, self.hada_w1_b, self.hada_t2, self.hada_w2_a,
                                   self.hada_w2_b, self.scaling)
        else:
            w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling
        return w.reshape(self._weight_shape)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.delta_weight_tensor()

    def fused_forward(self, x: torch.Tensor, site: Any) -> torch.Tensor | None:
        """Base and adapter as one product ``x (W + ΔW)ᵀ + b`` for a plain linear layer when no dropout
        is active and the dtypes agree (None otherwise: the general path)."""
        base = site.base
        ref = self.hada_w1_a
        if type(base) is not nn.Linear or self.cp:
            return None
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None  # the fused node gives no gradient to the base layer
        if self.training and (self.rank_dropout > 0 or self.module_dropout > 0):
            return None
        if x.dtype != ref.dtype or base.weight.dtype != ref.dtype or x.device != ref.device:
            return None
        return FusedHadamardLinear.apply(x, base.weight, base.bias, self.hada_w1_a, self.hada_w1_b, self.hada_w2_a,
                                         self.hada_w2_b, self.scaling)

    # -- forward -------------------------------------------------------------------------
    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        if skip_module(self, self.module_dropout):
            return y
        ref = self.hada_w1_a
        xa = x if x.dtype == ref.dtype else x.to(ref.dtype)
        if self.kind == LINEAR and not self.cp:
            delta = HadamardLinear.apply(xa, self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b,
                                         self.scaling)
        else:
            delta = conv_delta(site.base, xa, self.delta_weight_tensor())
        if self.training and self.rank_dropout > 0:
            mask = rank_mask(self._weight_shape[0], self.rank_dropout, True, delta)
            delta = delta * (mask if self.kind == LINEAR else mask.view(-1, *([1] * (delta.dim() - 2))))
        return y + delta if delta.dtype == y.dtype else y + delta.to(y.dtype)


def cp_hadamard_weight(t1: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, t2: torch.Tensor, w2a: torch.Tensor,
                       w2b: torch.Tensor, scale: float) -> torch.Tensor:
    """The CP form: ``s · (T1 ×₁ W1aᵀ ×₂ W1bᵀ) ⊙ (T2 ×₁ W2aᵀ ×₂ W2bᵀ)``, ``out×in×k_h×k_w`` (autograd)."""
    p1 = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
    p2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
    return p1 * p2 * scale


class HadamardLinear(torch.autograd.Function):
    """``x ΔWᵀ`` with ``ΔW = s (W1a W1b) ⊙ (W2a W2b)``; backward rebuilds the products instead of keeping them.

    With ``G = gᵀ x`` the gradient of ``ΔW``: ``∂W1a = (s G ⊙ P2) W1bᵀ``, ``∂W1b = W1aᵀ (s G ⊙ P2)``, and
    symmetrically for ``W2a``, ``W2b`` with ``P1``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                w2b: torch.Tensor, scale: float) -> torch.Tensor:
        dw = torch.mm(w1a, w1b).mul_(torch.mm(w2a, w2b)).mul_(scale)
        ctx.save_for_backward(x, w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return F.linear(x, dw)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w1a, w1b, w2a, w2b = ctx.saved_tensors
        s = ctx.scale
        p1, p2 = torch.mm(w1a, w1b), torch.mm(w2a, w2b)
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, p1 * p2 * s).view(x.shape)
        gw = torch.mm(g2.t(), x.reshape(-1, x.shape[-1])).mul_(s)  # s · ∂L/∂ΔW
        t = gw * p2
        grad_w1a, grad_w1b = torch.mm(t, w1b.t()), torch.mm(w1a.t(), t)
        t = gw.mul_(p1)
        grad_w2a, grad_w2b = torch.mm(t, w2b.t()), torch.mm(w2a.t(), t)
        return grad_x, grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


class FusedHadamardLinear(torch.autograd.Function):
    """``x (W + ΔW)ᵀ + b`` with ``ΔW = s (W1a W1b) ⊙ (W2a W2b)``: one product over the tokens forward and
    two backward (instead of two and three when base and adapter run apart). Keeps ``x`` and the
    factors; ``W`` (frozen) is read again in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, w1a: torch.Tensor,
                w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float) -> torch.Tensor:
        merged = torch.mm(w1a, w1b).mul_(torch.mm(w2a, w2b)).mul_(scale).add_(w)
        ctx.save_for_backward(x, w, w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, w1a, w1b, w2a, w2b = ctx.saved_tensors
        s = ctx.scale
        p1, p2 = torch.mm(w1a, w1b), torch.mm(w2a, w2b)
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, (p1 * p2).mul_(s).add_(w)).view(x.shape)
        gw = torch.mm(g2.t(), x.reshape(-1, x.shape[-1])).mul_(s)
        t = gw * p2
        grad_w1a, grad_w1b = torch.mm(t, w1b.t()), torch.mm(w1a.t(), t)
        t = gw.mul_(p1)
        grad_w2a, grad_w2b = torch.mm(t, w2b.t()), torch.mm(w2a.t(), t)
        return grad_x, None, None, grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


# -- Hugging Face PEFT format: peft_type "LOHA", tensors named as ours ----------------------------
LoHa.hf_codec = HFCodec(
    peft_type="LOHA",
    config_to_hf=lambda c, targets: lycoris_options_to_hf(c, "LoHa"),
    config_from_hf=lambda d: LoHa(**lycoris_options_from_hf(d)),
    read_names={n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    options=LYCORIS_HF_OPTIONS,
)
