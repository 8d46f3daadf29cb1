"""The SVD-form low-rank layer and the triplet importance score shared by AdaLoRA and IncreLoRA.

The layer adds ``ΔW = s · P diag(λ) Q`` to a frozen ``W`` (``P = lora_B ∈ R^{out×r}`` the left
"singular vectors", ``λ = lora_E ∈ R^{r×1}`` the "singular values", ``Q = lora_A ∈ R^{r×in}`` the
right ones; convolutions through their ``(out, in·k·k)`` matrix view):

    y = W x + b + s · P (λ ⊙ Q dropout(x)),     s = alpha / (ranknum + 1e-5)

with ``ranknum`` the layer's initial rank (peft's convention: the scale does not change when
triplets are masked; ``alpha = 0`` means ``alpha = r``). ``λ = 0`` at init, so the model is
unchanged; P and Q start ~ N(0, 0.02²). Only P, λ, Q train.

Triplet importance (Zhang et al., 2023, AdaLoRA, arXiv:2303.10512, eqs. 8–11; peft's
``RankAllocator``): for every entry ``w`` of P, λ, Q after each optimizer step

    I = |w · ∂L/∂w|,   Ī ← β1 Ī + (1 − β1) I,   Ū ← β2 Ū + (1 − β2) |I − Ī|,   score(w) = Ī · Ū

and the score of triplet ``i`` is ``score(λ_i) + mean_j score(Q_ij) + mean_j score(P_ji)``.
The running averages live in the layer (non-persistent: not saved with the adapter).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.layers import CONV2D, layer_info, layer_kind

IMPORTANCE_PARAMS = ("lora_A", "lora_E", "lora_B")


class SVDLayer(AdapterModule):
    """``Δ(x) = s · P (λ ⊙ Q x)`` with parameters ``lora_A`` (r, in_flat), ``lora_E`` (r, 1), ``lora_B`` (out, r).

    ``active`` (a non-persistent bool buffer, all True unless a method grows or shrinks the layer)
    multiplies λ in the forward, so inactive triplets contribute exactly 0 and get no gradient.
    """

    def __init__(self, config: Any, base: nn.Module, r: int, alpha: float, dropout: float) -> None:
        super().__init__(config, base)
        self.kind = layer_kind(base)
        info = layer_info(base)
        in_flat = base.weight[0].numel() if self.kind == CONV2D else info.in_features
        self.r = r
        self.ranknum = float(r)
        self.scaling = (alpha if alpha > 0 else float(r)) / (self.ranknum + 1e-5)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_flat))
        self.lora_E = nn.Parameter(torch.zeros(r, 1))
        self.lora_B = nn.Parameter(torch.empty(info.out_features, r))
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.register_buffer("active", torch.ones(r, dtype=torch.bool), persistent=False)
        self.ipt: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: the module path (set by the config's ``build``): the key of this layer in ``config.rank_pattern``
        self.module_name: str | None = None

    def layer_facts(self) -> dict[str, Any]:
        """``{"rank_keep": [bool] * r}`` when the config records an allocation for this layer (peft files drop the rest)."""
        keep = (getattr(self.config, "rank_pattern", None) or {}).get(self.module_name)
        return {} if keep is None else {"rank_keep": list(keep)}

    # -- forward / merge --------------------------------------------------------------
    def values(self) -> torch.Tensor:
        """λ with the inactive triplets zeroed (``(r, 1)``)."""
        if bool(self.active.all()):
            return self.lora_E
        return self.lora_E * self.active[:, None].to(self.lora_E.dtype)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        A = self.lora_A
        x = self.dropout(x)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.kind == CONV2D:
            base = site.base
            dw = self.unmatrix(base, self.delta_matrix())
            delta = F.conv2d(x, dw, None, base.stride, base.padding, base.dilation, base.groups)
            return y + delta.to(y.dtype)
        h = F.linear(x, A * self.values())
        if y.dtype != h.dtype:
            return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t(), alpha=self.scaling)
        return out.view(y.shape)

    def delta_matrix(self) -> torch.Tensor:
        """``s · P diag(λ) Q`` as an ``(out, in_flat)`` matrix."""
        return (self.lora_B @ (self.lora_A * self.values())) * self.scaling

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.unmatrix(base, self.delta_matrix())

    # -- importance -------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """One EMA update of sensitivity ``Ī`` and uncertainty ``Ū`` from the current weights and gradients."""
        for name in IMPORTANCE_PARAMS:
            p = getattr(self, name)
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg, unc = self.ipt.get(name) or (torch.zeros_like(p), torch.zeros_like(p))
            avg = beta1 * avg + (1 - beta1) * ipt
            unc = beta2 * unc + (1 - beta2) * (ipt - avg).abs()
            self.ipt[name] = (avg, unc)

    def reset_importance(self) -> None:
        self.ipt = {}

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """``score(λ_i) + mean_j score(Q_ij) + mean_j score(P_ji)`` for each triplet (``(r,)``; zeros before any update)."""
        def score(name: str) -> torch.Tensor:
            if name not in self.ipt:
                return torch.zeros_like(getattr(self, name))
            avg, unc = self.ipt[name]
            return avg * unc

        s_a = score("lora_A").mean(dim=1)
        s_b = score("lora_B").mean(dim=0)
        return score("lora_E").view(-1) + (s_a + s_b)

    @torch.no_grad()
    def mask_values(self, keep: torch.Tensor) -> None:
        """Zero λ of the triplets where ``keep`` is False (their P and Q stay and may come back)."""
        self.lora_E.masked_fill_(~keep.to(self.lora_E.device)[:, None], 0.0)

    def orthogonality(self) -> torch.Tensor:
        """``‖Q Qᵀ − I‖_F + ‖PᵀP − I‖_F`` over the active triplets (the two terms of the orthogonality penalty)."""
        a, b = self.lora_A, self.lora_B
        if not bool(self.active.all()):
            a, b = a[self.active], b[:, self.active]
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        return torch.linalg.matrix_norm(a @ a.t() - eye) + torch.linalg.matrix_norm(b.t() @ b - eye)

    def extra_repr(self) -> str:
        return f"method={self.config.method}, r={self.r}"
