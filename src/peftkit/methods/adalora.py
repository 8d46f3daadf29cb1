"""AdaLoRA: adaptive budget allocation over SVD-form low-rank updates (Zhang et al., 2023, arXiv:2303.10512).

Each targeted layer gets ``ΔW = s · P diag(λ) Q`` with ``init_r`` triplets (see
:mod:`peftkit.methods.svd_lowrank`; ``λ = 0`` at init, so the model is unchanged; P, λ, Q train,
the base is frozen). During training the total rank is cut from ``b(0) = init_r · n`` to
``b_T = target_r · n`` (``n`` the number of adapted layers) on a cubic schedule, after the
optimizer step ``t`` (0-based):

    b(t) = b(0)                                              t ≤ tinit
    b(t) = b_T + (b(0) − b_T) · (1 − (t − tinit)/(T − tfinal − tinit))³    tinit < t < T − tfinal
    b(t) = b_T                                               t ≥ T − tfinal           (T = total_step)

Every ``delta_t`` steps of the middle phase (and once at ``t = T − tfinal``), the λ of every
triplet whose importance score (:meth:`SVDLayer.triplet_scores`) is at or below the
``(b(0) − b(t))``-th smallest score over all layers is set to 0; from ``T − tfinal`` on, the
final allocation is re-applied after every step. The allocation is recorded in the config's
``rank_pattern`` (``{module path: [keep triplet i?]}``, peft's form), so a saved adapter keeps it.

The training loss gets ``orth_reg_weight · mean(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F over layers)`` (the
Frobenius norms, not squared, as peft computes it), which keeps P and Q near orthogonal.

The allocation runs through the training-hook protocol (:mod:`peftkit.core.hooks`): ``peftkit.train``
calls it, other loops call ``peftkit.after_step(model, step)`` and add
``peftkit.regularization_loss(model)`` to the loss. Same results as peft's ``AdaLoraModel`` with
``update_and_allocate(step)`` under the same weights and gradients.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, positive_int, probability
from ..core.errors import ConfigError
from ..core.hooks import StepInfo
from ..core.layers import CONV2D, HF_CONV1D, LINEAR, layer_kind
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from ..formats.codec import HFCodec
from .svd_lowrank import SVDLayer


def check_beta(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 1.0:
        raise ConfigError(f"{owner}: {name} must be in (0, 1), got {value!r}")


def check_schedule(cfg: Any, owner: str, why: str = "") -> None:
    """``total_step`` given and positive, ``tinit``/``tfinal`` integers >= 0 (AdaLoRA, IncreLoRA)."""
    if cfg.total_step is None:
        raise ConfigError(f"{owner}: total_step is required: the number of optimizer steps of the run{why}")
    positive_int(owner, "total_step", cfg.total_step)
    for name in ("tinit", "tfinal"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{owner}: {name} must be an integer >= 0, got {v!r}")


def check_training_options(cfg: Any, owner: str) -> None:
    """The importance averages' betas, alpha, the orthogonality weight and dropout (AdaLoRA, IncreLoRA)."""
    check_beta(owner, "beta1", cfg.beta1)
    check_beta(owner, "beta2", cfg.beta2)
    check_alpha(owner, cfg.alpha)
    if not isinstance(cfg.orth_reg_weight, (int, float)) or cfg.orth_reg_weight < 0:
        raise ConfigError(f"{owner}: orth_reg_weight must be >= 0, got {cfg.orth_reg_weight!r}")
    probability(owner, "dropout", cfg.dropout)


def check_alpha(owner: str, alpha: Any) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ConfigError(f"{owner}: alpha must be a number, got {alpha!r}")


def svd_layer_problem(method: str, base: nn.Module, r: int, field_name: str) -> str | None:
    """A reason an SVD-form layer of rank ``r`` does not fit ``base`` (grouped conv, rank above min(out, in))."""
    if layer_kind(base) == CONV2D and base.groups != 1:
        return f"grouped convolutions (groups={base.groups}) are not supported by {method}"
    w = base.weight
    out_f, in_f = (w.shape[0], w[0].numel()) if layer_kind(base) == CONV2D else (
        (w.shape[1], w.shape[0]) if layer_kind(base) == HF_CONV1D else (w.shape[0], w.shape[1]))
    if r > min(out_f, in_f):
        return f"{field_name}={r} is larger than the layer allows ({min(out_f, in_f)} = min(out, in) of {out_f}×{in_f})"
    return None


