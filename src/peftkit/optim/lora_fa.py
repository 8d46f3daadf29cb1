"""LoRA-FA: LoRA with a frozen down-projection (Zhang et al. 2023, arXiv:2308.03303).

LoRA's update is ``ΔW = s·B A``; LoRA-FA keeps ``A`` (``r×in``) at its random initialisation and
trains only ``B`` (``out×r``), so ``ΔW`` moves in the fixed row space of ``A``. No gradient,
optimizer state or saved input is needed for ``A``: the optimizer state halves for square layers,
and ``∂L/∂B = s gᵀ (x Aᵀ)`` needs only the ``r``-wide ``x Aᵀ``.
"""

from __future__ import annotations

from torch import nn

from ..core.errors import ConfigError
from ..core.model import iter_sites


def freeze_lora_a(model: nn.Module) -> list[nn.Parameter]:
    """Freeze ``lora_A`` of every LoRA/DoRA adapter in ``model``; returns the frozen parameters."""
    frozen = []
    for _, site in iter_sites(model):
        for mod in site.adapters.values():
            a = getattr(mod, "lora_A", None)
            if isinstance(a, nn.Parameter):
                a.requires_grad_(False)
                frozen.append(a)
    if not frozen:
        raise ConfigError("lora-fa: the model has no LoRA or DoRA adapter (lora_A) to freeze; attach one first")
    return frozen
