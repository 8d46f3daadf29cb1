"""PaCA: partial connection adaptation (Woo et al., ICLR 2025, openreview.net/forum?id=iYkhxre0In).

For a frozen linear layer ``y = W x + b`` (``W ∈ R^{out×in}``; transformers' ``Conv1D`` through its
transposed storage) PaCA picks ``r`` input columns
``idx`` at random and trains them in place: ``P = W[:, idx] ∈ R^{out×r}`` is the only trainable
tensor, and the layer computes

    y = W' x + b,      W' = W with columns idx replaced by P

as **one** matrix product — there is no adapter branch. The backward pass needs

    ∂L/∂P = gᵀ x[..., idx]        ∂L/∂x = g W'  (= g W, with columns idx taken from g P)

so the custom autograd node (:class:`PartialLinear`) keeps only the ``r`` chosen input features
``x[..., idx]`` for the weight gradient, ``r/in`` of the input that LoRA keeps for ``∂A``.

The fast path (this adapter alone on a plain ``nn.Linear`` or ``Conv1D``) writes ``P`` into the columns of
the base weight for the duration of the product and puts the original columns back right
after, through ``.data`` (no autograd version change), so the product is the layer's own single
GEMM. That makes the call not re-entrant: do not run the same PaCA layer from two threads at
once. Stacked with other adapters or in a mixed batch, the layer runs with the functional
weight ``W.index_copy(1, idx, P)`` instead (same values, dense backward).

Merging writes ``P`` back into ``W[:, idx]`` (``ΔW`` is ``P − W[:, idx]`` on those columns, 0
elsewhere); unmerging restores the original columns. ``P = W[:, idx]`` at init, so the model is
unchanged at step 0. Saved: ``indices`` (int64) and ``paca_P``. The indices come from a
generator seeded with ``seed`` and the CRC-32 of the module name.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, pattern_value, positive_int
from ..core.errors import AdapterLoadError, ConfigError
from ..core.layers import HF_CONV1D, LINEAR, layer_info, layer_kind
from ..core.registry import register
from ..core.targets import ALL_LINEAR
from .lora import _HF_CONV1D_FORWARD


@register
@dataclass
class PaCA(AdapterConfig):
    """Train ``r`` randomly chosen input columns of each linear weight in place (``seed`` picks them).

    ``rank_pattern``: module patterns → a per-module ``r``.
    """

    method = "paca"
    family = "selective"
    paper = "Woo et al. ICLR 2025 (openreview iYkhxre0In)"
    formula = "W[:, idx ← P] x (one GEMM); P = r columns"
    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ALL_LINEAR

    r: int = 8
    seed: int = 0
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        owner = type(self).__name__
        positive_int(owner, "r", self.r)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"{owner}: seed must be an integer, got {self.seed!r}")
        for k, v in self.rank_pattern.items():
            positive_int(owner, f"rank_pattern[{k!r}]", v)

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        r, d_in = self.rank_for(module_name), layer_info(base).in_features
        if r > d_in:
            return f"r={r} columns but the layer has only {d_in} input features (use r <= {d_in})"
        return None

    def build(self, base: nn.Module, module_name: str) -> PaCALayer:
        return PaCALayer(self, base, module_name)


def choose_columns(in_features: int, r: int, seed: int, module_name: str) -> torch.Tensor:
    """``r`` distinct sorted column indices (int64) from a generator seeded with ``seed`` and the module name."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module_name.encode())) % (2**63))
    return torch.randperm(in_features, generator=g)[:r].sort().values


