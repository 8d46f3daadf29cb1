"""Mixture of LoRA experts ("MoLoRA", as in MING-MOE; Zadouri et al. 2023, arXiv:2309.05444; Liu et al. 2024,
arXiv:2404.09027): a token-level router over ``N`` LoRA experts.

For a frozen layer ``y = W x + b`` each token ``x`` is routed by ``g(x) = softmax(W_g x)``
(``W_g ∈ R^{N×in}``, no bias) to its ``k`` most probable experts, whose gates are renormalised
over the chosen ones:

    TopK = the k largest g_j(x),    ĝ_j = g_j(x) / Σ_{i∈TopK} g_i(x)   (j ∈ TopK, else 0)
    y = W x + b + s · Σ_{j∈TopK} ĝ_j · B_j A_j dropout(x),    s = alpha / r

*Renormalisation*: the chosen gates sum to 1 (as Mixtral and MING-MOE), so ``N = 1, k = 1`` is
exactly LoRA and the scale of the update does not shrink with ``N``. The gradient reaches ``W_g``
through the chosen gates. ``A_j`` (Kaiming-uniform), ``B_j`` (zero: the model is unchanged at
init) and ``W_g`` (``N(0, 0.02²)``) train; ``W, b`` are frozen. Not mergeable: the mix depends on
each token.

Optional load balancing (``load_balance_coef = c > 0``, Switch Transformer, Fedus et al. 2022):
over the ``T`` tokens of the last training forward of each layer,

    f_j = (1 / (T k)) Σ_t 1[j ∈ TopK(x_t)]   (share of the routing slots that went to expert j; Σ f = 1)
    P_j = (1 / T) Σ_t g_j(x_t)               (mean router probability)
    L = c · mean over layers of  N · Σ_j f_j P_j

``L = c`` when routing is uniform, larger when it collapses on a few experts. It is added through
the training-hook protocol (``regularization_loss``; ``peftkit.train`` and the Trainer callback
add it, own loops call ``peftkit.regularization_loss(model)`` after the forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import LowRankOptions, finite_number, positive_int, probability
from ..core.errors import ConfigError
from ..core.hooks import StepInfo
from ..core.layers import HF_CONV1D, LINEAR, layer_info
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from .lora import rank_too_large


@register
@dataclass
class MoLoRA(LowRankOptions):
    """Mixture of ``num_experts`` LoRA experts of rank ``r`` per layer, ``top_k`` of them per token,
    gates renormalised over the chosen ones; ``load_balance_coef`` > 0 adds the Switch balancing loss."""

    method = "molora"
    family = "routed"
    paper = "Zadouri et al. 2023 (arXiv:2309.05444); MING-MOE (arXiv:2404.09027)"
    formula = "W x + s·Σ_{j∈TopK} ĝ_j(x) B_j A_j x, ĝ = renormalised softmax(W_g x); A_j, B_j, W_g"
    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ATTENTION_QV
    mergeable = False

    num_experts: int = 4
    top_k: int = 2
    dropout: float = 0.0
    load_balance_coef: float = 0.0

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        positive_int(owner, "num_experts", self.num_experts)
        positive_int(owner, "top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ConfigError(f"{owner}: top_k={self.top_k} is above num_experts={self.num_experts} "
                              f"(use top_k <= {self.num_experts})")
        probability(owner, "dropout", self.dropout)
        finite_number(owner, "load_balance_coef", self.load_balance_coef)
        if self.load_balance_coef < 0:
            raise ConfigError(f"{owner}: load_balance_coef must be >= 0, got {self.load_balance_coef}")

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        return rank_too_large(self.rank_for(module_name), base)

    def build(self, base: nn.Module, module_name: str) -> MoLoRALayer:
        return MoLoRALayer(self, base, module_name)

    # -- training hook ----------------------------------------------------------------------
    def regularization_loss(self, modules: dict[str, AdapterModule], info: StepInfo) -> torch.Tensor | None:
        """``c · mean_l N Σ_j f_j P_j`` over the layers' last training forward (None when ``c = 0``)."""
        if self.load_balance_coef == 0:
            return None
        terms = [t for m in modules.values() if (t := m.balance_term()) is not None]  # type: ignore[operator]
        if not terms:
            return None
        return self.load_balance_coef * torch.stack(terms).mean()


class MoLoRALayer(AdapterModule):
    """Experts ``lora_A`` ``(N, r, in)``, ``lora_B`` ``(N, out, r)`` and the router ``router`` ``(N, in)``."""

    mergeable = False
    unmergeable_reason = "molora routes each token to its own experts (the update depends on the input)"

    def __init__(self, config: MoLoRA, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        info = layer_info(base)
        n = config.num_experts
        self.r = r = config.rank_for(module_name)
        self.scaling = config.scale_for(module_name)
        self.top_k = config.top_k
        self.in_features = info.in_features
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(n, r, info.in_features))
        self.lora_B = nn.Parameter(torch.zeros(n, info.out_features, r))
        self.router = nn.Parameter(torch.empty(n, info.in_features))
        with torch.no_grad():
            for j in range(n):
                nn.init.kaiming_uniform_(self.lora_A[j], a=math.sqrt(5))
            nn.init.normal_(self.router, std=0.02)
        #: (f, P) of the last training forward, for the balancing loss (not state: not saved)
        self._balance: tuple[torch.Tensor, torch.Tensor] | None = None

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(probs, chosen, gates)`` for tokens ``x`` ``(T, in)``: router probabilities ``(T, N)``, the
        indices of the top-k experts ``(T, k)`` and the renormalised gates ``(T, N)`` (zero off the top-k)."""
        probs = torch.softmax(F.linear(x, self.router), dim=-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))
        return probs, chosen, gates

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        A, B = self.lora_A, self.lora_B
        n, out = B.shape[0], B.shape[1]
        flat = x.reshape(-1, self.in_features).to(A.dtype)
        probs, chosen, gates = self.gates(flat)
        if self.training:
            counts = torch.zeros_like(probs).scatter(-1, chosen, 1.0).sum(0)
            self._balance = (counts / (flat.shape[0] * self.top_k), probs.mean(0))
        h = F.linear(self.dropout(flat), A.reshape(n * self.r, -1))          # (T, N·r): every expert's A_j x
        h = h * gates.repeat_interleave(self.r, dim=1)                        # gate each expert's block
        delta = F.linear(h, B.permute(1, 0, 2).reshape(out, n * self.r)) * self.scaling
        return y + delta.reshape(*y.shape[:-1], out).to(y.dtype)

    def balance_term(self) -> torch.Tensor | None:
        """``N Σ_j f_j P_j`` of the last training forward (None before any)."""
        if self._balance is None:
            return None
        f, p = self._balance
        return f.shape[0] * (f * p).sum()

    def extra_repr(self) -> str:
        return f"method=molora, r={self.r}, num_experts={self.lora_A.shape[0]}, top_k={self.top_k}"
