"""NOLA: LoRA factors as linear combinations of frozen random bases (Koohpayegani et al., ICLR 2024, arXiv:2310.02556).

For a frozen layer ``y = W x + b`` (``W ∈ R^{out×in}``) NOLA keeps LoRA's form
``ΔW = s · B A`` (``s = alpha / r``, rsLoRA ``alpha/√r``) but does not train ``A`` and ``B``:

    A = Σ_{i≤k} α_i A_i,     B = Σ_{j≤l} β_j B_j,     y = W x + b + s · B A x

where ``A_i ∈ R^{r×in}`` and ``B_j ∈ R^{out×r}`` are frozen random bases and only the
coefficients ``α ∈ R^k`` and ``β ∈ R^l`` train: ``k + l`` numbers per layer, whatever the rank
and the width (LoRA of rank 1 trains ``in + out``). ``β = 0`` at init (``α`` uniform in
``±1/√k``), so the model starts unchanged.

The bases are the adapter's shared state, drawn once from a CPU generator seeded with
``seed`` (bit-identical on every machine and at every load): ``A_bases ∈ R^{k×r_max×in_max}``
then ``B_bases ∈ R^{l×out_max×r_max}``, Kaiming-uniform (``bound = √(6/fan_in)``), sized by the
largest targeted layer and rank and sliced per layer (as VeRA shares its projections).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import LowRankOptions, positive_int
from ..core.errors import ConfigError
from ..core.layers import HF_CONV1D, LINEAR, layer_info
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from .vera import target_infos


def nola_bases(k: int, n_b: int, r: int, in_max: int, out_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_bases (k, r, in_max), B_bases (n_b, out_max, r))`` from one CPU generator seeded with ``seed``."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    a = torch.empty(k, r, in_max).uniform_(-math.sqrt(6.0 / in_max), math.sqrt(6.0 / in_max), generator=g)
    b = torch.empty(n_b, out_max, r).uniform_(-math.sqrt(6.0 / r), math.sqrt(6.0 / r), generator=g)
    return a, b


@register
@dataclass
class NOLA(LowRankOptions):
    """``s · (Σ β_j B_j)(Σ α_i A_i)`` over seeded frozen bases; trains ``num_basis_a + num_basis_b`` coefficients per layer."""

    method = "nola"
    family = "low-rank"
    paper = "Koohpayegani et al. 2024 (arXiv:2310.02556)"
    formula = "W x + s·(Σ β_j B_j)(Σ α_i A_i) x, A_i, B_j frozen random shared; α, β"
    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ATTENTION_QV

    num_basis_a: int = 64
    num_basis_b: int = 64
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        positive_int(owner, "num_basis_a", self.num_basis_a)
        positive_int(owner, "num_basis_b", self.num_basis_b)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"{owner}: seed must be an integer, got {self.seed!r}")

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        info = layer_info(base)
        r, limit = self.rank_for(module_name), min(info.in_features, info.out_features)
        if r > limit:
            return f"rank {r} is larger than the layer allows ({limit} = min(out, in) of {info.out_features}×{info.in_features})"
        return None

    def build_shared(self, model: nn.Module, module_names: list[str]) -> dict[str, torch.Tensor]:
        infos = target_infos(model, module_names)
        r_max = max(self.rank_for(n) for n in module_names)
        a, b = nola_bases(self.num_basis_a, self.num_basis_b, r_max, max(i.in_features for i in infos),
                          max(i.out_features for i in infos), self.seed)
        return {"nola_A": a, "nola_B": b}

    def build(self, base: nn.Module, module_name: str) -> NOLALayer:
        return NOLALayer(self, base, module_name)


class NOLALayer(AdapterModule):
    """``nola_alpha`` ``(k,)`` and ``nola_beta`` ``(l,)``; the bases come from ``self.shared``."""

    shared: nn.Module  # set by the engine: buffers nola_A (k×r_max×in_max), nola_B (l×out_max×r_max)

    def __init__(self, config: NOLA, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        info = layer_info(base)
        self.in_features, self.out_features = info.in_features, info.out_features
        self.r = config.rank_for(module_name)
        self.scaling = config.scale_for(module_name)
        k = config.num_basis_a
        self.nola_alpha = nn.Parameter(torch.empty(k).uniform_(-1.0 / math.sqrt(k), 1.0 / math.sqrt(k)))
        self.nola_beta = nn.Parameter(torch.zeros(config.num_basis_b))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, s·B)``: ``r×in`` and ``out×r`` combinations of the shared bases, with autograd to α, β."""
        al, be = self.nola_alpha, self.nola_beta
        ab = self.shared.nola_A[:, : self.r, : self.in_features].to(al.dtype)
        bb = self.shared.nola_B[:, : self.out_features, : self.r].to(be.dtype)
        a = torch.tensordot(al, ab, dims=1)
        b = torch.tensordot(be * self.scaling, bb, dims=1)
        return a, b

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        a, b = self.factors()
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        delta = F.linear(F.linear(x, a), b)
        return y + delta if delta.dtype == y.dtype else y + delta.to(y.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        a, b = self.factors()
        return self.unmatrix(base, b @ a)