class PartialLinear(torch.autograd.Function):
    """``y = x W'ᵀ + b`` with ``W' = W[:, idx ← P]`` in one GEMM; saves ``x[..., idx]``, not ``x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: torch.Tensor,
                idx: torch.Tensor, transposed: bool) -> torch.Tensor:
        # ``weight`` is (out, in), or (in, out) when ``transposed`` (transformers' Conv1D): columns of W are its rows
        w = weight.data
        axis = 0 if transposed else 1
        original = w.index_select(axis, idx)
        w.index_copy_(axis, idx, (p.t() if transposed else p).detach().to(w.dtype))
        try:
            if transposed:
                x2 = x.reshape(-1, x.shape[-1])
                y = (torch.addmm(bias, x2, weight) if bias is not None else torch.mm(x2, weight))
                y = y.view(*x.shape[:-1], y.shape[-1])
            else:
                y = F.linear(x, weight, bias)
        finally:
            w.index_copy_(axis, idx, original)
        x_idx = x.index_select(-1, idx) if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(x_idx, weight, p, idx)
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[2]
        ctx.transposed = transposed
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        x_idx, weight, p, idx = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dx = dp = dbias = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, weight.t() if ctx.transposed else weight)
            dx.index_copy_(1, idx, torch.mm(g, p.to(g.dtype)))
            dx = dx.view(*grad.shape[:-1], dx.shape[-1])
        if ctx.needs_input_grad[3]:
            dp = torch.mm(g.t(), x_idx.reshape(-1, x_idx.shape[-1])).to(p.dtype)
        if ctx.bias_grad:
            dbias = g.sum(0)
        return dx, None, dbias, dp, None, None


class PaCALayer(AdapterModule):
    """Trainable ``paca_P`` (out, r) = the columns ``indices`` of the weight; buffer ``indices`` (int64, r)."""

    # outside the single-GEMM path the layer runs with the functional weight W[:, idx ← P]
    overrides_params = True
    adapts_output = False

    def __init__(self, config: PaCA, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        self.r = config.rank_for(module_name)
        self.in_features = layer_info(base).in_features
        #: the input axis of the stored weight: 1 for nn.Linear (out, in), 0 for transformers' Conv1D (in, out)
        self.axis = 0 if layer_kind(base) == HF_CONV1D else 1
        idx = choose_columns(self.in_features, self.r, config.seed, module_name).to(base.weight.device)
        self.register_buffer("indices", idx)
        self.paca_P = nn.Parameter(self.matrix(base).detach().index_select(1, idx).float().clone())

    def stored_columns(self, dtype: torch.dtype) -> torch.Tensor:
        """``P`` laid out like the chosen slice of the stored weight (``Pᵀ`` for Conv1D)."""
        p = self.paca_P.to(dtype)
        return p if self.axis == 1 else p.t()

    def partial_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with the chosen columns replaced by ``P`` (a new tensor, differentiable in ``P``)."""
        return weight.index_copy(self.axis, self.indices, self.stored_columns(weight.dtype))

    def override_params(self, params: dict[str, torch.Tensor], site: Any) -> dict[str, torch.Tensor]:
        weight = params.get("weight", site.base.weight)
        return {**params, "weight": self.partial_weight(weight)}

    def fused_forward(self, x: torch.Tensor, site: Any) -> torch.Tensor | None:
        """The single-GEMM path on a plain ``nn.Linear`` whose weight has the input's dtype; None otherwise."""
        base = site.base
        plain = type(base) is nn.Linear or (self.axis == 0 and type(base).forward is _HF_CONV1D_FORWARD)
        if not plain or x.dtype != base.weight.dtype or x.device != base.weight.device:
            return None
        if type(base.weight.data) is not torch.Tensor:  # a sharded or subclassed weight: no in-place column swap
            return None
        return PartialLinear.apply(x, base.weight, base.bias, self.paca_P, self.indices, self.axis == 0)

    # -- merging: the columns are replaced, not added to ------------------------------------
    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        w = base.weight
        delta = torch.zeros_like(w)
        cols = self.stored_columns(w.dtype) - w.index_select(self.axis, self.indices)
        return delta.index_copy_(self.axis, self.indices, cols)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        base.weight.data.index_copy_(self.axis, self.indices, self.stored_columns(base.weight.dtype))

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        """Nothing here: the site puts the weights from before the first merge back exactly."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        idx = state_dict.get(prefix + "indices")
        if isinstance(idx, torch.Tensor) and idx.numel():
            bad = (idx < 0) | (idx >= self.in_features)
            if bool(bad.any()) or idx.unique().numel() != idx.numel():
                raise AdapterLoadError(f"{prefix}indices: column indices must be distinct and in 0..{self.in_features - 1}")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"method=paca, r={self.r}, in_features={self.in_features}"
