"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022, arXiv:2205.05638).

A learned vector rescales a layer's activations elementwise. For a frozen layer ``y = W x + b``
(``W ∈ R^{out×in}``; transformers' ``Conv1D`` and ``Conv2d``/``Conv3d`` through their channels):

* attention-like modules (keys, values) scale the **output**:  ``y = l ⊙ (W x + b)``, ``l ∈ R^{out}``;
* feed-forward modules (``feedforward_modules``) scale the **input**: ``y = W (l ⊙ x) + b``, ``l ∈ R^{in}``.

Only ``l`` trains (initialised to ones, so the model starts unchanged); ``W`` and ``b`` are frozen.
Merging folds ``l`` into the weights: output scaling scales ``W``'s rows and ``b``
(``W ← diag(l) W``, ``b ← l ⊙ b``); input scaling scales ``W``'s columns and leaves ``b``
(``W ← W diag(l)``). Unmerging divides back; elements that division cannot restore (a scale of
0, underflow) are kept aside at merge time so unmerge gives the original weights back.

Conventions follow peft 0.21.2 (``peft.tuners.ia3``): the vector is stored as ``ia3_l`` with
shape ``(out, 1)`` (output scaling) or ``(1, in)`` (input scaling) for linear layers and
``(1, C, 1, 1[, 1])`` for convolutions; default targets and feed-forward modules per model
type are peft's. With ``feedforward_modules=None`` the model type's default feed-forward
modules are used (none for a model type peft does not list). Input scaling runs as an input
transform, so rows of a mixed batch go through their own vectors exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig
from ..core.errors import ConfigError
from ..core.layers import CONV2D, HF_CONV1D, LINEAR, layer_info, layer_kind
from ..core.registry import register
from ..core.targeting import as_list, pattern_matches
from ..core.targets import IA3_FEEDFORWARD, IA3_TARGETS
from ..formats.codec import HFCodec


@register
@dataclass
class IA3(AdapterConfig):
    """(IA)³ vectors on ``target_modules``; those also in ``feedforward_modules`` scale the layer input.

    ``feedforward_modules`` takes the same pattern forms as ``target_modules`` and must name a
    subset of the targets; None means the model type's default (peft's table), or none.
    ``init_ia3_weights=False`` starts from random vectors (N(0, 1), as peft) instead of ones.
    """

    method = "ia3"
    family = "scaling"
    paper = "Liu et al. 2022 (arXiv:2205.05638)"
    formula = "l ⊙ (W x + b), or W (l ⊙ x) + b for feed-forward modules; l"
    supported_layers = (LINEAR, HF_CONV1D, CONV2D, "conv3d")
    default_targets = IA3_TARGETS

    feedforward_modules: Any = None
    init_ia3_weights: bool = True

    def validate(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"{owner}: init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        ff, targets = self.feedforward_modules, self.target_modules
        for value, name in ((ff, "feedforward_modules"), (targets, "target_modules")):
            if value is not None and not isinstance(value, (str, type, list, tuple, set)):
                raise ConfigError(f"{owner}: {name} must be a pattern or a list of patterns, got {value!r}")
        # peft's rule: feed-forward modules are targets too (an entry must name, narrow or widen a target name)
        if _plain_names(ff) and _plain_names(targets):
            listed = as_list(targets)
            for entry in as_list(ff):
                if not any(entry == t or entry.endswith("." + t) or t.endswith("." + entry) for t in listed):
                    raise ConfigError(
                        f"{owner}: feedforward_modules entry {entry!r} is not among target_modules {listed}; "
                        "every feed-forward module must also be targeted"
                    )

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        if layer_kind(base) not in (LINEAR, HF_CONV1D, CONV2D) and not isinstance(base, nn.Conv3d):
            return (f"{self.method} does not support {type(base).__name__} layers "
                    "(supported: Linear, transformers Conv1D, Conv2d, Conv3d)")
        return None

    def _hits(self, model: nn.Module, module_names: list[str]):
        from ..core.site import AdapterSite

        modules = [model.get_submodule(n) for n in module_names]
        modules = [m.base if isinstance(m, AdapterSite) else m for m in modules]
        return lambda p: any(pattern_matches(p, n, m, set()) for n, m in zip(module_names, modules, strict=True))

    def check_model(self, model: nn.Module, module_names: list[str]) -> str | None:
        """Every explicit feed-forward pattern must match one of the targeted modules."""
        if self.feedforward_modules is None:
            return None
        hits = self._hits(model, module_names)
        for p in as_list(self.feedforward_modules):
            if isinstance(p, str) and p.startswith("re:"):
                continue  # regular expressions (as read from peft files) may match nothing, as in peft
            if not hits(p):
                return (f"feedforward_modules pattern {p!r} matches none of the targeted modules; "
                        "every feed-forward module must also be targeted")
        return None

    def initial_value(self, module: str, tensor: str, shape: tuple[int, ...], facts: dict[str, Any]) -> float | None:
        return 1.0 if tensor == "ia3_l" else None  # l starts at 1: the identity

    def resolve(self, model: nn.Module, module_names: list[str]) -> IA3:
        """With ``feedforward_modules=None``: the model type's default, kept to the patterns that apply here."""
        if self.feedforward_modules is not None:
            return self
        hits = self._hits(model, module_names)
        mt = getattr(getattr(model, "config", None), "model_type", None)
        ff = [p for p in IA3_FEEDFORWARD.get(mt, []) if hits(p)]
        targets = self.target_modules if self.target_modules is not None else IA3_TARGETS.get(mt)
        return self.replace(target_modules=targets, feedforward_modules=ff)

    def is_feedforward(self, base: nn.Module, module_name: str) -> bool:
        return any(pattern_matches(p, module_name, base, set()) for p in as_list(self.feedforward_modules))

    def build(self, base: nn.Module, module_name: str) -> IA3Layer:
        ff = self.is_feedforward(base, module_name)
        self.__dict__.setdefault("_ff_paths", set())
        (self._ff_paths.add if ff else self._ff_paths.discard)(module_name)
        return IA3Layer(self, base, ff)


def _plain_names(v: Any) -> bool:
    """A list of plain module names (no glob, regex or class): the only form peft checks for the subset rule."""
    if not isinstance(v, (list, tuple, set)):
        return False
    return all(isinstance(p, str) and not p.startswith("re:") and not set(p) & set("*?[") for p in v)


class IA3Layer(AdapterModule):
    """``l ⊙ base(x)`` (output scaling) or ``base(l ⊙ x)`` (feed-forward, input scaling) on one layer."""

    def __init__(self, config: IA3, base: nn.Module, is_feedforward: bool) -> None:
        super().__init__(config, base)
        self.is_feedforward = is_feedforward
        self.transforms_input = is_feedforward
        self.adapts_output = not is_feedforward
        self.kind = "conv3d" if isinstance(base, nn.Conv3d) else layer_kind(base)
        self.is_conv = self.kind in (CONV2D, "conv3d")
        if self.is_conv:
            n = base.in_channels if is_feedforward else base.out_channels
            shape: tuple[int, ...] = (1, n, *([1] * (base.weight.dim() - 2)))
            self.spatial = base.weight.dim() - 2
        else:
            info = layer_info(base)
            shape = (1, info.in_features) if is_feedforward else (info.out_features, 1)
            self.spatial = 0
        init = torch.ones(shape) if config.init_ia3_weights else torch.randn(shape)
        self.ia3_l = nn.Parameter(init)

    def scale_vector(self, channels_last: bool) -> torch.Tensor:
        """``l`` shaped to broadcast over an activation (channels last, or channels before the spatial dims)."""
        flat = self.ia3_l.reshape(-1)
        if channels_last or not self.is_conv:
            return flat
        return flat.reshape(-1, *([1] * self.spatial))

    # -- forward ---------------------------------------------------------------------
    def transform_input(self, x: torch.Tensor, site: Any) -> torch.Tensor:
        s = self.scale_vector(channels_last=False)
        return (x.to(s.dtype) * s).to(x.dtype)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        s = self.scale_vector(channels_last=False)
        return (y.to(s.dtype) * s).to(y.dtype)

    # -- merging ---------------------------------------------------------------------
    def weight_scale(self, base: nn.Module) -> torch.Tensor:
        """``l`` laid out to multiply ``base.weight`` elementwise."""
        w = base.weight
        flat = self.ia3_l.detach().reshape(-1)
        ones = [1] * (w.dim() - 2)
        if self.kind == LINEAR:
            return flat[None, :] if self.is_feedforward else flat[:, None]
        if self.kind == HF_CONV1D:  # weight is (in, out)
            return flat[:, None] if self.is_feedforward else flat[None, :]
        if not self.is_feedforward:
            return flat.reshape(-1, 1, *ones)
        groups = base.groups
        if groups == 1:
            return flat.reshape(1, -1, *ones)
        in_pg, out_pg = base.in_channels // groups, base.out_channels // groups
        idx = (torch.arange(base.out_channels, device=flat.device) // out_pg)[:, None] * in_pg + \
            torch.arange(in_pg, device=flat.device)[None, :]
        return flat[idx].reshape(base.out_channels, in_pg, *ones)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        w = base.weight
        s = self.weight_scale(base)
        merged = (w.to(s.dtype) * s).to(w.dtype)
        restored = (merged.to(s.dtype) / s).to(w.dtype)
        tol = 2 * torch.finfo(w.dtype).eps * w.abs() + torch.finfo(w.dtype).tiny
        lost = ~((restored - w).abs() <= tol)  # also catches nan/inf from a zero scale
        idx = lost.reshape(-1).nonzero().reshape(-1)
        self.register_buffer("merge_stash_index", idx, persistent=False)
        self.register_buffer("merge_stash_value", w.detach().reshape(-1)[idx].clone(), persistent=False)
        w.data = merged
        b = getattr(base, "bias", None)
        if not self.is_feedforward and b is not None:
            self.register_buffer("merge_stash_bias", b.detach().clone(), persistent=False)
            b.data = (b.to(s.dtype) * self.ia3_l.detach().reshape(-1)).to(b.dtype)

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        w = base.weight
        s = self.weight_scale(base)
        restored = (w.to(s.dtype) / s).to(w.dtype)
        idx = self._buffers.pop("merge_stash_index", None)
        val = self._buffers.pop("merge_stash_value", None)
        if idx is not None and val is not None and idx.numel():
            restored.reshape(-1)[idx] = val.to(restored.dtype)
        w.data = restored
        stash_b = self._buffers.pop("merge_stash_bias", None)
        b = getattr(base, "bias", None)
        if stash_b is not None and b is not None:
            b.data = stash_b.to(b.dtype)

    def extra_repr(self) -> str:
        where = "input (feed-forward)" if self.is_feedforward else "output"
        return f"method=ia3, scales={where}, shape={tuple(self.ia3_l.shape)}"


# -- Hugging Face PEFT format ------------------------------------------------------------------
def _patterns_from_hf(v: Any) -> Any:
    """peft target patterns → peftkit's: a string is a full-match regular expression in peft."""
    if isinstance(v, str):
        return "re:" + v
    return list(v) if v is not None else None


def _ff_from_hf(v: Any) -> Any:
    """peft's feed-forward rule: a string full-matches the module path, a list entry is a plain ``endswith``."""
    if v is None:
        return []
    if isinstance(v, str):
        return ["re:" + v]
    return ["re:.*" + re.escape(e) for e in v]


def _ia3_from_hf(d: dict[str, Any]) -> IA3:
    return IA3(target_modules=_patterns_from_hf(d.get("target_modules")),
               exclude_modules=_patterns_from_hf(d.get("exclude_modules")),
               feedforward_modules=_ff_from_hf(d.get("feedforward_modules")),
               init_ia3_weights=d.get("init_ia3_weights", True))


def _ia3_to_hf(config: IA3, targets: list[str]) -> dict[str, Any]:
    ff_paths = getattr(config, "_ff_paths", set())
    ff = [t for t in targets if t in ff_paths]
    return {
        # peft full-matches a string against the module path, and checks a list against target_modules
        "feedforward_modules": "^(?:" + "|".join(re.escape(t) for t in ff) + ")$" if ff else [],
        "init_ia3_weights": config.init_ia3_weights,
        "fan_in_fan_out": False,  # peft sets it per layer (True for Conv1D)
        "modules_to_save": None,
    }


IA3.hf_codec = HFCodec(
    peft_type="IA3",
    config_to_hf=_ia3_to_hf,
    config_from_hf=_ia3_from_hf,
    read_names={"ia3_l": "ia3_l"},
    options=frozenset({"feedforward_modules", "init_ia3_weights", "fan_in_fan_out", "modules_to_save"}),
)
