"""HFT: Half Fine-Tuning (Hui et al. 2024, arXiv:2404.18466).

Full fine-tuning of the targeted weights, but in each stage a random half of them is frozen, so
part of the pre-trained knowledge is kept while the other half learns. peftkit keeps the trained
weights as dense deltas on the frozen base::

    W'_l = W_l + Δ_l,       Δ_l initialised to 0 (the model starts as the base model)

Every optimizer step lies in stage ``⌊step / stage_steps⌋``. At the start of a stage the
``before_step`` hook draws (from ``seed`` and the stage number) which deltas train: the
granularity is **whole parameter tensors** (the paper freezes half of the parameter matrices of
each block). The targeted weights are grouped by block (the module path up to its first numeric
component, ``model.layers.3``; one group when there is none) and ``⌊n/2⌋`` of each block's ``n``
tensors are frozen; blocks with an odd ``n`` take turns freezing the extra one, so with an even
total exactly half of all targeted tensors is frozen in every stage (half of the tensors, not
necessarily of the parameter count). A frozen delta has ``requires_grad = False``: autograd
skips its gradient and the optimizer leaves it (and its optimizer state) bitwise unchanged; it
keeps what it learned in earlier stages and trains again when a later stage draws it. After the
last step every delta is trainable again. Before the first hook call (a loop without hooks) all
deltas train.

Merging is exact (``W ← W + Δ``). Memory: one float32 delta per targeted weight plus its
optimizer state, as full fine-tuning of those weights. On a plain ``nn.Linear`` of the adapter's
dtype running alone, the layer is one autograd node (:class:`DenseDeltaLinear`) that keeps only
its input for backward (``W + Δ`` is rebuilt there), like full fine-tuning, and skips ``∂Δ``
for a frozen ``Δ``. No Hugging Face PEFT form.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, positive_int
from ..core.errors import ConfigError
from ..core.layers import CONV1D, CONV2D, EMBEDDING, HF_CONV1D, LINEAR, float_dtype_for_adapter, is_quantized
from ..core.registry import register
from ..core.targets import ALL_LINEAR

_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_of(path: str) -> str:
    """The block a module belongs to: its path up to the first numeric component ('' if none)."""
    m = _BLOCK.match(path)
    return m.group(1) if m else ""


def frozen_half(paths: list[str], seed: int, stage: int) -> set[str]:
    """The module paths frozen in ``stage``: ``⌊n/2⌋`` per block, the odd blocks' extra one in turns."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + stage * 7919 + zlib.crc32(b"hft")) % (2**63))
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(block_of(p), []).append(p)
    turn = int(torch.randint(0, 2, (1,), generator=gen))
    frozen: set[str] = set()
    for members in groups.values():
        n = len(members)
        count = n // 2
        if n % 2:
            count += turn
            turn = 1 - turn
        perm = torch.randperm(n, generator=gen)[:count].tolist()
        frozen.update(members[i] for i in perm)
    return frozen


@register
@dataclass
class HFT(AdapterConfig):
    """Dense deltas on the targeted weights; each stage of ``stage_steps`` steps freezes a random half."""

    method = "hft"
    family = "selective"
    paper = "Hui et al. 2024, HFT (arXiv:2404.18466)"
    formula = "W + Δ, a random half of the Δ frozen per stage; Δ"
    supported_layers = (LINEAR, HF_CONV1D, CONV1D, CONV2D, EMBEDDING)
    default_targets = ALL_LINEAR

    stage_steps: int = 100
    seed: int = 0

    def validate(self) -> None:
        owner = type(self).__name__
        positive_int(owner, "stage_steps", self.stage_steps)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"{owner}: seed must be an integer, got {self.seed!r}")

    def check_model(self, model: nn.Module, module_names: list[str]) -> str | None:
        if len(module_names) < 2:
            return (f"HFT freezes half of the targeted weights, but only {len(module_names)} module matches; "
                    "target at least two (e.g. target_modules='all-linear')")
        return None

    def build(self, base: nn.Module, module_name: str) -> HFTLayer:
        return HFTLayer(self, base)

    # -- training hooks ------------------------------------------------------------------------
    def stage_of(self, step: int) -> int:
        return step // self.stage_steps

    def before_step(self, modules: dict[str, AdapterModule], info: Any) -> None:
        frozen = frozen_half(list(modules), self.seed, self.stage_of(info.step))
        for path, m in modules.items():
            m.delta.requires_grad_(path not in frozen)
            if path in frozen:
                m.delta.grad = None

    def after_step(self, modules: dict[str, AdapterModule], info: Any) -> None:
        if info.total_steps is not None and info.step + 1 >= info.total_steps:
            for m in modules.values():
                m.delta.requires_grad_(True)


class HFTLayer(AdapterModule):
    """``W + Δ`` with ``delta`` (float32, shaped like the weight) as the trainable parameter."""

    overrides_params = True
    adapts_output = False

    def __init__(self, config: HFT, base: nn.Module) -> None:
        super().__init__(config, base)
        w = base.weight
        self.delta = nn.Parameter(torch.zeros(w.shape, dtype=float_dtype_for_adapter(w.dtype), device=w.device))

    def override_params(self, params: dict[str, torch.Tensor], site: Any) -> dict[str, torch.Tensor]:
        weight = params.get("weight", site.base.weight)
        d = self.delta
        if weight.dtype != d.dtype:
            return {**params, "weight": (weight.to(d.dtype) + d).to(weight.dtype)}
        return {**params, "weight": weight + d}

    def fused_forward(self, x: torch.Tensor, site: Any) -> torch.Tensor | None:
        base = site.base
        if type(base) is not nn.Linear:
            return None
        w, b = base.weight, base.bias
        if is_quantized(w) or w.requires_grad or (b is not None and b.requires_grad):
            return None
        if x.dtype != w.dtype or w.dtype != self.delta.dtype or x.device != w.device:
            return None
        return DenseDeltaLinear.apply(x, w, b, self.delta)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.delta.detach()

    def extra_repr(self) -> str:
        return f"method=hft, trainable={self.delta.requires_grad}"


class DenseDeltaLinear(torch.autograd.Function):
    """``y = x (W + Δ)ᵀ + b`` with ``W``, ``b`` frozen; keeps ``x`` (and the resident ``W``, ``Δ``) for backward:
    ``∂x = g (W + Δ)``, ``∂Δ = gᵀ x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                delta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, delta)
        return F.linear(x, weight + delta.detach(), bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, delta = ctx.saved_tensors
        gx = gd = None
        if ctx.needs_input_grad[0]:
            gx = g.matmul(weight + delta.detach())
        if ctx.needs_input_grad[3]:
            gd = g.reshape(-1, g.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        return gx, None, None, gd
