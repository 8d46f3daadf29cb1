"""Merging an adapter into a quantized base layer, and undoing it exactly.

``merge`` writes ``Q' = Q(W')`` with ``W' = deq(Q) + ΔW`` (or DoRA's ``W'``), records the relative
re-quantization error ``‖deq(Q') − W'‖_F / ‖W'‖_F`` on the layer (read it with
:func:`peftkit.quant.merge_errors`) and keeps the quantized tensor it replaced on the adapter, so
that ``unmerge`` puts back exactly the weight the layer had (re-quantizing ``W' − ΔW`` would not).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import requantize_weight

#: attribute on a quantized layer holding the relative error of its last re-quantizing merge
REQUANT_ERROR = "peftkit_requant_error"

_SAVED = "_peftkit_premerge_weight"


@torch.no_grad()
def merge_dense(adapter: nn.Module, base: nn.Module, merged: torch.Tensor) -> float:
    """Store ``merged`` (module layout, dense) re-quantized as ``base.weight``; returns the relative error."""
    old = base.weight
    q, err = requantize_weight(base, merged)
    stack = adapter.__dict__.setdefault(_SAVED, [])  # plain attribute: not a parameter of the adapter
    stack.append((old, getattr(base, REQUANT_ERROR, None)))
    base.weight = nn.Parameter(q, requires_grad=False)
    setattr(base, REQUANT_ERROR, err)
    return err


@torch.no_grad()
def unmerge(adapter: nn.Module, base: nn.Module) -> bool:
    """Put back the quantized weight saved by :func:`merge_dense`; False if there is none."""
    stack = adapter.__dict__.get(_SAVED)
    if not stack:
        return False
    base.weight, err = stack.pop()
    if err is not None:
        setattr(base, REQUANT_ERROR, err)
    elif hasattr(base, REQUANT_ERROR):
        delattr(base, REQUANT_ERROR)
    return True
