"""SpIEL: sparse fine-tuning with drop and regrow (Ansell et al. 2024, arXiv:2401.16405), the AG variant.

Each targeted weight ``W`` keeps an (index, delta) pair of arrays at a fixed density::

    W' = W + scatter_η(φ),     |η| = k = max(1, round(density · numel(W)))

Only ``φ`` (initialised to 0, so the model starts as the base model) trains; ``W`` is frozen.
The support ``η`` starts uniform at random (seeded per module) and evolves during training
through the training hooks, every ``update_every`` optimizer steps:

1. **update** — ``φ`` trains for ``update_every`` steps;
2. **drop** — the ``n = round(drop_fraction · k)`` entries whose delta changed least over that
   phase, ``|φ_now − φ_at_the_last_update|``, leave ``η`` (the paper prunes by the change of the
   deltas; an entry regrown at the last update compares with 0, i.e. its ``|φ|``). Their deltas
   are discarded, so the function changes by exactly those ``n`` deltas;
3. **regrow (AG)** — ``n`` new positions outside the old ``η``: the largest ``|Σ_t ∂loss/∂W'|``
   of the gradients of the dense weight accumulated over the last ``accumulation_steps`` steps
   of the phase. Regrown deltas start at 0 and their optimizer state is zeroed
   (``info.optimizer``, Adam's moments); kept entries keep theirs.

``k`` never changes, so the trainable state is ``k`` values + ``k`` int64 indices per weight
(memory ∝ density). The dense gradient accumulator (float32, one per targeted weight) exists only
during the ``accumulation_steps`` steps before each update and is freed after it; during those
steps the backward also computes the dense weight gradient. The paper's SM3-momentum variant
(MA) is not implemented, and ``drop_fraction`` is constant over training (no decay schedule). Merging is exact:
``W.view(-1)[η] += φ``. No Hugging Face PEFT form (the reference code is a peft fork).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, positive_int, probability
from ..core.errors import ConfigError
from ..core.layers import CONV1D, CONV2D, EMBEDDING, HF_CONV1D, LINEAR
from ..core.registry import register
from ..core.targets import ALL_LINEAR
from .sparse_delta import SparseDeltaLayer, count_for, select_support


@register
@dataclass
class SpIEL(AdapterConfig):
    """A sparse delta at ``density`` whose support is dropped and regrown every ``update_every`` steps."""

    method = "spiel"
    family = "sparse"
    paper = "Ansell et al. 2024, SpIEL (arXiv:2401.16405), AG variant"
    formula = "W + scatter(φ at η); φ, η dropped by least change and regrown by accumulated |grad|"
    supported_layers = (LINEAR, HF_CONV1D, CONV1D, CONV2D, EMBEDDING)
    default_targets = ALL_LINEAR

    density: float = 0.01
    update_every: int = 20
    drop_fraction: float = 0.1
    accumulation_steps: int = 5
    seed: int = 0

    def validate(self) -> None:
        owner = type(self).__name__
        d = self.density
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0.0 < d <= 1.0:
            raise ConfigError(f"{owner}: density must be in (0, 1], got {d!r}")
        positive_int(owner, "update_every", self.update_every)
        positive_int(owner, "accumulation_steps", self.accumulation_steps)
        probability(owner, "drop_fraction", self.drop_fraction, upper_open=False)
        if self.accumulation_steps > self.update_every:
            raise ConfigError(f"{owner}: accumulation_steps={self.accumulation_steps} is longer than the update phase "
                              f"(update_every={self.update_every}); use at most {self.update_every}")

    def build(self, base: nn.Module, module_name: str) -> SpIELLayer:
        return SpIELLayer(self, base, module_name)

    # -- training hooks ------------------------------------------------------------------------
    def _layers(self, modules: dict[str, AdapterModule]) -> list[SpIELLayer]:
        return [m for m in modules.values() if isinstance(m, SpIELLayer)]

    def before_step(self, modules: dict[str, AdapterModule], info: Any) -> None:
        phase = info.step % self.update_every
        on = phase >= self.update_every - self.accumulation_steps
        for m in self._layers(modules):
            m.capture_gradients("sum" if on else None)

    def after_step(self, modules: dict[str, AdapterModule], info: Any) -> None:
        if (info.step + 1) % self.update_every:
            return
        last = info.total_steps is not None and info.step + 1 >= info.total_steps
        for m in self._layers(modules):
            if last:  # nothing trains after the last step: keep the learned deltas
                m.take_score()
                m.capture_gradients(None)
            else:
                m.drop_and_regrow(round(self.drop_fraction * m.indices.numel()), info.optimizer)


class SpIELLayer(SparseDeltaLayer):
    """``indices`` (η, sorted int64) and ``values`` (φ); ``anchor`` holds φ at the last update (not saved)."""

    def __init__(self, config: SpIEL, base: nn.Module, module_name: str) -> None:
        w = base.weight
        idx = select_support("random", count_for(config.density, w.numel()), w, module_name, config.seed)
        super().__init__(config, base, module_name, idx)
        self.register_buffer("anchor", torch.zeros_like(self.values.detach()), persistent=False)

    @torch.no_grad()
    def drop_and_regrow(self, n: int, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Drop the ``n`` entries whose delta changed least since the last update and grow ``n`` new ones
        from the accumulated gradient; returns how many were replaced (0 without an accumulated gradient)."""
        score = self.take_score()
        self.capture_gradients(None)
        k = self.indices.numel()
        n = min(n, k, self.numel - k)
        if score is None or n <= 0:
            self.anchor.copy_(self.values.detach())
            return 0
        change = (self.values.detach() - self.anchor).abs()
        keep = torch.topk(change, k - n, sorted=False).indices
        score = score.to(self.indices.device)
        score[self.indices] = -1.0  # grow only outside the old support
        grow = torch.topk(score, n, sorted=False).indices
        new_idx = torch.cat([self.indices[keep], grow])
        new_vals = torch.cat([self.values.detach()[keep], torch.zeros(n, device=self.values.device)])
        source = torch.cat([keep, torch.full((n,), -1, dtype=torch.long, device=keep.device)])
        self.set_support(new_idx, new_vals, source, optimizer)
        self.anchor.copy_(self.values.detach())
        return n

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        with torch.no_grad():  # not saved: after a load (or a resumed run) the change is measured from here
            self.anchor.copy_(self.values.detach())

    def extra_repr(self) -> str:
        return f"method=spiel, entries={self.indices.numel()}/{self.numel}"
