"""SORSA: singular values and orthonormal regularized singular vectors adaptation (Cao, 2024, arXiv:2409.00055).

For a frozen layer ``y = W₀ x + b`` with the top-``r`` SVD triplets ``W₀ ≈ U_p diag(σ_p) V_pᵀ`` the
model is

    W = W_r + U_p diag(σ_p) V_pᵀ,      W_r = W₀ − U₀ diag(σ₀) V₀ᵀ frozen (the residual)

where ``U_p`` (out×r), ``σ_p`` (a vector) and ``V_pᵀ`` (r×in) train, starting at the principal
triplets ``(U₀, σ₀, V₀ᵀ)``. The training loss adds the orthonormality regulariser

    γ · Σ_layers ( ‖U_pᵀU_p − I‖²_F + ‖V_pᵀV_p − I‖²_F )

(:meth:`SORSA.regularization_loss`, called by ``peftkit.regularization_loss(model)`` and by
peftkit's training loops), which is 0 at init since singular vectors are orthonormal. Here it is
simply a loss term summed over the layers (the catalog's form; check the paper if you need its exact
update rule), and the default ``gamma = 1e-3`` is our choice, not a value from the paper: tune it.

peftkit keeps ``W₀`` in the layer and adds the difference, so the base is never rewritten
(``disabled()``, mixed batches and stacked adapters see the true base):

    y = W₀ x + b + U_p (σ_p ⊙ V_pᵀ x) − U₀ (σ₀ ⊙ V₀ᵀ x)

which is exactly the base at init. Mergeable: ``ΔW = U_p diag(σ_p) V_pᵀ − U₀ diag(σ₀) V₀ᵀ``.
The starting triplets are saved with the adapter (``init_U``, ``init_S``, ``init_Vh``) and may be
omitted from a file, in which case the SVD at build time (same base) gives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, finite_number, pattern_value, positive_int
from ..core.errors import ConfigError
from ..core.hooks import StepInfo
from ..core.layers import HF_CONV1D, LINEAR, is_quantized, layer_info
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from .lora import rank_too_large
from .svd_init import svd_triplets


@register
@dataclass
class SORSA(AdapterConfig):
    """Train the top-``r`` singular triplets (U, σ, Vᵀ) of each weight with an orthonormality penalty ``gamma``.

    ``rank_pattern``: module patterns → a per-module rank.
    """

    method = "sorsa"
    family = "low-rank"
    paper = "Cao 2024 (arXiv:2409.00055)"
    formula = "W_r x + U_p(σ_p ⊙ V_pᵀx) + γ‖UᵀU−I‖²+γ‖VᵀV−I‖²; U_p, σ_p, V_p"
    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ATTENTION_QV

    r: int = 8
    gamma: float = 1e-3
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        owner = type(self).__name__
        positive_int(owner, "r", self.r)
        finite_number(owner, "gamma", self.gamma)
        if self.gamma < 0:
            raise ConfigError(f"{owner}: gamma (the orthonormality penalty) must be >= 0, got {self.gamma!r}")
        for k, v in self.rank_pattern.items():
            positive_int(owner, f"rank_pattern[{k!r}]", v)

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        if is_quantized(base.weight):
            return "sorsa needs the dense weight's SVD; dequantize the layer first"
        info = layer_info(base)
        return rank_too_large(self.rank_for(module_name), base, min(info.in_features, info.out_features))

    def build(self, base: nn.Module, module_name: str) -> SORSALayer:
        return SORSALayer(self, base, module_name)

    def regularization_loss(self, modules: dict[str, AdapterModule], info: StepInfo) -> torch.Tensor | None:
        """``γ · Σ_layers (‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F)`` (None when ``gamma`` is 0)."""
        if self.gamma == 0 or not modules:
            return None
        return self.gamma * torch.stack([m.orthonormality() for m in modules.values()]).sum()  # type: ignore[operator]


class SORSALayer(AdapterModule):
    """Parameters ``sorsa_U`` (out, r), ``sorsa_S`` (r,), ``sorsa_Vh`` (r, in); buffers ``init_U``, ``init_S``, ``init_Vh``."""

    optional_state = ("init_U", "init_S", "init_Vh")

    def __init__(self, config: SORSA, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        self.r = config.rank_for(module_name)
        u, s, vh = svd_triplets(self.matrix(base), self.r, "top")
        self.sorsa_U = nn.Parameter(u.clone())
        self.sorsa_S = nn.Parameter(s.clone())
        self.sorsa_Vh = nn.Parameter(vh.clone())
        self.register_buffer("init_U", u)
        self.register_buffer("init_S", s)
        self.register_buffer("init_Vh", vh)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        vh = self.sorsa_Vh
        x = x if x.dtype == vh.dtype else x.to(vh.dtype)
        h = nn.functional.linear(x, vh) * self.sorsa_S
        h0 = nn.functional.linear(x, self.init_Vh) * self.init_S
        delta = nn.functional.linear(h, self.sorsa_U) - nn.functional.linear(h0, self.init_U)
        return y + delta.to(y.dtype)

    def delta_matrix(self) -> torch.Tensor:
        """``U_p diag(σ_p) V_pᵀ − U₀ diag(σ₀) V₀ᵀ`` as an ``(out, in)`` matrix."""
        return (self.sorsa_U * self.sorsa_S) @ self.sorsa_Vh - (self.init_U * self.init_S) @ self.init_Vh

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.unmatrix(base, self.delta_matrix())

    def orthonormality(self) -> torch.Tensor:
        """``‖U_pᵀU_p − I‖²_F + ‖V_pᵀV_p − I‖²_F`` (``V_pᵀV_p`` is ``Vh Vhᵀ`` here, r×r)."""
        u, vh = self.sorsa_U, self.sorsa_Vh
        eye = torch.eye(self.r, device=u.device, dtype=u.dtype)
        return (u.t() @ u - eye).pow(2).sum() + (vh @ vh.t() - eye).pow(2).sum()

    def extra_repr(self) -> str:
        return f"method=sorsa, r={self.r}"
