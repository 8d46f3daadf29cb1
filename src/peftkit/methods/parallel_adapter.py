"""MAM adapter: prefix tuning on attention + a scaled parallel adapter on the feed-forward block
(He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", arXiv:2110.04366).

He et al. show that prefix tuning is a gated parallel adapter on attention: with ``n`` prefix keys
``P_K`` and values ``P_V``, each query ``q`` computes

    Attn(q, [P_K; K], [P_V; V]) = (1 − λ(q)) · Attn(q, K, V) + λ(q) · Attn(q, P_K, P_V),
    λ(q) = Σ_i e^{q·P_K,i} / (Σ_i e^{q·P_K,i} + Σ_j e^{q·k_j})

(per head, scores scaled by 1/√d_h). Their best design, "mix-and-match" (MAM), spends a small budget
on attention through prefix tuning and a larger one on the feed-forward block through a *scaled
parallel adapter* that reads the block's input ``x`` and adds to its output:

    FFN(x) ← FFN(x) + s · W_up f(W_down x),      s = 4 (He et al.), ``W_up = 0`` at init.

Trained: the prefixes (:mod:`peftkit.methods.prefix`, ``L·2·n·d_kv`` numbers, or their MLP) and the
adapters' ``W_down``, ``b_down``, ``W_up``, ``b_up``; the model is frozen. This config reuses both
pieces unchanged — the prefix encoder (:class:`~peftkit.methods.prefix.PrefixEncoder`) on the input
embedding, the bottleneck module (:class:`~peftkit.methods.bottleneck.BottleneckLayer`, parallel
placement) on every feed-forward block — as one adapter, saved, loaded, activated and deleted
together. Not mergeable (the adapter is non-linear, the prefix has no weight form) and, like prefix
tuning, no mixed batches (the attention length changes). No Hugging Face PEFT form (peft has no MAM).

Targets: the input embedding plus the feed-forward blocks (``embed_tokens`` + ``mlp`` for Llama-like
models, ``wte`` + ``mlp`` for GPT-2, ``word_embeddings`` + ``intermediate.dense`` for BERT, whose
feed-forward block is not one module; see :mod:`peftkit.methods.bottleneck`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..core.layers import EMBEDDING, layer_kind
from ..core.registry import register
from ..core.targets import BOTTLENECK_DEFAULT_TARGETS
from ..formats.codec import HFCodec
from .bottleneck import Bottleneck, BottleneckLayer
from .prefix import PrefixEncoder, PrefixTuning
from .prompt import DEFAULT_TARGETS as INPUT_EMBEDDING  # with the generic fallback for other families


class _MAMTargets(dict):
    """``model_type → [input embedding, feed-forward blocks]`` (None where the family is unknown)."""

    def get(self, key: Any, default: Any = None) -> Any:
        ffn = BOTTLENECK_DEFAULT_TARGETS["parallel"].get(key)
        return None if ffn is None else [*INPUT_EMBEDDING.get(key), *ffn]


def _kind(module: nn.Module) -> str:
    """The layer kind of a module, looking through the site that wraps it when another adapter is attached."""
    from ..core.site import AdapterSite

    return layer_kind(module.base if isinstance(module, AdapterSite) else module)


@register
@dataclass
class MAM(PrefixTuning):
    """Mix-and-match adapter: ``num_virtual_tokens`` prefixes in every attention layer + a parallel adapter
    ``s · W_up f(W_down x)`` (``scaling`` s = 4) on every feed-forward block.

    Prefix options as :class:`PrefixTuning`; adapter options as :class:`Bottleneck` (``bottleneck_size`` or
    ``reduction_factor``, ``non_linearity``, ``scaling``, ``dropout``).
    """

    method: ClassVar[str] = "mam"
    family: ClassVar[str] = "adapter"
    paper: ClassVar[str] = "He et al. 2022 (arXiv:2110.04366)"
    formula: ClassVar[str] = ("prefix P in attention + FFN(x) + s·W_up f(W_down x); P, W_down, W_up")
    #: for the method table: the prefix sits on the input embedding, the adapters on feed-forward blocks
    supported_layers: ClassVar[tuple[str, ...] | None] = ("embedding", "feed-forward block or linear")
    default_targets: ClassVar[dict[str, list[str]]] = _MAMTargets()
    hf_codec: ClassVar[HFCodec | None] = None  # peft has no MAM (PrefixTuning's codec is not inherited)

    num_virtual_tokens: int = 30
    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    non_linearity: str = "relu"
    scaling: float = 4.0
    dropout: float = 0.0

    # the attributes BottleneckLayer reads (the same names as Bottleneck's)
    placement: ClassVar[str] = "parallel"
    parallel: ClassVar[bool] = True

    def adapter(self) -> Bottleneck:
        """The feed-forward part as a :class:`Bottleneck` config (parallel placement)."""
        return Bottleneck(reduction_factor=self.reduction_factor, bottleneck_size=self.bottleneck_size,
                          non_linearity=self.non_linearity, placement="parallel", scaling=self.scaling,
                          dropout=self.dropout)

    def validate(self) -> None:
        super().validate()
        self.adapter().validate()

    def widths(self, base: nn.Module) -> tuple[int, int] | str:
        return self.adapter().widths(base)

    def hidden_for(self, d_in: int, d_out: int) -> int:
        return self.adapter().hidden_for(d_in, d_out)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        if layer_kind(base) == EMBEDDING:
            return super().check_layer(base, module_name)
        return self.adapter().check_layer(base, module_name)

    def check_model(self, model: nn.Module, module_names: list[str]) -> str | None:
        embeddings = [n for n in module_names if _kind(model.get_submodule(n)) == EMBEDDING]
        if len(embeddings) == len(module_names):
            return "MAM needs feed-forward targets for its parallel adapters besides the input embedding"
        if len(embeddings) != 1:
            return (f"MAM keeps its prefixes on the model's input embedding: exactly one target must be it, "
                    f"got {len(embeddings)} embeddings ({', '.join(embeddings) or 'none'})")
        return super().check_model(model, embeddings)

    def build(self, base: nn.Module, module_name: str) -> PrefixEncoder | BottleneckLayer:
        if layer_kind(base) == EMBEDDING:
            return super().build(base, module_name)
        return BottleneckLayer(self, base)  # type: ignore[arg-type]  # MAM has Bottleneck's attributes