@register
@dataclass
class AdaLoRA(AdapterConfig):
    """AdaLoRA: SVD-form updates whose total rank is pruned from ``init_r`` to ``target_r`` per layer on average.

    ``total_step`` (required) is the number of optimizer steps of the run; ``tinit`` steps of
    warm-up keep the full budget, the budget then falls on a cubic schedule until
    ``total_step − tfinal``, re-allocated every ``delta_t`` steps; ``beta1``/``beta2`` smooth the
    importance and its uncertainty; ``orth_reg_weight`` weighs the orthogonality penalty.
    ``alpha`` scales the update (``s = alpha / init_r``). ``rank_pattern`` holds the allocation
    (filled in during training).
    """

    method = "adalora"
    family = "low-rank"
    paper = "Zhang et al. 2023 (arXiv:2303.10512)"
    formula = "W x + s·P(λ ⊙ Q x), budget pruned by importance; P, λ, Q"
    supported_layers = (LINEAR, HF_CONV1D, CONV2D)
    default_targets = ATTENTION_QV

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    total_step: int | None = None
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    rank_pattern: dict[str, list[bool]] | None = None

    def validate(self) -> None:
        owner = type(self).__name__
        positive_int(owner, "init_r", self.init_r)
        positive_int(owner, "target_r", self.target_r)
        if self.target_r > self.init_r:
            raise ConfigError(f"{owner}: target_r={self.target_r} is above init_r={self.init_r}; the budget can only "
                              f"shrink (use target_r <= {self.init_r}, or raise init_r)")
        check_schedule(self, owner, " (the budget schedule ends at total_step - tfinal)")
        if self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(f"{owner}: tinit ({self.tinit}) + tfinal ({self.tfinal}) must be below total_step "
                              f"({self.total_step}), or no step is left to allocate the budget; lower tinit/tfinal "
                              f"or raise total_step above {self.tinit + self.tfinal}")
        positive_int(owner, "delta_t", self.delta_t)
        check_training_options(self, owner)
        for k, v in (self.rank_pattern or {}).items():
            if not isinstance(v, list) or len(v) != self.init_r:
                raise ConfigError(f"{owner}: rank_pattern[{k!r}] must be a list of init_r={self.init_r} booleans")

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        return super().check_layer(base, module_name) or svd_layer_problem(self.method, base, self.init_r, "init_r")

    def resolve(self, model: nn.Module, module_names: list[str]) -> AdaLoRA:
        # the allocation is written into the config during training: each adapter owns its copy
        pattern = None if self.rank_pattern is None else {k: list(v) for k, v in self.rank_pattern.items()}
        return dataclasses.replace(self, rank_pattern=pattern)

    def build(self, base: nn.Module, module_name: str) -> SVDLayer:
        layer = SVDLayer(self, base, self.init_r, self.alpha, self.dropout)
        layer.module_name = module_name
        keep = (self.rank_pattern or {}).get(module_name)
        if keep is not None:
            layer.mask_values(torch.tensor(keep, dtype=torch.bool))
        return layer

    # -- the budget schedule -------------------------------------------------------------
    def budget(self, step: int, n_layers: int) -> tuple[int, bool]:
        """``(b(step), whether step re-allocates)`` for ``n_layers`` adapted layers (peft's ``budget_schedule``)."""
        init_b, target_b = self.init_r * n_layers, self.target_r * n_layers
        total = int(self.total_step)  # type: ignore[arg-type]
        if step <= self.tinit:
            return init_b, False
        if step > total - self.tfinal:
            return target_b, True
        left = 1 - (step - self.tinit) / (total - self.tfinal - self.tinit)
        return int((init_b - target_b) * left**3 + target_b), step % self.delta_t == 0

    def allocate(self, modules: dict[str, AdapterModule], budget: int) -> dict[str, list[bool]]:
        """Mask every triplet scoring at or below the ``(b(0) − budget)``-th smallest score; the kept pattern."""
        layers: dict[str, SVDLayer] = modules  # type: ignore[assignment]
        scores = {path: m.triplet_scores() for path, m in layers.items()}
        cut = sum(m.r for m in layers.values()) - budget
        pattern: dict[str, list[bool]] = {}
        if cut <= 0:
            return {path: [True] * m.r for path, m in layers.items()}
        threshold = torch.kthvalue(torch.cat([s.view(-1).float().cpu() for s in scores.values()]), k=cut)[0].item()
        for path, m in layers.items():
            keep = scores[path] > threshold
            m.mask_values(keep)
            pattern[path] = keep.view(-1).tolist()
        return pattern

    # -- training hooks (peftkit.core.hooks) ------------------------------------------
    def after_step(self, modules: dict[str, AdapterModule], info: StepInfo) -> None:
        """peft's ``update_and_allocate(step)``: importance update, then masking on the schedule."""
        layers: dict[str, SVDLayer] = modules  # type: ignore[assignment]
        end = int(self.total_step) - self.tfinal  # type: ignore[arg-type]
        step = info.step
        if step < end:
            for m in layers.values():
                m.update_importance(self.beta1, self.beta2)
            budget, mask_now = self.budget(step, len(layers))
            if mask_now:
                self.rank_pattern = self.allocate(layers, budget)
        elif step == end:
            self.rank_pattern = self.allocate(layers, self.target_r * len(layers))
            for m in layers.values():
                m.reset_importance()
        elif self.rank_pattern is None:  # a run resumed past the final allocation: the zeroed λ tell it
            self.rank_pattern = {path: (m.lora_E != 0).view(-1).tolist() for path, m in layers.items()}
        else:
            for path, m in layers.items():
                m.mask_values(torch.tensor(self.rank_pattern[path], dtype=torch.bool))

    def regularization_loss(self, modules: dict[str, AdapterModule], info: StepInfo) -> torch.Tensor | None:
        """``orth_reg_weight · mean over layers and factors of ‖QQᵀ − I‖_F, ‖PᵀP − I‖_F``."""
        if self.orth_reg_weight == 0:
            return None
        terms = [m.orthogonality() for m in modules.values()]  # type: ignore[operator]
        return self.orth_reg_weight * torch.stack(terms).sum() / (2 * len(terms))


