"""Selective fine-tuning: train a chosen subset of the base model's own parameters.

**BitFit** (Ben Zaken, Ravfogel and Goldberg, 2021, arXiv:2106.10199) trains only the bias terms.
For a targeted layer ``y = f(x; W) + b`` the adapter holds ``Δb`` (initialised to 0) and computes

    y = f(x; W) + (b + Δb),

so the model is unchanged at step 0 and merging is exact: ``b ← b + Δb`` (unmerge ``b ← b − Δb``).
Everything else (``W``, ``b`` itself) is frozen. For layers whose bias is added to the output
along a known axis — ``nn.Linear``, transformers' ``Conv1D`` (last axis), convolutions,
batch/group/instance norms (channel axis) and ``nn.LayerNorm`` (trailing axes) — ``Δb`` is
added to the output, so rows of a mixed batch share one base call; any other module with a
``bias`` parameter runs with ``bias + Δb`` in place of its bias.

By default BitFit targets ``"all-bias"``: every module with its own ``bias`` parameter,
except the output head (``lm_head``, ``classifier``, ``score``, ``qa_outputs``, ``head``,
``cls`` and their submodules), which is a task head to train in full. A module without a bias
that is targeted explicitly is an error. BitFit has no Hugging Face PEFT form.

**LayerNorm tuning** (peft's ``LN_TUNING``; Zhao et al., 2023, arXiv:2312.11420, "Tuning
LayerNorm in Attention") trains only the normalisation layers: each targeted norm gets a
trainable copy ``θ'`` of its parameters (weight, bias) and persistent buffers (running
statistics), initialised from the base ones, and computes ``norm(x; θ')``; the base ``θ`` is
frozen. Merging writes ``θ'`` into the base (the base values are kept aside) and unmerging
puts them back. Default targets: peft's table per model type, otherwise ``"all-norm"`` —
every module whose class is a torch norm or whose class name ends in ``Norm`` (``LayerNorm``,
``LlamaRMSNorm``, ``T5LayerNorm``, ``BatchNorm2d``, ``GroupNorm``...) and that has
parameters of its own. Files in peft's format hold the copies as
``<module>.ln_tuning_layers.<tensor>``. With several LN-tuning adapters active on one layer
the last one's copy is used (peft refuses several).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig
from ..core.layers import HF_CONV1D, LINEAR, layer_kind
from ..core.registry import register
from ..core.saved_modules import ModuleCopy
from ..core.targeting import as_list
from ..core.targets import NORMS, OUTPUT_HEADS
from ..formats.codec import HFCodec

ALL_BIAS_NAME = "all-bias"
ALL_NORM_NAME = "all-norm"
#: the output heads BitFit leaves alone by default (and their submodules)
HEAD_PATTERN = rf"re:(.*\.)?({'|'.join(OUTPUT_HEADS)})(\..*)?"


class _Selector(type):
    """A pattern type for ``target_modules``: ``isinstance(module, selector)`` asks the selector's rule."""

    def __instancecheck__(cls, module: Any) -> bool:
        return isinstance(module, nn.Module) and cls.rule(module)

    def __repr__(cls) -> str:
        return repr(cls.__name__)


def _own_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module._parameters.items() if p is not None}


def _has_nested_parameters(module: nn.Module) -> bool:
    return any(True for c in module.children() for _ in c.parameters())


def has_bias(module: nn.Module) -> bool:
    """True when ``module`` has its own ``bias`` parameter (not None)."""
    return isinstance(module._parameters.get("bias"), torch.Tensor)


