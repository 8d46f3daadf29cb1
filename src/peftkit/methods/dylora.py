"""DyLoRA: one LoRA trained for every rank at once (Valipour et al., 2023, arXiv:2210.07558).

A rank-``r`` LoRA pair ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}`` (A Kaiming-uniform, B = 0: the model
is unchanged at init; the base is frozen). Before each optimizer step one rank ``b`` is drawn
uniformly from ``[r_min, r]`` (the same for every layer of the adapter) and the step trains the
truncated update

    y = W x + b_W + (alpha / b) · B[:, :b] A[:b] dropout(x)

(nested dropout of the components above ``b``: they neither act nor get gradients this step). So
every leading-``k`` truncation is trained as a rank-``k`` LoRA, and any rank in ``[r_min, r]`` can
be picked at inference with :func:`set_rank` (default ``eval_rank``, else ``r``), no rank search
needed. The draw runs through the training-hook protocol (``before_step``, undone by ``after_step``; see
:mod:`peftkit.core.hooks`) and uses torch's global RNG, so a seeded run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, positive_int, probability
from ..core.errors import ConfigError
from ..core.hooks import StepInfo
from ..core.layers import HF_CONV1D, LINEAR, layer_info, layer_kind
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from .lora import max_rank


@register
@dataclass
class DyLoRA(AdapterConfig):
    """DyLoRA: a LoRA of rank ``r`` trained on a random leading rank ``b ∈ [r_min, r]`` each step (scale ``alpha / b``).

    ``eval_rank`` is the rank used outside training (None: ``r``); change it with
    ``peftkit.methods.dylora.set_rank(model, k)``.
    """

    method = "dylora"
    family = "low-rank"
    paper = "Valipour et al. 2023 (arXiv:2210.07558)"
    formula = "W x + (α/b)·B[:, :b] A[:b] x, b drawn per step; A, B"
    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ATTENTION_QV

    r: int = 8
    alpha: float = 8.0
    r_min: int = 1
    dropout: float = 0.0
    eval_rank: int | None = None

    def validate(self) -> None:
        owner = type(self).__name__
        positive_int(owner, "r", self.r)
        positive_int(owner, "r_min", self.r_min)
        if self.r_min > self.r:
            raise ConfigError(f"{owner}: r_min={self.r_min} is above r={self.r} (use r_min <= {self.r})")
        if self.eval_rank is not None:
            _check_rank(owner, "eval_rank", self.eval_rank, self.r_min, self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            raise ConfigError(f"{owner}: alpha must be a number, got {self.alpha!r}")
        probability(owner, "dropout", self.dropout)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        if self.r > max_rank(base):
            return f"r={self.r} is larger than the layer allows ({max_rank(base)} = min(out, in) of {tuple(base.weight.shape)})"
        return None

    def resolve(self, model: nn.Module, module_names: list[str]) -> DyLoRA:
        import dataclasses

        return dataclasses.replace(self)  # set_rank writes eval_rank: each adapter owns its copy

    def build(self, base: nn.Module, module_name: str) -> DyLoRALayer:
        return DyLoRALayer(self, base)

    # -- training hook ----------------------------------------------------------------
    def before_step(self, modules: dict[str, AdapterModule], info: StepInfo) -> None:
        """Draw this step's rank ``b ~ U{r_min, ..., r}`` and give it to every layer of the adapter."""
        b = int(torch.randint(self.r_min, self.r + 1, ()).item())
        for m in modules.values():
            m.train_rank = b  # type: ignore[assignment]

    def after_step(self, modules: dict[str, AdapterModule], info: StepInfo) -> None:
        """The drawn rank holds for one optimizer step only (a forward outside the loop uses every rank)."""
        for m in modules.values():
            m.train_rank = None  # type: ignore[assignment]


def _check_rank(owner: str, name: str, k: Any, lo: int, hi: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not lo <= k <= hi:
        raise ConfigError(f"{owner}: {name}={k!r} must be an integer in [r_min, r] = [{lo}, {hi}]")


class DyLoRALayer(AdapterModule):
    """``Δ(x) = (alpha/k) · B[:, :k] A[:k] x`` with ``k`` the drawn rank in training, ``eval_rank`` otherwise."""

    def __init__(self, config: DyLoRA, base: nn.Module) -> None:
        super().__init__(config, base)
        info = layer_info(base)
        self.kind = layer_kind(base)
        self.r = config.r
        self.alpha = float(config.alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(config.r, info.in_features))
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, config.r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        #: the rank of the step in progress (set by the ``before_step`` hook; used in training mode only)
        self.train_rank: int | None = None

    @property
    def rank(self) -> int:
        """The rank in use now: the drawn one in training, else ``eval_rank`` (default ``r``)."""
        if self.training and self.train_rank is not None:
            return self.train_rank
        return self.config.eval_rank or self.r

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        k = self.rank
        A, B = self.lora_A[:k], self.lora_B[:, :k]
        x = self.dropout(x)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        delta = F.linear(F.linear(x, A), B) * (self.alpha / k)
        return y + delta.to(y.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        k = self.rank
        return self.unmatrix(base, (self.lora_B[:, :k] @ self.lora_A[:k]) * (self.alpha / k))

    def extra_repr(self) -> str:
        return f"method=dylora, r={self.r}, rank={self.rank}"


def set_rank(model: nn.Module, rank: int | None, name: str = "default") -> nn.Module:
    """Use the leading ``rank`` components of DyLoRA adapter ``name`` outside training (None: all ``r``).

    Refused while the adapter is merged (unmerge first: the merged weights hold the old rank's update).
    """
    from ..core.api import get_adapter
    from ..core.model import adapter_modules

    mods = get_adapter(model, name)
    config = next(iter(mods.values())).config
    if not isinstance(config, DyLoRA):
        raise ConfigError(f"set_rank: adapter {name!r} is {config.method}, not dylora")
    if rank is not None:
        _check_rank("set_rank", "rank", rank, config.r_min, config.r)
    if any(name in site.merged for _p, site, _m in adapter_modules(model, name)):
        raise ConfigError(f"set_rank: adapter {name!r} is merged; call peftkit.unmerge(model) first")
    config.eval_rank = rank
    return model
