"""Chain of LoRA (COLA; Xia, Qin and Hazan, 2024, arXiv:2401.04151): residual learning by a chain of LoRAs.

Training runs in ``T`` = ``num_links`` links. Link ``t`` trains a fresh LoRA pair
(``A_t`` Kaiming-uniform, ``B_t = 0``, its optimizer state reset); at the end of the link the pair
is folded into the frozen part and a new pair starts:

    y = W x + b + Σ_{u<t} s·B_u A_u x  +  s·B_t A_t dropout(x),     s = alpha / r

so the total update ``Σ_u s B_u A_u`` has rank up to ``T·r`` while only one LoRA (``A_t, B_t``)
trains at a time: the trainable count and the optimizer state are those of one LoRA. ``W, b``
and the finished links are frozen. Because ``B_t = 0`` when a link starts, the output is the
same just before and just after each fold (the chain is continuous).

*Where the finished links go*: COLA merges them into ``W``. peftkit keeps the user's ``W``
untouched (``disabled``, ``unload`` and saved files must mean the base model), so the adapter
folds them into its own frozen buffers ``chain_A`` ``((T-1)·r, in)`` and ``chain_B``
``(out, (T-1)·r)`` (``s`` folded into ``chain_B``; preallocated, zero until used) and
``links_done``; ``peftkit.merge`` folds everything into ``W`` as for LoRA. A file saved
mid-chain holds the finished links, the current link's pair and ``links_done``: loading it gives
the same model output and training continues the chain where it stopped.

The fold runs through the training-hook protocol (``after_step``, after the optimizer step):
after every ``steps_per_link`` optimizer steps, or, when it is None, at the fractions
``t/T`` of ``total_steps``. Own loops call ``peftkit.after_step(model, step, total, optimizer)``
or :func:`next_link` directly.

``format="hf"`` writes the chain as the equivalent peft LoRA of rank ``T·r`` (scale 1: ``s`` folded
into ``B``; links not reached yet are zero rows), which ``peft.PeftModel`` loads with the same
outputs and peftkit reads back as a plain :class:`~peftkit.LoRA` (the chain's progress is in the
peftkit format only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import LowRankOptions, positive_int, probability
from ..core.errors import ConfigError
from ..core.hooks import StepInfo
from ..core.layers import HF_CONV1D, LINEAR, layer_info
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from ..formats.codec import HFCodec
from .lora import rank_too_large


@register
@dataclass
class ChainLoRA(LowRankOptions):
    """Chain of LoRA: ``num_links`` LoRAs of rank ``r`` trained one after another, each folded into the
    frozen part when the next starts (every ``steps_per_link`` steps; None: at ``t/num_links`` of training)."""

    method = "chain_lora"
    family = "low-rank"
    paper = "Xia et al. 2024 (arXiv:2401.04151)"
    formula = "W x + Σ_{u<t} s·B_u A_u x + s·B_t A_t x, link t trains; A_t, B_t"
    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ATTENTION_QV

    num_links: int = 3
    steps_per_link: int | None = None
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        positive_int(owner, "num_links", self.num_links)
        if self.steps_per_link is not None:
            positive_int(owner, "steps_per_link", self.steps_per_link)
        probability(owner, "dropout", self.dropout)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        return rank_too_large(self.rank_for(module_name), base)

    def build(self, base: nn.Module, module_name: str) -> ChainLoRALayer:
        return ChainLoRALayer(self, base, module_name)

    def boundaries(self, total_steps: int | None) -> list[int]:
        """The optimizer-step counts after which link ``1, ..., T-1`` ends."""
        if self.steps_per_link is not None:
            return [self.steps_per_link * (t + 1) for t in range(self.num_links - 1)]
        if total_steps is None:
            raise ConfigError("ChainLoRA: steps_per_link is None, so the links end at fractions of total_steps, "
                              "but the training loop gave no total_steps; set steps_per_link=N")
        return [max(1, round(total_steps * (t + 1) / self.num_links)) for t in range(self.num_links - 1)]

    # -- training hook ----------------------------------------------------------------------
    def after_step(self, modules: dict[str, AdapterModule], info: StepInfo) -> None:
        """At a link boundary: fold the current link into the frozen part, start a fresh one, reset its
        optimizer state (``info.optimizer``)."""
        done = info.step + 1
        ends = self.boundaries(info.total_steps)
        target = sum(1 for b in ends if b <= done)  # links that should be finished by now
        for m in modules.values():
            while m.links() < target:  # type: ignore[operator]
                m.fold(info.optimizer)  # type: ignore[operator]


class ChainLoRALayer(AdapterModule):
    """The current link ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``; finished links in ``chain_A``/``chain_B``."""

    def __init__(self, config: ChainLoRA, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        info = layer_info(base)
        self.r = r = config.rank_for(module_name)
        self.scaling = config.scale_for(module_name)
        self.num_links = config.num_links
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, info.in_features))
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        slots = (config.num_links - 1) * r
        self.register_buffer("chain_A", torch.zeros(slots, info.in_features))
        self.register_buffer("chain_B", torch.zeros(info.out_features, slots))
        self.register_buffer("links_done", torch.zeros((), dtype=torch.long))

    def links(self) -> int:
        """How many links are finished (folded into ``chain_A``/``chain_B``)."""
        return int(self.links_done)

    @torch.no_grad()
    def fold(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """End the current link: ``chain += s·B A``, then ``A`` fresh (Kaiming), ``B = 0``, optimizer state dropped."""
        t = self.links()
        if t >= self.num_links - 1:
            raise ConfigError(f"ChainLoRA: all {self.num_links} links are used; the last one keeps training "
                              "(raise num_links for a longer chain)")
        sl = slice(t * self.r, (t + 1) * self.r)
        self.chain_A[sl] = self.lora_A.to(self.chain_A.dtype)
        self.chain_B[:, sl] = (self.lora_B * self.scaling).to(self.chain_B.dtype)
        self.links_done += 1
        fresh = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
        self.lora_A.copy_(fresh)
        self.lora_B.zero_()
        if optimizer is not None:
            for p in (self.lora_A, self.lora_B):
                optimizer.state.pop(p, None)  # Adam & co. re-create their state at the next step

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        A, B = self.lora_A, self.lora_B
        xa = x.to(A.dtype) if x.dtype != A.dtype else x
        delta = F.linear(F.linear(self.dropout(xa), A), B) * self.scaling
        k = self.links() * self.r
        if k:
            delta = delta + F.linear(F.linear(xa.to(self.chain_A.dtype), self.chain_A[:k]), self.chain_B[:, :k])
        return y + delta.to(y.dtype)

    def delta_matrix(self) -> torch.Tensor:
        """The whole chain's update ``Σ_{u<t} s B_u A_u + s B_t A_t`` as an ``(out, in)`` matrix."""
        k = self.links() * self.r
        return self.chain_B[:, :k] @ self.chain_A[:k] + (self.lora_B @ self.lora_A) * self.scaling

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.unmatrix(base, self.delta_matrix())

    def layer_facts(self) -> dict[str, Any]:
        return {"scaling": self.scaling}  # the peft export folds it into B

    def extra_repr(self) -> str:
        return f"method=chain_lora, r={self.r}, link={self.links() + 1}/{self.num_links}"