def kept_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """``{module path: number of triplets kept}`` of AdaLoRA adapter ``name`` (nonzero λ)."""
    from ..core.api import get_adapter

    return {path: int((m.lora_E != 0).sum()) for path, m in get_adapter(model, name).items()}


# -- Hugging Face PEFT form (peft's AdaLoraConfig, peft_type "ADALORA") -----------------------------
#: peft keys read (``r``, ``use_rslora``, ``init_lora_weights``, ``fan_in_fan_out`` do not change peft's AdaLoRA math)
HF_OPTIONS = frozenset({"init_r", "target_r", "lora_alpha", "lora_dropout", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                        "orth_reg_weight", "total_step", "rank_pattern", "r", "use_rslora", "init_lora_weights",
                        "fan_in_fan_out", "bias", "layers_to_transform", "layers_pattern"})
HF_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}


def _to_hf(c: AdaLoRA, targets: list[str]) -> dict[str, Any]:
    pattern = None if c.rank_pattern is None else {f"{path}.lora_E": list(keep) for path, keep in c.rank_pattern.items()}
    return {"init_r": c.init_r, "target_r": c.target_r, "lora_alpha": c.alpha, "lora_dropout": c.dropout,
            "total_step": c.total_step, "tinit": c.tinit, "tfinal": c.tfinal, "deltaT": c.delta_t, "beta1": c.beta1,
            "beta2": c.beta2, "orth_reg_weight": c.orth_reg_weight, "rank_pattern": pattern, "r": 8, "bias": "none",
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}


def _from_hf(d: dict[str, Any]) -> AdaLoRA:
    if d.get("bias", "none") != "none":
        raise ConfigError(f"peft option bias={d['bias']!r} is not supported by peftkit's AdaLoRA; use 'none'")
    raw = d.get("rank_pattern")
    pattern = None if raw is None else {re.sub(r"\.lora_E(\.[^.]+)?$", "", k): [bool(x) for x in v] for k, v in raw.items()}
    return AdaLoRA(init_r=int(d.get("init_r", 12)), target_r=int(d.get("target_r", 8)), alpha=d.get("lora_alpha", 8),
                   dropout=float(d.get("lora_dropout", 0.0) or 0.0), total_step=d.get("total_step"),
                   tinit=int(d.get("tinit", 0)), tfinal=int(d.get("tfinal", 0)), delta_t=int(d.get("deltaT", 1)),
                   beta1=d.get("beta1", 0.85), beta2=d.get("beta2", 0.85), orth_reg_weight=d.get("orth_reg_weight", 0.5),
                   rank_pattern=pattern, target_modules=d.get("target_modules"))


def _export(state: dict[str, torch.Tensor], layer: dict[str, Any]) -> dict[str, torch.Tensor]:
    """peft keeps only the allocated triplets in its files (``resize_state_dict_by_rank_pattern``)."""
    keep = layer.get("rank_keep")
    if keep is None or all(keep):
        return state
    idx = torch.tensor(keep, dtype=torch.bool)
    return {"lora_A": state["lora_A"][idx], "lora_E": state["lora_E"][idx], "lora_B": state["lora_B"][:, idx]}


def _from_file(state: Any) -> Any:
    """Put a peft file's kept triplets back in their slots of ``init_r`` (the pruned ones: zeros, λ = 0)."""
    config: AdaLoRA = state.config
    tensors = dict(state.tensors)
    for path, keep in (config.rank_pattern or {}).items():
        a, e, b = (tensors.get(f"{path}.{n}") for n in ("lora_A", "lora_E", "lora_B"))
        if a is None or e is None or b is None or a.shape[0] == config.init_r:
            continue
        idx = torch.tensor(keep, dtype=torch.bool)
        if int(idx.sum()) != a.shape[0]:
            from ..core.errors import AdapterLoadError

            raise AdapterLoadError(f"{path}: rank_pattern keeps {int(idx.sum())} triplets but the file holds {a.shape[0]}")
        full_a, full_e = a.new_zeros(config.init_r, a.shape[1]), e.new_zeros(config.init_r, 1)
        full_b = b.new_zeros(b.shape[0], config.init_r)
        full_a[idx], full_e[idx], full_b[:, idx] = a, e, b
        tensors.update({f"{path}.lora_A": full_a, f"{path}.lora_E": full_e, f"{path}.lora_B": full_b})
    return state.replace(tensors=tensors)


AdaLoRA.hf_codec = HFCodec(
    peft_type="ADALORA",
    config_to_hf=_to_hf,
    config_from_hf=_from_hf,
    read_names={"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"},
    options=HF_OPTIONS,
    defaults=HF_DEFAULTS,
    export=_export,
    from_file=_from_file,
)
