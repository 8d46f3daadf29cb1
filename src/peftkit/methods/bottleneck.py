"""Bottleneck adapters: serial (Houlsby, Pfeiffer) and parallel (He et al.) placements.

An adapter is a two-layer bottleneck ``A(v) = W_up f(W_down v + b_down) + b_up`` with
``W_down ∈ R^{h×d_in}``, ``W_up ∈ R^{d_out×h}``, a non-linearity ``f`` (relu, gelu, silu or
tanh) and dropout on the hidden activation. It wraps a targeted module ``M`` (its input ``x``,
its output ``y = M(x)``):

* serial (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer et al., 2020, arXiv:2005.00247)::

      y ← y + s · A(y)                  (d_in = d_out = width of y; s = ``scaling``, 1 in the papers)

  applied to a sub-layer's output before the residual add. ``placement="houlsby"`` puts one
  after the attention output projection and one after the feed-forward block;
  ``placement="pfeiffer"`` only after the feed-forward block.
* parallel (He et al., 2022, arXiv:2110.04366)::

      y ← y + s · A(x)                  (d_in = width of x, d_out = width of y)

  the adapter reads the sub-layer's *input* and adds to its output; He et al.'s "scaled
  parallel adapter" uses ``s = 4`` on the feed-forward block.

``W_up`` and ``b_up`` start at zero, so the model is unchanged at step 0; ``W_down`` has
``nn.Linear``'s default (Kaiming-uniform) initialisation and ``b_down = 0``. The adapters are
trained; the whole base model is frozen. The adapter cannot be merged (``f`` is non-linear).

Widths. A linear-like target (``nn.Linear``, transformers' ``Conv1D``) gives ``d_in``/``d_out``
from its features. Any other module (a whole block such as ``LlamaMLP``) takes ``d_in`` from
the ``in_features`` of its first linear-like submodule and ``d_out`` from the ``out_features``
of its last one (registration order); a block without a linear-like submodule is refused with
a :class:`~peftkit.TargetError`. The hidden size is ``bottleneck_size`` when given, otherwise
``min(d_in, d_out) // reduction_factor`` (``reduction_factor`` defaults to 16; for the usual
targets ``d_in = d_out`` = the model width, i.e. ``out_features // reduction_factor``).

Default targets (when ``target_modules`` is None) depend on ``placement`` and
``config.model_type``: Llama-like ``self_attn.o_proj`` + ``mlp.down_proj`` (houlsby),
``mlp.down_proj`` (pfeiffer), ``mlp`` (parallel); GPT-2 ``attn.c_proj`` + ``mlp.c_proj``,
``mlp.c_proj``, ``mlp``; BERT-like ``attention.output.dense`` + ``layer.N.output.dense``,
``layer.N.output.dense``, ``intermediate.dense``. BERT computes its feed-forward block in a
method (``BertLayer.feed_forward_chunk``), not a module, so no module both reads the FFN input
and returns the FFN output; the parallel default there is ``intermediate.dense``: the adapter
reads the FFN input (as in He et al.) and adds to the up-projection's output, i.e. it runs in
parallel with the FFN's first linear layer (whose output then goes through the activation and
``output.dense``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, one_of, positive_int, probability
from ..core.errors import ConfigError
from ..core.layers import HF_CONV1D, LINEAR, OTHER, is_linear_like, layer_info, layer_kind
from ..core.registry import register
from ..core.targets import BOTTLENECK_DEFAULT_TARGETS, PLACEMENTS

NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
DEFAULT_REDUCTION_FACTOR = 16



class _TargetsForPlacement:
    """``default_targets`` that follows the instance's ``placement`` (the houlsby table on the class)."""

    def __get__(self, obj: Any, owner: type) -> dict[str, list[str]]:
        if obj is None:
            return BOTTLENECK_DEFAULT_TARGETS["houlsby"]
        return BOTTLENECK_DEFAULT_TARGETS.get(obj.placement, {})