_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with parameters of its own (and none in submodules)."""
    named = isinstance(module, _TORCH_NORMS) or re.search(r"norm$", type(module).__name__, re.IGNORECASE) is not None
    return named and bool(_own_parameters(module)) and not _has_nested_parameters(module)


ALL_BIAS = _Selector(ALL_BIAS_NAME, (), {"rule": staticmethod(has_bias)})
ALL_NORM = _Selector(ALL_NORM_NAME, (), {"rule": staticmethod(is_norm)})


def _with_selectors(patterns: Any) -> Any:
    """Turn the selector names (``"all-bias"``, ``"all-norm"``, as saved in JSON) back into selector patterns."""
    names = {ALL_BIAS_NAME: ALL_BIAS, ALL_NORM_NAME: ALL_NORM}
    if isinstance(patterns, str):
        return names.get(patterns, patterns)
    if isinstance(patterns, (list, tuple)):
        return [names.get(p, p) if isinstance(p, str) else p for p in patterns]
    return patterns


class _FallbackDefaults(dict):
    """Per-model-type defaults that fall back to one pattern list for every other model (or plain network)."""

    def __init__(self, table: dict[str, list[Any]], fallback: list[Any]) -> None:
        super().__init__(table)
        self.fallback = fallback

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(key, self.fallback)


# -- BitFit ------------------------------------------------------------------------------------
@register
@dataclass
class BitFit(AdapterConfig):
    """Train only biases: ``b + Δb`` with ``Δb`` initialised to 0.

    ``target_modules`` defaults to ``"all-bias"`` (every module with a bias, output head
    excluded: when ``"all-bias"`` is a target, the head pattern is added to ``exclude_modules``).
    """

    method = "bitfit"
    family = "selective"
    paper = "Ben Zaken et al. 2021 (arXiv:2106.10199)"
    formula = "f(x; W) + b + Δb; Δb"
    default_targets = _FallbackDefaults({}, [ALL_BIAS])

    def __post_init__(self) -> None:
        self.target_modules = _with_selectors(self.target_modules)
        targets = as_list(self.target_modules)
        if not targets or ALL_BIAS in targets:
            excludes = as_list(self.exclude_modules)
            if HEAD_PATTERN not in excludes:
                self.exclude_modules = [*excludes, HEAD_PATTERN]

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        if not has_bias(base):
            return (f"{type(base).__name__} has no bias parameter; BitFit trains existing biases only "
                    "(leave target_modules unset or use 'all-bias' to select the modules that have one)")
        return None

    def build(self, base: nn.Module, module_name: str) -> BitFitLayer:
        return BitFitLayer(self, base)


_CHANNEL_FIRST = (nn.GroupNorm, nn.modules.batchnorm._NormBase)
_CONVS = (nn.modules.conv._ConvNd,)


class BitFitLayer(AdapterModule):
    """``Δb`` (``bias_delta``, shaped like the base bias) added where the base adds its bias."""

    def __init__(self, config: BitFit, base: nn.Module) -> None:
        super().__init__(config, base)
        bias = base._parameters["bias"]
        self.bias_delta = nn.Parameter(torch.zeros(bias.shape))
        if layer_kind(base) in (LINEAR, HF_CONV1D) or isinstance(base, nn.LayerNorm):
            self.trailing = 0  # the bias lines up with the last axes of the output
        elif isinstance(base, _CONVS):
            self.trailing = len(base.kernel_size)  # channels come before the spatial axes
        elif isinstance(base, _CHANNEL_FIRST):
            self.trailing = -1  # (N, C, *): channels on axis 1
        else:
            self.trailing = None
        if self.trailing is None:  # unknown layer: run it with its bias replaced
            self.overrides_params = True
            self.adapts_output = False

    def _shaped(self, y: torch.Tensor) -> torch.Tensor:
        d = self.bias_delta
        trailing = self.trailing if self.trailing != -1 else max(y.dim() - 2, 0)
        return d.reshape(*d.shape, *([1] * trailing)) if trailing else d

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        return y + self._shaped(y).to(y.dtype)

    def override_params(self, params: dict[str, torch.Tensor], site: Any) -> dict[str, torch.Tensor]:
        b = params.get("bias", site.base.bias)
        return {**params, "bias": b + self.bias_delta.to(b.dtype)}

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        base.bias.data += self.bias_delta.to(base.bias.dtype)

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        base.bias.data -= self.bias_delta.to(base.bias.dtype)


# -- LayerNorm tuning --------------------------------------------------------------------------


@register
@dataclass
class LayerNormTuning(AdapterConfig):
    """Train a copy of each targeted normalisation layer's parameters (peft's LN tuning).

    ``target_modules`` defaults to peft's per-model-type list, else ``"all-norm"``.
    """

    method = "ln_tuning"
    family = "selective"
    paper = "Zhao et al. 2023 (arXiv:2312.11420); peft LN_TUNING"
    formula = "norm(x; θ′), θ′ a copy of the norm's parameters; θ′"
    default_targets = _FallbackDefaults(NORMS, [ALL_NORM])

    def __post_init__(self) -> None:
        self.target_modules = _with_selectors(self.target_modules)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        if _has_nested_parameters(base):
            return (f"{type(base).__name__} has parameters in submodules; LayerNormTuning adapts layers whose "
                    "parameters are their own (target the norm layers themselves)")
        if not _own_parameters(base):
            return f"{type(base).__name__} has no parameters of its own to tune"
        return None

    def build(self, base: nn.Module, module_name: str) -> LNTuningLayer:
        return LNTuningLayer(self, base)


class LNTuningLayer(ModuleCopy):
    """Trainable copies of a norm layer's own parameters and persistent buffers, used in place of the base ones
    (the engine's :class:`~peftkit.core.saved_modules.ModuleCopy`, which ``modules_to_save`` uses too)."""

    def __init__(self, config: LayerNormTuning, base: nn.Module) -> None:
        super().__init__(config, base, recurse=False)

    def extra_repr(self) -> str:
        return f"method=ln_tuning, tensors={self.param_names + self.buffer_names}"


# -- Hugging Face PEFT format (LN tuning) --------------------------------------------------------
_LN_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _ln_from_hf(d: dict[str, Any]) -> LayerNormTuning:
    def conv(v: Any) -> Any:
        return "re:" + v if isinstance(v, str) else (list(v) if v is not None else None)

    return LayerNormTuning(target_modules=conv(d.get("target_modules")), exclude_modules=conv(d.get("exclude_modules")))


LayerNormTuning.hf_codec = HFCodec(
    peft_type="LN_TUNING",
    config_to_hf=lambda c, targets: {},
    config_from_hf=_ln_from_hf,
    read_names={f"ln_tuning_layers.{n}": n for n in _LN_NAMES},
)
