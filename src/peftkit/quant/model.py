"""Quantize the frozen base of a model in place, and undo it.

``quantize(model, "nf4")`` replaces the ``weight`` of every targeted ``nn.Linear`` (default
``"all-linear"``: every linear layer but the output head) by a quantized torchao tensor; the
layer keeps its class, so the model keeps its class and its ``forward``. Attach LoRA or DoRA
afterwards (QLoRA, Dettmers et al. 2023, arXiv:2305.14314): the adapters stay in float32 and
train, the quantized base is frozen.

Merging an adapter into a quantized layer (``peftkit.merge``) computes ``W' = deq(Q) + ΔW``
and re-quantizes it; the relative error ``‖deq(Q(W')) − W'‖_F / ‖W'‖_F`` of every layer is
recorded and :func:`merge_errors` returns it. ``peftkit.unmerge`` restores the exact quantized
weight held before the merge. ``peftkit.unload(model, merge=True)`` refuses on a quantized
base (it would silently leave a re-quantized model); :func:`dequantize` first makes the base
dense again (``deq(Q)``, not the original weights) so that merge-and-unload is exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import TargetError
from ..core.layers import LINEAR, dense_tensor, is_quantized, layer_kind
from ..core.requant import REQUANT_ERROR
from ..core.targeting import ALL_LINEAR, display_name, resolve_targets
from .schemes import ensure_registered, get_scheme, scheme_of


def quantize(model: nn.Module, scheme: str = "nf4", targets: Any = ALL_LINEAR, exclude: Any = None) -> nn.Module:
    """Quantize the weights of the targeted linear layers in place (``"nf4"`` or ``"int8"``); returns ``model``.

    Every targeted layer is checked before any is changed: it must be an ``nn.Linear`` whose weight
    is not already quantized and fits the scheme (nf4: a size that is a multiple of 64).
    """
    sch = get_scheme(scheme)
    names = resolve_targets(model, targets, exclude)
    problems, layers = [], []
    for name in names:
        module = model.get_submodule(name)
        user = display_name(name)
        if layer_kind(module) != LINEAR:
            problems.append(f"{user} is a {type(module).__name__}, only nn.Linear layers can be quantized")
            continue
        if is_quantized(module.weight):
            problems.append(f"{user} is already quantized ({scheme_of(module.weight)})")
            continue
        reason = sch.check(module.weight)
        if reason:
            problems.append(f"{user}: {reason}")
            continue
        layers.append(module)
    if problems:
        raise TargetError(f"cannot quantize to {scheme}: " + "; ".join(problems)
                          + " (narrow targets= or add the layer to exclude=)")
    with torch.no_grad():
        for module in layers:
            module.weight = nn.Parameter(sch.quantize(module.weight.detach()), requires_grad=False)
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every quantized weight by its dense dequantization ``deq(Q)`` (frozen, original dtype)."""
    ensure_registered()
    with torch.no_grad():
        for _, module in model.named_modules():
            w = module._parameters.get("weight")  # not getattr: an AdapterSite forwards .weight to its base
            if is_quantized(w):
                module.weight = nn.Parameter(dense_tensor(w).clone(), requires_grad=False)
                if hasattr(module, REQUANT_ERROR):
                    delattr(module, REQUANT_ERROR)
    return model


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """``{module name: scheme}`` for every layer whose weight is quantized (names as the user's model has them)."""
    out = {}
    for name, module in model.named_modules():
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if w is not None and is_quantized(w):
            out[display_name(name)] = scheme_of(w) or type(w).__name__
    return out


def merge_errors(model: nn.Module) -> dict[str, float]:
    """``{module name: relative re-quantization error}`` of the layers an adapter was merged into."""
    return {display_name(n): float(getattr(m, REQUANT_ERROR)) for n, m in model.named_modules() if hasattr(m, REQUANT_ERROR)}