@register
@dataclass
class Bottleneck(AdapterConfig):
    """Bottleneck adapter ``y + s · W_up f(W_down v)`` with ``v = y`` (serial) or ``v = x`` (parallel).

    Give either ``reduction_factor`` (hidden = ``min(d_in, d_out) // reduction_factor``, default 16)
    or ``bottleneck_size`` (the hidden size itself), not both.
    """

    method = "bottleneck"
    family = "adapter"
    paper = "Houlsby et al. 2019 (arXiv:1902.00751); Pfeiffer et al. 2020 (arXiv:2005.00247); He et al. 2022 (arXiv:2110.04366)"
    formula = "y + s·W_up f(W_down v), v = y (serial) or x (parallel); W_down, W_up"
    mergeable = False
    default_targets = _TargetsForPlacement()  # type: ignore[assignment]

    reduction_factor: float | None = None
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    placement: str = "houlsby"
    scaling: float = 1.0
    dropout: float = 0.0

    def validate(self) -> None:
        owner = type(self).__name__
        one_of(owner, "placement", self.placement, PLACEMENTS)
        one_of(owner, "non_linearity", self.non_linearity, NON_LINEARITIES)
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ConfigError(f"{owner}: give reduction_factor or bottleneck_size, not both "
                              f"(got reduction_factor={self.reduction_factor!r}, bottleneck_size={self.bottleneck_size!r})")
        if self.bottleneck_size is not None:
            positive_int(owner, "bottleneck_size", self.bottleneck_size)
        rf = self.reduction_factor
        if rf is not None and (not isinstance(rf, (int, float)) or isinstance(rf, bool) or not rf > 0):
            raise ConfigError(f"{owner}: reduction_factor must be a positive number, got {rf!r}")
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise ConfigError(f"{owner}: scaling must be a number, got {self.scaling!r}")
        probability(owner, "dropout", self.dropout)

    @property
    def parallel(self) -> bool:
        return self.placement == "parallel"

    def widths(self, base: nn.Module) -> tuple[int, int] | str:
        """``(d_in, d_out)`` of the adapter on ``base``, or the reason they cannot be determined."""
        if layer_kind(base) in (LINEAR, HF_CONV1D):
            info = layer_info(base)
            return (info.in_features if self.parallel else info.out_features), info.out_features
        if layer_kind(base) != OTHER:
            return f"bottleneck adapters need a linear layer or a block of them, not {type(base).__name__}"
        linears = [m for m in base.modules() if is_linear_like(m)]
        if not linears:
            return (f"cannot tell the input/output width of {type(base).__name__}: it has no Linear/Conv1D "
                    "submodule; target a linear layer or a block that contains one")
        d_out = layer_info(linears[-1]).out_features
        return (layer_info(linears[0]).in_features if self.parallel else d_out), d_out

    def hidden_for(self, d_in: int, d_out: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        rf = DEFAULT_REDUCTION_FACTOR if self.reduction_factor is None else self.reduction_factor
        return int(min(d_in, d_out) // rf)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        widths = self.widths(base)
        if isinstance(widths, str):
            return widths
        if self.hidden_for(*widths) < 1:
            rf = DEFAULT_REDUCTION_FACTOR if self.reduction_factor is None else self.reduction_factor
            return (f"reduction_factor {rf} leaves no hidden unit for width {min(widths)}; "
                    "use a smaller reduction_factor or give bottleneck_size")
        return None

    def build(self, base: nn.Module, module_name: str) -> BottleneckLayer:
        return BottleneckLayer(self, base)


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckLayer(AdapterModule):
    """One adapter: ``adapter_down`` (``d_in → h``), ``f``, dropout, ``adapter_up`` (``h → d_out``, zero-initialised)."""

    mergeable = False
    supports_mixed_batch = True

    def __init__(self, config: Bottleneck, base: nn.Module) -> None:
        super().__init__(config, base)
        widths = config.widths(base)
        assert not isinstance(widths, str), widths  # check_layer refused such layers
        d_in, d_out = widths
        self.parallel = config.parallel
        self.scaling = float(config.scaling)
        self.hidden = config.hidden_for(d_in, d_out)
        self.adapter_down = nn.Linear(d_in, self.hidden)
        self.act = _ACTIVATIONS[config.non_linearity]()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.adapter_up = nn.Linear(self.hidden, d_out)
        with torch.no_grad():
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    @property
    def unmergeable_reason(self) -> str:  # type: ignore[override]
        return (f"a bottleneck adapter applies the non-linearity {self.config.non_linearity!r} between its "
                "projections, so it has no weight form to fold into the base layer")

    def on_attach(self, model: nn.Module, site: Any) -> None:
        # a new module starts in training mode; follow the model's mode so that dropout is off on an eval() model
        self.train(model.training)

    def delta(self, v: torch.Tensor) -> torch.Tensor:
        """``s · W_up dropout(f(W_down v))`` in the adapter's dtype."""
        w = self.adapter_down.weight
        if v.dtype != w.dtype:
            v = v.to(w.dtype)
        out = self.adapter_up(self.dropout(self.act(self.adapter_down(v))))
        return out * self.scaling if self.scaling != 1.0 else out

    def adapt_output(self, x: torch.Tensor, y: Any, base_out: Any, site: Any) -> Any:
        if isinstance(y, tuple):  # blocks that return (hidden, extras...): adapt the hidden states
            return (self.adapt_output(x, y[0], base_out, site), *y[1:])
        v = x if self.parallel else y
        return y + self.delta(v).to(y.dtype)

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "serial"
        return f"method=bottleneck, {kind}, hidden={self.hidden}, scaling={self.scaling}"
