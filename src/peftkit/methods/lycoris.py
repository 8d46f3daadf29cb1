"""What LoHa and LoKr share (the LyCORIS family, peft's ``LycorisTuner``): dropouts, conv calls, peft options.

Both methods make ``ΔW`` from small trained factors and add ``ΔW x`` to the frozen layer's
output. Two regularisers act in training only (peft 0.21.2 semantics):

* ``rank_dropout = p``: each output row of ``ΔW`` is kept with probability ``1 − p``
  (``ΔW ← diag(m) ΔW``, ``m_i ~ Bernoulli(1 − p)``), and the mask is divided by its mean
  (LoHa always, LoKr when ``rank_dropout_scale``);
* ``module_dropout = p``: the whole adapter is skipped for a step with probability ``p``.

The layers are ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (peft's set); a convolution uses
``ΔW`` reshaped to the kernel, with the base layer's stride, padding, dilation and groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import LowRankOptions, probability
from ..core.errors import ConfigError
from ..core.layers import CONV1D, CONV2D, LINEAR, layer_kind
from ..core.targets import ATTENTION_QV


@dataclass
class LycorisOptions(LowRankOptions):
    """Options LoHa and LoKr share: the low-rank ones, ``rank_dropout`` (rows of ``ΔW``), ``module_dropout``
    (the whole adapter, in training) and ``use_effective_conv2d`` (the CP form of convolution kernels)."""

    supported_layers = (LINEAR, CONV1D, CONV2D)
    default_targets = ATTENTION_QV  # peft copies LoRA's mapping for LoHa and LoKr

    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False

    def validate(self) -> None:
        super().validate()
        check_dropouts(type(self).__name__, self.rank_dropout, self.module_dropout)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        return super().check_layer(base, module_name) or check_conv(self.method, base)


def check_dropouts(owner: str, rank_dropout: Any, module_dropout: Any) -> None:
    probability(owner, "rank_dropout", rank_dropout)
    probability(owner, "module_dropout", module_dropout)


def check_conv(method: str, base: nn.Module) -> str | None:
    if layer_kind(base) in (CONV1D, CONV2D) and base.padding_mode != "zeros":
        return f"padding_mode={base.padding_mode!r} is not supported by {method}"
    return None


def skip_module(module: nn.Module, module_dropout: float) -> bool:
    """True when module dropout drops the whole adapter for this call (training only)."""
    return module.training and module_dropout > 0 and bool(torch.rand(1) <= module_dropout)


def rank_mask(n_out: int, p: float, scale: bool, like: torch.Tensor) -> torch.Tensor:
    """The rank-dropout mask over output rows (divided by its mean when ``scale``), shape ``(n_out,)``."""
    keep = (torch.rand(n_out) > p).to(device=like.device, dtype=like.dtype)
    if scale:
        keep = keep / keep.mean().clamp_min(1e-12)  # every row dropped: zeros (peft divides 0 by 0)
    return keep


def conv_delta(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``ΔW * x`` with the base convolution's geometry (``weight`` laid out like ``base.weight``)."""
    conv = F.conv2d if layer_kind(base) == CONV2D else F.conv1d
    return conv(x, weight, None, base.stride, base.padding, base.dilation, base.groups)


#: the peft LoHaConfig/LoKrConfig keys the readers use (any other key with a value that is not
#: switched off is refused at load by the codec)
LYCORIS_HF_OPTIONS = frozenset({"r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d",
                                "rank_pattern", "alpha_pattern", "init_weights"})


def lycoris_options_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """The options LoHa and LoKr share, from a peft config dict (``init_weights`` only says how peft
    initialised the factors, which the file overrides)."""
    return {
        "r": d.get("r", 8),
        "alpha": d.get("alpha", 8),
        "rank_dropout": d.get("rank_dropout") or 0.0,
        "module_dropout": d.get("module_dropout") or 0.0,
        "use_effective_conv2d": d.get("use_effective_conv2d", False),
        "rank_pattern": d.get("rank_pattern") or {},
        "alpha_pattern": d.get("alpha_pattern") or {},
        "target_modules": d.get("target_modules"),
        "exclude_modules": d.get("exclude_modules"),
    }


def lycoris_options_to_hf(config: Any, owner: str) -> dict[str, Any]:
    if config.use_rslora:
        raise ConfigError(f"{owner}: peft's {owner} has no rsLoRA scale (alpha/√r); this adapter cannot be written "
                          "in the Hugging Face PEFT format (save it in peftkit's format)")
    return {
        "r": config.r,
        "alpha": config.alpha,
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "use_effective_conv2d": config.use_effective_conv2d,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
    }
