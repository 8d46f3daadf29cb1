"""The merged single-adapter fast path.

While every live request uses the same adapter ``a``, its weight delta is folded into the base,
``W ← W + ΔW_a`` (``peftkit.merge``), and the model runs as a plain dense model: no gather, no
low-rank side path, the cost of the base model alone. When another adapter (or a base request)
joins, the base weights are restored. ``peftkit.unmerge`` subtracts ΔW again, which in floating
point is not exactly the original (``(W + Δ) − Δ ≠ W`` in general) and would drift over thousands
of switches in a long-running server; so the weights of the touched sites are copied before the
merge and copied back after the unmerge, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.model import iter_sites


class MergedPath:
    """Which adapter (if any) is currently merged into the base weights of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.name: str | None = None
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.merges = 0
        #: called after the base weights changed (a merge or a restore), e.g. to refresh prepacked copies
        self.changed: Callable[[], None] | None = None

    def mergeable(self, name: str) -> bool:
        from ..core.api import get_adapter

        return all(m.mergeable for m in get_adapter(self.model, name).values())

    @torch.no_grad()
    def use(self, name: str) -> None:
        """Fold ``name`` into the weights (restoring any other merged adapter first)."""
        if self.name == name:
            return
        self.release()
        from ..core.api import merge

        self._saved = [(p, p.detach().clone()) for _, site in iter_sites(self.model) if name in site.adapters
                       for p in site.base.parameters()]
        merge(self.model, name)
        self.name = name
        self.merges += 1
        if self.changed is not None:
            self.changed()

    @torch.no_grad()
    def release(self) -> None:
        """Restore the exact base weights."""
        if self.name is None:
            return
        from ..core.api import unmerge

        unmerge(self.model)
        for p, saved in self._saved:
            p.data.copy_(saved)
        self._saved = []
        self.name = None
        if self.changed is not None:
            self.changed()
