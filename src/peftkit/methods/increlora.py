"""IncreLoRA: ranks that grow during training where the importance is (Zhang et al., 2023, arXiv:2308.12043).

Each targeted layer holds SVD-form triplets ``ΔW = s · P diag(λ) Q`` (see
:mod:`peftkit.methods.svd_lowrank`; ``s = alpha / max_r``, constant) with room for ``max_r``
triplets of which the first ``init_r`` are active; inactive triplets contribute exactly 0 and get
no gradient. Only P, λ, Q train; the base is frozen; ``λ = 0`` at init, so the model is unchanged.

After every optimizer step up to ``total_step − tfinal`` the importance of each triplet is updated
with AdaLoRA's scorer (sensitivity ``|w·∇w|`` smoothed by ``beta1``, times its uncertainty
smoothed by ``beta2``: :meth:`SVDLayer.update_importance`, the same code). Every ``delta_t`` steps
after ``tinit`` a growth event adds rank-1 components: a layer's score is the mean score of its
active triplets, and the ``k`` best-scoring layers that still have room each get one new triplet
with ``λ = 0`` (fresh P column and Q row ~ N(0, 0.02²)), so the output does not change at that step.
``k`` spreads what is left of the budget ``target_r · n`` (``n`` layers) evenly over the remaining
events, so the total active rank is exactly ``target_r · n`` after the last event. The growth runs
through the training-hook protocol (``after_step``, :mod:`peftkit.core.hooks`); the active set is
recorded in the config's ``rank_pattern`` (``{module path: [active?] * max_r}``), saved with the adapter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, positive_int
from ..core.errors import ConfigError
from ..core.hooks import StepInfo
from ..core.layers import CONV2D, HF_CONV1D, LINEAR
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from .adalora import check_schedule, check_training_options, svd_layer_problem
from .svd_lowrank import SVDLayer


@register
@dataclass
class IncreLoRA(AdapterConfig):
    """IncreLoRA: SVD-form layers starting at ``init_r`` triplets, grown one triplet at a time where the
    importance is highest, up to ``target_r`` per layer on average (at most ``max_r`` in one layer).

    Growth events every ``delta_t`` steps between ``tinit`` and ``total_step − tfinal`` (``total_step``
    required: the run's number of optimizer steps).
    """

    method = "increlora"
    family = "low-rank"
    paper = "Zhang et al. 2023 (arXiv:2308.12043)"
    formula = "W x + s·P(λ ⊙ Q x), triplets added by importance; P, λ, Q"
    supported_layers = (LINEAR, HF_CONV1D, CONV2D)
    default_targets = ATTENTION_QV

    init_r: int = 2
    target_r: int = 4
    max_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    total_step: int | None = None
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    rank_pattern: dict[str, list[bool]] | None = None

    def validate(self) -> None:
        owner = type(self).__name__
        for name in ("init_r", "target_r", "max_r", "delta_t"):
            positive_int(owner, name, getattr(self, name))
        if self.init_r > self.target_r:
            raise ConfigError(f"{owner}: init_r={self.init_r} is above target_r={self.target_r}; ranks only grow "
                              f"(use init_r <= {self.target_r})")
        if self.target_r > self.max_r:
            raise ConfigError(f"{owner}: target_r={self.target_r} is above max_r={self.max_r}, the room of one layer "
                              f"(use target_r <= {self.max_r}, or raise max_r)")
        check_schedule(self, owner)
        if self.events() < 1:
            raise ConfigError(f"{owner}: no growth step fits: delta_t={self.delta_t} is larger than the "
                              f"{self.total_step - self.tfinal - self.tinit} steps between tinit and total_step - tfinal")
        check_training_options(self, owner)
        for k, v in (self.rank_pattern or {}).items():
            if not isinstance(v, list) or len(v) != self.max_r:
                raise ConfigError(f"{owner}: rank_pattern[{k!r}] must be a list of max_r={self.max_r} booleans")

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        return super().check_layer(base, module_name) or svd_layer_problem(self.method, base, self.max_r, "max_r")

    def resolve(self, model: nn.Module, module_names: list[str]) -> IncreLoRA:
        pattern = None if self.rank_pattern is None else {k: list(v) for k, v in self.rank_pattern.items()}
        return dataclasses.replace(self, rank_pattern=pattern)  # the hooks write it: one copy per adapter

    def build(self, base: nn.Module, module_name: str) -> SVDLayer:
        layer = SVDLayer(self, base, self.max_r, self.alpha, self.dropout)
        layer.module_name = module_name
        keep = (self.rank_pattern or {}).get(module_name)
        active = torch.tensor(keep, dtype=torch.bool) if keep is not None else torch.arange(self.max_r) < self.init_r
        layer.active.copy_(active)
        return layer

    # -- the growth schedule ----------------------------------------------------------
    def events(self, after: int = -1) -> int:
        """The number of growth steps ``t > after`` (``t = tinit + j·delta_t ≤ total_step − tfinal``, j ≥ 1)."""
        end = int(self.total_step or 0) - self.tfinal
        first = self.tinit + self.delta_t
        if end < first:
            return 0
        last_j = (end - self.tinit) // self.delta_t
        done_j = max(0, (after - self.tinit) // self.delta_t) if after >= first else 0
        return last_j - done_j

    def grow(self, layers: dict[str, SVDLayer], count: int) -> None:
        """Activate ``count`` new triplets, one per layer in order of layer score (mean active triplet score)."""
        while count > 0:
            room = {p: m for p, m in layers.items() if not bool(m.active.all())}
            if not room:
                return
            score = {p: float(m.triplet_scores()[m.active].mean()) if bool(m.active.any()) else math.inf
                     for p, m in room.items()}
            for path in sorted(room, key=lambda p: -score[p])[:count]:
                _activate_one(room[path])
                count -= 1

    def after_step(self, modules: dict[str, AdapterModule], info: StepInfo) -> None:
        layers: dict[str, SVDLayer] = modules  # type: ignore[assignment]
        end = int(self.total_step) - self.tfinal  # type: ignore[arg-type]
        step = info.step
        if step < end:
            for m in layers.values():
                m.update_importance(self.beta1, self.beta2)
        if step <= self.tinit or step > end or (step - self.tinit) % self.delta_t != 0:
            return
        left = self.target_r * len(layers) - sum(int(m.active.sum()) for m in layers.values())
        events_left = self.events(after=step - 1)
        if left > 0 and events_left > 0:
            self.grow(layers, math.ceil(left / events_left))
        self.rank_pattern = {p: m.active.tolist() for p, m in layers.items()}

    def regularization_loss(self, modules: dict[str, AdapterModule], info: StepInfo) -> torch.Tensor | None:
        """``orth_reg_weight · mean over layers and factors of ‖QQᵀ − I‖_F, ‖PᵀP − I‖_F`` (active triplets)."""
        if self.orth_reg_weight == 0:
            return None
        terms = [m.orthogonality() for m in modules.values()]  # type: ignore[operator]
        return self.orth_reg_weight * torch.stack(terms).sum() / (2 * len(terms))


@torch.no_grad()
def _activate_one(layer: SVDLayer) -> None:
    """The first inactive triplet becomes active with λ = 0 and fresh P column / Q row (output unchanged)."""
    i = int((~layer.active).nonzero()[0])
    layer.lora_E[i].zero_()
    layer.lora_A[i].normal_(0.0, 0.02)
    layer.lora_B[:, i].normal_(0.0, 0.02)
    layer.active[i] = True
    for name, (avg, unc) in layer.ipt.items():  # the new triplet's importance starts from zero
        rows = (slice(None), i) if name == "lora_B" else (i,)
        avg[rows] = 0.0
        unc[rows] = 0.0


def active_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """``{module path: active triplets}`` of IncreLoRA adapter ``name``."""
    from ..core.api import get_adapter

    return {path: int(m.active.sum()) for path, m in get_adapter(model, name).items()}
