"""SVFit: train only the top singular values of each weight (Sun et al., 2024, arXiv:2409.05926).

For a frozen layer ``y = W₀ x + b`` with ``W₀ = U diag(σ) Vᵀ`` (float32 SVD of the matrix view):

    W = U_r diag(σ′) V_rᵀ + (W₀ − U_r diag(σ_r) V_rᵀ)        σ′ ∈ R^r trained, initialised to σ_1..σ_r

``U_r`` and ``V_r`` (the top-``r`` singular vectors) are frozen; only the ``r`` scalars ``σ′``
train. Because ``W₀`` itself stays in the layer, peftkit computes the same ``W`` as the base
plus a rank-``r`` correction,

    y = W₀ x + b + U_r ((σ′ − σ_r) ⊙ V_rᵀ x),

which is exactly the base at init (``σ′ = σ_r``) and merges as ``W₀ ← W₀ + U_r diag(σ′ − σ_r) V_rᵀ``.

The rank: ``r`` fixed, or (``r=None``, the default) per matrix the smallest rank whose singular
values hold ``energy`` of ``Σ σ_i²`` (default 0.99, the paper's "over 99% of the information").
The ranks chosen are written into ``rank_pattern`` (one entry per module) when the adapter is
attached, so a saved adapter rebuilds exactly the same shapes on load.

Files: ``svd_U``, ``svd_Vh``, ``sigma0`` (the frozen ``U_r``, ``V_rᵀ``, ``σ_r``) are saved with
``sigma`` — a load is exact on any machine (a recomputed SVD could differ in the last bits or,
for repeated singular values, in the basis). Trainable parameters: ``r`` per matrix; LoRA of
rank ``k`` on an ``m×n`` matrix trains ``k(m + n)``, e.g. 16 times SVFit at full rank on a
768×768 matrix when ``k = 8`` (the paper's "16× fewer" against LoRA r=8 on BERT-base).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, pattern_value, positive_int
from ..core.errors import ConfigError
from ..core.layers import HF_CONV1D, LINEAR, as_matrix, is_quantized, layer_info
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from .lora import rank_too_large
from .svd_init import energy_rank, svd_triplets


@register
@dataclass
class SVFit(AdapterConfig):
    """Train the top-``r`` singular values ``σ′`` of each weight; ``U_r``, ``V_r`` and the residual stay frozen.

    ``r``: a fixed rank, or None to pick per matrix the smallest rank holding ``energy`` of
    ``Σ σ_i²``. ``rank_pattern``: module patterns → rank (filled with every module's rank at attach).
    """

    method = "svfit"
    family = "low-rank"
    paper = "Sun et al. 2024 (arXiv:2409.05926)"
    formula = "W₀ x + U_r((σ′−σ_r) ⊙ V_rᵀx); σ′ (r per matrix)"
    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ATTENTION_QV

    r: int | None = None
    energy: float = 0.99
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        owner = type(self).__name__
        if self.r is not None:
            positive_int(owner, "r", self.r)
        e = self.energy
        if not isinstance(e, (int, float)) or isinstance(e, bool) or not 0.0 < e <= 1.0:
            raise ConfigError(f"{owner}: energy must be in (0, 1] (the fraction of Σσ² kept), got {e!r}")
        for k, v in self.rank_pattern.items():
            positive_int(owner, f"rank_pattern[{k!r}]", v)

    def fixed_rank(self, module_name: str) -> int | None:
        """The rank set for ``module_name`` by ``rank_pattern`` or ``r`` (None: chosen by energy)."""
        return pattern_value(self.rank_pattern, module_name, self.r)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        if is_quantized(base.weight):
            return "svfit needs the dense weight's SVD; dequantize the layer first"
        info = layer_info(base)
        r = self.fixed_rank(module_name)
        return None if r is None else rank_too_large(r, base, min(info.in_features, info.out_features))

    def resolve(self, model: nn.Module, module_names: list[str]) -> SVFit:
        """A copy whose ``rank_pattern`` holds every module's rank (fixed, or chosen by ``energy``)."""
        from ..core.site import AdapterSite
        from ..core.targeting import display_name

        wanted = set(module_names)
        ranks: dict[str, int] = {}
        for n, m in model.named_modules():
            name = display_name(n)
            if name not in wanted or name in ranks or isinstance(m, (AdapterSite, AdapterModule)):
                continue
            r = self.fixed_rank(name)
            if r is None:
                r = energy_rank(torch.linalg.svdvals(as_matrix(m).detach().float()), self.energy)
            ranks[name] = r
        return dataclasses.replace(self, rank_pattern=ranks)

    def build(self, base: nn.Module, module_name: str) -> SVFitLayer:
        return SVFitLayer(self, base, module_name)


class SVFitLayer(AdapterModule):
    """``Δ(x) = U_r ((σ′ − σ_r) ⊙ V_rᵀ x)``: parameter ``sigma`` (r,), buffers ``svd_U``, ``svd_Vh``, ``sigma0``."""

    def __init__(self, config: SVFit, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        r = config.fixed_rank(module_name)
        if r is None:  # built without resolve (a direct build call): choose by energy here
            r = energy_rank(torch.linalg.svdvals(self.matrix(base).detach().float()), config.energy)
        self.r = r
        u, s, vh = svd_triplets(self.matrix(base), r, "top")
        self.register_buffer("svd_U", u)
        self.register_buffer("svd_Vh", vh)
        self.register_buffer("sigma0", s.clone())
        self.sigma = nn.Parameter(s.clone())

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        vh = self.svd_Vh
        h = nn.functional.linear(x if x.dtype == vh.dtype else x.to(vh.dtype), vh) * (self.sigma - self.sigma0)
        if h.dtype != y.dtype:
            return y + nn.functional.linear(h, self.svd_U).to(y.dtype)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.svd_U.t())
        return out.view(y.shape)

    def delta_matrix(self) -> torch.Tensor:
        """``U_r diag(σ′ − σ_r) V_rᵀ`` as an ``(out, in)`` matrix."""
        return (self.svd_U * (self.sigma - self.sigma0)) @ self.svd_Vh

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.unmatrix(base, self.delta_matrix())

    def extra_repr(self) -> str:
        return f"method=svfit, r={self.r}"

