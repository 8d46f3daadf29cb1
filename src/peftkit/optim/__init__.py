"""Memory-efficient optimizers for adapters and full fine-tuning: GaLore and LoRA-FA."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError, did_you_mean
from .galore import GaLoreAdamW
from .lora_fa import freeze_lora_a

OPTIMIZERS = ("adamw", "galore", "lora-fa")


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer: unknown value {name!r}{did_you_mean(str(name), OPTIMIZERS)}; "
                          f"choose one of {', '.join(OPTIMIZERS)}")


def build_optimizer(name: str, model: nn.Module, groups: list[dict[str, Any]], lr: float,
                    weight_decay: float = 0.0, **options: Any) -> torch.optim.Optimizer:
    """``adamw``; ``galore`` (GaLoreAdamW, ``rank``/``update_gap`` in ``options``); ``lora-fa`` (AdamW on
    LoRA's B only: every ``lora_A`` is frozen and left out of the groups)."""
    check_optimizer(name)
    if name == "galore":
        return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, **options)
    if name == "lora-fa":
        frozen = {id(p) for p in freeze_lora_a(model)}
        groups = [dict(g, params=[p for p in g["params"] if id(p) not in frozen]) for g in groups]
        groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, projectors)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


__all__ = ["OPTIMIZERS", "GaLoreAdamW", "build_optimizer", "check_optimizer", "freeze_lora_a", "state_bytes"]
