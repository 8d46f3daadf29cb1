"""KRAdapter: a Khatri–Rao product update (Albert et al., ICCV 2025, arXiv:2508.00230).

For a frozen layer ``y = W x + b`` with ``W ∈ R^{out×in}`` let ``k = min(in, out)``,
``r = ⌊√k⌋`` and ``d ≥ 0`` the smallest integer with ``r·(r + d) ≥ max(in, out)``. KRAdapter
trains ``U ∈ R^{k×r}`` (zero at init) and ``V ∈ R^{k×(r+d)}`` (Kaiming-uniform with
``a = 5``, as the official code) and builds ``M ∈ R^{k×(r+d)r}`` row by row as the row-wise
Khatri–Rao (face-splitting) product

    M_i = V_i ⊗ U_i,    M[i, p·r + q] = V[i, p] · U[i, q]

``M`` is laid with its ``k`` rows along the smaller side of ``W`` (transposed when
``out > in``) and cropped to ``out×in``:

    ΔW = s · crop(M),    y = W x + b + ΔW x,    s = ``scale`` (2 in the official code)

There is no rank knob: ``ΔW`` is generically of full rank ``k`` while training
``k(2r + d) ≈ 2k√k`` numbers, far fewer than a full update; a LoRA with as many parameters has
rank ``≈ √k``. ``W`` and ``b`` are frozen; ``U`` and ``V`` train. With ``U = 0``, ``ΔW = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig
from ..core.errors import ConfigError
from ..core.layers import HF_CONV1D, LINEAR, layer_info
from ..core.registry import register
from ..core.targets import ATTENTION_QV


def kr_shape(out_f: int, in_f: int) -> tuple[int, int, int]:
    """``(k, r, d)`` of a layer: ``k = min``, ``r = ⌊√k⌋``, ``d`` the least with ``r(r+d) ≥ max``."""
    k = min(out_f, in_f)
    r = math.isqrt(k)
    d = max(0, -(-max(out_f, in_f) // r) - r)
    return k, r, d


@register
@dataclass
class KRAdapter(AdapterConfig):
    """Khatri–Rao update ``s · crop(V ⊙_row U)`` whose size follows the layer (no rank); ``scale`` = ``s``."""

    method = "kradapter"
    family = "low-rank"
    paper = "Albert et al. 2025 (arXiv:2508.00230)"
    formula = "W x + s·crop(V ⊙row U) x, row i = V_i ⊗ U_i; U, V"
    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ATTENTION_QV

    scale: float = 2.0

    def validate(self) -> None:
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not math.isfinite(self.scale):
            raise ConfigError(f"KRAdapter: scale must be a finite number, got {self.scale!r}")

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        info = layer_info(base)
        if min(info.in_features, info.out_features) < 1:
            return f"KRAdapter needs a layer with at least one input and output, not {info.out_features}×{info.in_features}"
        return None

    def build(self, base: nn.Module, module_name: str) -> KRAdapterLayer:
        return KRAdapterLayer(self, base, module_name)


class KRAdapterLayer(AdapterModule):
    """``kr_u`` ``(k, r)`` and ``kr_v`` ``(k, r+d)``; see the module docstring."""

    def __init__(self, config: KRAdapter, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        info = layer_info(base)
        self.out_features, self.in_features = info.out_features, info.in_features
        k, r, d = kr_shape(info.out_features, info.in_features)
        self.scaling = float(config.scale)
        self.kr_u = nn.Parameter(torch.zeros(k, r))
        self.kr_v = nn.Parameter(torch.empty(k, r + d))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.kr_v, a=5)

    def delta_matrix(self) -> torch.Tensor:
        """``s · crop(M)`` as an ``(out, in)`` matrix, with autograd."""
        u, v = self.kr_u, self.kr_v
        m = (v.unsqueeze(2) * u.unsqueeze(1)).reshape(u.shape[0], -1)  # row i: V_i ⊗ U_i
        if self.out_features > self.in_features:  # k = in: M's rows run along the input side
            m = m.t()
        return m[: self.out_features, : self.in_features] * self.scaling

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        dw = self.delta_matrix()
        if x.dtype != dw.dtype:
            x = x.to(dw.dtype)
        delta = F.linear(x, dw)
        return y + delta if delta.dtype == y.dtype else y + delta.to(y.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.unmatrix(base, self.delta_matrix())
