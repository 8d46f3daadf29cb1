"""SSF: scaling and shifting your features (Lian et al., 2022, arXiv:2210.08823).

After each targeted operation ``y = f(x)`` SSF applies a per-channel affine map

    y ← γ ⊙ y + β,        γ, β ∈ R^{C}   (C = output features / channels)

with ``γ = 1`` and ``β = 0`` at init, so the model starts unchanged. Only ``γ`` (``ssf_scale``) and
``β`` (``ssf_shift``) train; every weight of the model is frozen. For a convolution the channel is
dimension 1 of the output; otherwise the last dimension.

Because the map is affine and follows a linear operation, it folds into that operation (the
paper's re-parameterisation): for ``y = W x + b``,

    W′ = diag(γ) W,       b′ = γ ⊙ b + β,

and for a LayerNorm ``y = w ⊙ n(x) + b`` likewise ``w′ = γ ⊙ w``, ``b′ = γ ⊙ b + β``. A layer without a
bias (Llama's projections) gets one when merged (``b′ = β``); unmerging removes it again, restoring
the module exactly as it was (``W = diag(1/γ) W′``, ``b = (b′ − β)/γ``).

Layers: ``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv1d``/``nn.Conv2d`` and ``nn.LayerNorm``.
Default targets: every linear layer but the output head (``"all-linear"``, for the model families of
:data:`peftkit.core.targets.ALL_LINEAR`). No Hugging Face PEFT form
(peft has no SSF; its closest relative, IA3, has no shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig
from ..core.layers import CONV1D, CONV2D, HF_CONV1D, LINEAR, as_matrix, from_matrix, layer_info, layer_kind
from ..core.registry import register
from ..core.targets import ALL_LINEAR

LAYER_NORM = "layer_norm"


def _kind(base: nn.Module) -> str:
    return LAYER_NORM if isinstance(base, nn.LayerNorm) else layer_kind(base)


@register
@dataclass
class SSF(AdapterConfig):
    """Per-channel scale and shift ``γ ⊙ y + β`` of each targeted layer's output (``γ = 1``, ``β = 0`` at init)."""

    method = "ssf"
    family = "scaling"
    paper = "Lian et al. 2022 (arXiv:2210.08823)"
    formula = "γ ⊙ f(x) + β per output channel; γ, β"
    supported_layers = (LINEAR, HF_CONV1D, CONV1D, CONV2D, LAYER_NORM)  # LayerNorm: recognised in check_layer
    default_targets = ALL_LINEAR  # every linear layer but the head

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        kind = _kind(base)
        if kind not in (LINEAR, HF_CONV1D, CONV1D, CONV2D, LAYER_NORM):
            return (f"ssf scales and shifts the output of Linear, Conv1D, Conv1d/Conv2d and LayerNorm layers, "
                    f"not {type(base).__name__}")
        if kind == LAYER_NORM and (not base.elementwise_affine or len(base.normalized_shape) != 1):
            return "ssf needs a LayerNorm with elementwise_affine=True over one dimension (it folds into its weight)"
        if kind in (CONV1D, CONV2D) and base.padding_mode != "zeros":
            return f"ssf supports convolutions with padding_mode='zeros' only, not {base.padding_mode!r}"
        return None

    def build(self, base: nn.Module, module_name: str) -> SSFLayer:
        return SSFLayer(self, base)


class SSFLayer(AdapterModule):
    """``ssf_scale`` (γ, ones) and ``ssf_shift`` (β, zeros) of one layer's ``C`` output channels."""

    def __init__(self, config: SSF, base: nn.Module) -> None:
        super().__init__(config, base)
        self.kind = _kind(base)
        channels = base.normalized_shape[0] if self.kind == LAYER_NORM else layer_info(base).out_features
        self.ssf_scale = nn.Parameter(torch.ones(channels))
        self.ssf_shift = nn.Parameter(torch.zeros(channels))
        self.channel_dim = 1 if self.kind in (CONV1D, CONV2D) else -1
        self.__dict__["_made_bias"] = False  # whether merging created the base's bias

    def _shaped(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.to(y.dtype)
        if self.channel_dim == 1:
            return t.reshape(1, -1, *([1] * (y.dim() - 2)))
        return t

    def adapt_output(self, x: torch.Tensor, y: Any, base_out: Any, site: Any) -> Any:
        return y * self._shaped(self.ssf_scale, y) + self._shaped(self.ssf_shift, y)

    # -- merging: W′ = diag(γ) W, b′ = γ ⊙ b + β -------------------------------------------------
    def _scale_rows(self, base: nn.Module, factor: torch.Tensor) -> None:
        w = base.weight
        if self.kind == LAYER_NORM:
            w.data.copy_((w.double() * factor).to(w.dtype))
            return
        m = as_matrix(base, w.detach()).double()
        w.data.copy_(from_matrix(base, m * factor[:, None]).to(w.dtype))

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        g, s = self.ssf_scale.detach().double(), self.ssf_shift.detach().double()
        self._scale_rows(base, g)
        if base.bias is None:
            ref = base.weight
            base.bias = nn.Parameter(s.to(device=ref.device, dtype=ref.dtype), requires_grad=False)
            self.__dict__["_made_bias"] = True
            return
        b = base.bias
        b.data.copy_((b.double() * g + s).to(b.dtype))

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        g, s = self.ssf_scale.detach().double(), self.ssf_shift.detach().double()
        self._scale_rows(base, 1.0 / g)
        if self._made_bias:
            del base.bias
            base.register_parameter("bias", None)
            self.__dict__["_made_bias"] = False
            return
        b = base.bias
        b.data.copy_(((b.double() - s) / g).to(b.dtype))

    def extra_repr(self) -> str:
        return f"method=ssf, channels={self.ssf_scale.numel()}"