def next_link(model: nn.Module, name: str = "default", optimizer: torch.optim.Optimizer | None = None) -> int:
    """End the current link of Chain-of-LoRA adapter ``name`` on every layer now (own schedules); returns
    the number of finished links. Refused while the adapter is merged."""
    from ..core.api import get_adapter
    from ..core.model import adapter_modules

    mods = get_adapter(model, name)
    first = next(iter(mods.values()))
    if not isinstance(first, ChainLoRALayer):
        raise ConfigError(f"next_link: adapter {name!r} is {first.config.method}, not chain_lora")
    if any(name in site.merged for _p, site, _m in adapter_modules(model, name)):
        raise ConfigError(f"next_link: adapter {name!r} is merged; call peftkit.unmerge(model) first")
    for m in mods.values():
        m.fold(optimizer)  # type: ignore[operator]
    return first.links()  # type: ignore[operator]


# -- Hugging Face PEFT format: written as the equivalent LoRA ---------------------------------------
def _chain_to_hf(config: ChainLoRA) -> dict[str, Any]:
    """peft's ``LoraConfig`` of the whole chain: rank ``T·r`` with scale 1 (``lora_alpha = rank``; ``s`` is
    folded into ``B``), so peft computes ``Σ_u s B_u A_u`` exactly."""
    t = config.num_links
    return {"r": t * config.r, "lora_alpha": t * config.r, "lora_dropout": config.dropout, "use_rslora": False,
            "rank_pattern": {k: t * v for k, v in config.rank_pattern.items()},
            "alpha_pattern": {k: t * v for k, v in config.rank_pattern.items()},
            "init_lora_weights": True, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "use_dora": False}


def _chain_export(state: dict[str, torch.Tensor], layer: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``A = [chain_A; A_t]``, ``B = [chain_B, s·B_t]`` (finished links, zero rows for links not reached yet,
    then the current one): rank ``T·r`` at scale 1."""
    s = float(layer["scaling"])
    return {"lora_A": torch.cat([state["chain_A"], state["lora_A"]], 0),
            "lora_B": torch.cat([state["chain_B"], state["lora_B"] * s], 1)}


def _no_reading(d: dict[str, Any]) -> ChainLoRA:  # never called: ``accepts`` is False, peft's LORA files read as LoRA
    raise ConfigError("a peft LORA file is read as peftkit.LoRA, not as a chain")


ChainLoRA.hf_codec = HFCodec(
    peft_type="LORA",
    accepts=lambda d: False,
    config_to_hf=lambda c, targets: _chain_to_hf(c),
    config_from_hf=_no_reading,
    read_names={"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"},
    export=_chain_export,
    write_only=True,
)
