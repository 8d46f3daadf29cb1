"""Prefix tuning (Li and Liang, 2021, arXiv:2101.00190), with peft 0.21.2's conventions.

Every attention layer ``ℓ`` of a frozen transformer gets ``n`` trained key and value vectors per
(key/value) head, prepended to the keys and values that layer computes from the input:

    Attn_ℓ(x) = softmax(q [P_K^ℓ; K(x)]ᵀ / √d_h) [P_V^ℓ; V(x)]

so every token can attend to ``n`` virtual positions whose keys and values are free parameters
(the inputs and outputs keep their length). Trained: the prefix ``P ∈ R^{n × L·2·d_kv}``
(``L`` layers, keys and values, ``d_kv`` = key/value heads × head size), i.e. ``L·2·n·d_kv``
numbers; the whole model is frozen. With ``prefix_projection`` (Li and Liang's reparametrisation)
``P`` is produced by an MLP, ``P = W_2 tanh(W_1 E + b_1) + b_2`` from ``n`` trained embeddings ``E``
of size ``d_kv`` (hidden size ``encoder_hidden_size``, default ``d_kv``); ``E``, ``W_1``, ``b_1``,
``W_2``, ``b_2`` train. Nothing can be merged, and rows of other adapters cannot share a batch
(the attention length changes).

How it is wired (peft's ``PeftModel`` forward for prefix tuning, without a wrapper object): the
prefix is exactly a key/value cache of length ``n`` that the model extends with the real tokens,
so the adapter hands the model that cache. The adapter module lives on the model's input
embedding (one module per adapter, like prompt tuning: the prefixes of all layers come from one
tensor or one MLP) and ``on_attach`` registers a forward pre-hook on the model that, while the
adapter runs:

* on the first step (no cache, or an empty one) passes a cache holding ``P`` reshaped to
  ``(L, 2, batch, heads_kv, n, d_h)`` (an empty cache passed in, as ``generate`` does, is filled in
  place) and shifts a given ``cache_position`` by ``n``;
* on every step prepends ``n`` ones to a 2-D ``attention_mask`` and shifts given ``position_ids``
  by ``n``. Models that derive positions from the cache length (Llama's rotary positions, BERT's
  position embeddings) count the ``n`` virtual positions, as in peft.

So ``generate`` works with its KV cache: the prefix enters at the first step and later steps only
extend the mask. Grouped-query attention stores ``heads_kv`` < ``heads``; the prefix has the key/value
head count (peft's rule). The model's forward must accept ``cache`` (transformers ≥ 5) or
``past_key_values``. Initialisation: ``P ~ N(0, 1)`` (peft's ``nn.Embedding``), ``E ~ N(0, 1)`` and
``nn.Linear`` defaults with the projection; ``init_weights="zero"`` zeros ``P`` (or ``W_2``, ``b_2``).

The Hugging Face PEFT file holds the flattened prefix ``prompt_embeddings`` ``(n, L·2·d_kv)``; with
``prefix_projection`` peft saves the MLP's output, so such files load as a plain prefix (as peft
loads them for inference).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig, positive_int
from ..core.errors import ConfigError, PeftkitError
from ..core.layers import EMBEDDING, layer_kind
from ..core.registry import register
from ..formats.codec import HFCodec
from .model_hook import ModelHookAdapter
from .prompt import _NOT_INPUT, DEFAULT_TARGETS, _cache_length, _check_targets, infer_task_type

INITS = (None, "zero")


@register
@dataclass
class PrefixTuning(AdapterConfig):
    """``num_virtual_tokens`` trained key/value prefixes in every attention layer (peft's ``PrefixTuningConfig``).

    ``prefix_projection=True`` produces them with a two-layer tanh MLP of width ``encoder_hidden_size``
    (default: the key/value width). ``target_modules`` defaults to the model's input embedding, which
    holds the adapter's parameters.
    """

    method: ClassVar[str] = "prefix_tuning"
    family: ClassVar[str] = "prompt"
    paper: ClassVar[str] = "Li & Liang 2021 (arXiv:2101.00190)"
    formula: ClassVar[str] = "Attn(q, [P_K; K], [P_V; V]) in every layer; P (or its MLP)"
    mergeable: ClassVar[bool] = False
    supported_layers: ClassVar[tuple[str, ...] | None] = (EMBEDDING,)
    default_targets: ClassVar[dict[str, list[str]]] = DEFAULT_TARGETS

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None

    def validate(self) -> None:
        owner = type(self).__name__
        positive_int(owner, "num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"{owner}: prefix_projection must be True or False, got {self.prefix_projection!r}")
        if self.encoder_hidden_size is not None:
            positive_int(owner, "encoder_hidden_size", self.encoder_hidden_size)
        if self.init_weights not in INITS:
            raise ConfigError(f"{owner}: init_weights must be None (random, as peft) or 'zero', got {self.init_weights!r}")

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        if layer_kind(base) != EMBEDDING:
            return (f"prefix tuning keeps its prefixes on the model's input embedding (model.get_input_embeddings()), "
                    f"not on a {type(base).__name__}")
        if module_name.rsplit(".", 1)[-1] in _NOT_INPUT:
            return "this is a position/token-type embedding, not the input embedding (model.get_input_embeddings())"
        return None

    def check_model(self, model: nn.Module, module_names: list[str]) -> str | None:
        reason = _check_targets(model, [model.get_submodule(n) for n in module_names])
        if reason:
            return reason.replace("prompt tuning", "prefix tuning")
        if cache_keyword(model) is None:
            return (f"{type(model).__name__}.forward accepts no key/value cache ('cache' or 'past_key_values'), "
                    "which prefix tuning passes the prefixes through")
        facts = kv_facts(model)
        if facts is None:
            return f"cannot read the number of layers and attention heads from {type(model).__name__}.config"
        return None

    def resolve(self, model: nn.Module, module_names: list[str]) -> PrefixTuning:
        out = copy.copy(self)
        out.__dict__.update(kv_facts(model) or {})  # num_layers, num_kv_heads, head_dim: from the model, not saved
        out.__dict__["task_type"] = infer_task_type(model)  # for the Hugging Face export
        return out

    def build(self, base: nn.Module, module_name: str) -> PrefixEncoder:
        if getattr(self, "num_layers", None) is None:
            raise ConfigError("PrefixTuning needs the model (its layers and heads): attach it with peftkit.attach")
        return PrefixEncoder(self, base)

    @property
    def kv_width(self) -> int:
        """``d_kv`` = key/value heads × head size (known once resolved against a model)."""
        return int(self.num_kv_heads * self.head_dim)  # type: ignore[attr-defined]


def kv_facts(model: nn.Module) -> dict[str, int] | None:
    """``num_layers``, ``num_kv_heads``, ``head_dim`` of the model's attention (peft's rule for grouped-query attention)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def first(*names: str) -> Any:
        return next((getattr(text, n) for n in names if getattr(text, n, None) is not None), None)

    layers = first("num_hidden_layers", "num_layers", "n_layer")
    heads = first("num_attention_heads", "n_head", "num_heads")
    hidden = first("hidden_size", "n_embd", "d_model")
    if not (layers and heads and hidden):
        return None
    head_dim = first("head_dim") or hidden // heads
    kv_heads = first("num_key_value_heads") or heads
    return {"num_layers": int(layers), "num_kv_heads": int(kv_heads), "head_dim": int(head_dim)}


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword the model's forward takes its key/value cache by (``cache`` in transformers ≥ 5)."""
    seen: list[inspect.Parameter] = []
    for m in (model, getattr(model, "base_model", None)):
        if m is None:
            continue
        try:
            params = inspect.signature(m.forward).parameters
        except (TypeError, ValueError):
            continue
        for key in ("cache", "past_key_values"):
            if key in params:
                return key
        seen.extend(params.values())
    return None


class PrefixEncoder(ModelHookAdapter):
    """The prefix ``prefix`` ``(n, L·2·d_kv)`` — or ``embedding`` ``(n, d_kv)`` + ``transform`` MLP — and the model hook."""

    unmergeable_reason = "prefix tuning adds attention keys and values; there is no weight to fold them into"
    label = "prefix tuning"

    def __init__(self, config: PrefixTuning, base: nn.Module) -> None:
        super().__init__(config, base)
        n, d = config.num_virtual_tokens, config.kv_width
        self.num_virtual_tokens = n
        self.num_layers = config.num_layers  # type: ignore[attr-defined]
        self.num_kv_heads = config.num_kv_heads  # type: ignore[attr-defined]
        self.head_dim = config.head_dim  # type: ignore[attr-defined]
        width = self.num_layers * 2 * d
        zero = config.init_weights == "zero"
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or d
            self.embedding = nn.Parameter(torch.randn(n, d))
            self.transform = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if zero:
                nn.init.zeros_(self.transform[2].weight)
                nn.init.zeros_(self.transform[2].bias)
        else:
            self.prefix = nn.Parameter(torch.zeros(n, width) if zero else torch.randn(n, width))
        self.__dict__["_cache_key"] = None

    def flat(self) -> torch.Tensor:
        """``P`` ``(n, L·2·d_kv)``: the parameter itself, or the MLP's output."""
        if self.config.prefix_projection:
            return self.transform(self.embedding)
        return self.prefix

    def key_values(self, batch: int, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the prefix keys and values ``(batch, heads_kv, n, d_h)`` (peft's layout of ``P``)."""
        n, h, dh = self.num_virtual_tokens, self.num_kv_heads, self.head_dim
        p = self.flat().to(device=device, dtype=dtype).reshape(n, self.num_layers * 2, h, dh)
        p = p.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, batch, h, n, dh)
        return [(p[2 * i], p[2 * i + 1]) for i in range(self.num_layers)]

    # -- model hook ------------------------------------------------------------------------
    def on_attach(self, model: nn.Module, site: Any) -> None:
        self.__dict__["_cache_key"] = cache_keyword(model)
        super().on_attach(model, site)

    def rewrite(self, model: nn.Module, kwargs: dict) -> tuple[tuple, dict] | None:
        site = self._site
        stacked = [n for n in site.running() if isinstance(site.adapters[n], PrefixEncoder)]
        if len(stacked) > 1:
            raise PeftkitError(f"prefix tuning adapters {stacked} are active together; activate one of them "
                               "(their prefixes would need one cache)")
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else ids
        if ref is None:
            return None
        n, batch = self.num_virtual_tokens, ref.shape[0]
        key = self._cache_key
        other = "past_key_values" if key == "cache" else "cache"
        cache = kwargs.get(key)
        if cache is None and kwargs.get(other) is not None:
            cache = kwargs.pop(other)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise PeftkitError("prefix tuning needs a 2-D attention_mask (batch, sequence); "
                                   f"got {getattr(mask, 'shape', type(mask).__name__)}")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        if _cache_length(cache) == 0:
            kwargs[key] = self._filled(cache, batch, ref.device)
            if kwargs.get("cache_position") is not None:
                kwargs["cache_position"] = kwargs["cache_position"] + n
        return (), kwargs

    def _filled(self, cache: Any, batch: int, device: torch.device) -> Any:
        """``cache`` (an empty transformers Cache) or a new DynamicCache, holding the prefix of every layer."""
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache()
        elif not hasattr(cache, "update"):
            raise PeftkitError(f"prefix tuning needs a transformers Cache object, got {type(cache).__name__}")
        dtype = self._site.base.weight.dtype  # the model's dtype (its input embedding's)
        for i, (k, v) in enumerate(self.key_values(batch, dtype, device)):
            cache.update(k, v, i)
        return cache

    def extra_repr(self) -> str:
        proj = ", prefix_projection" if self.config.prefix_projection else ""
        return (f"method=prefix_tuning, num_virtual_tokens={self.num_virtual_tokens}, layers={self.num_layers}, "
                f"kv_heads={self.num_kv_heads}x{self.head_dim}{proj}")


# -- Hugging Face PEFT format ------------------------------------------------------------------
def prefix_tuning_to_hf(config: PrefixTuning) -> dict[str, Any]:
    d = config.kv_width
    out = {
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": d,
        "num_transformer_submodules": 1,
        "num_attention_heads": config.num_kv_heads,  # type: ignore[attr-defined]
        "num_layers": config.num_layers,  # type: ignore[attr-defined]
        "encoder_hidden_size": config.encoder_hidden_size or d,
        "prefix_projection": config.prefix_projection,
        "init_weights": config.init_weights,
        "modules_to_save": None,
    }
    task = config.__dict__.get("task_type")
    if task is not None:
        # peft's SEQ_CLS/TOKEN_CLS/QUESTION_ANS models expect a trained copy of the head in the file (modules_to_save)
        # and cannot pass a cache to transformers 5 encoders; FEATURE_EXTRACTION passes the same prefix to the model
        out["task_type"] = "CAUSAL_LM" if task == "CAUSAL_LM" else "FEATURE_EXTRACTION"
    return out


def prefix_tuning_from_hf(d: dict[str, Any]) -> PrefixTuning:
    if (d.get("num_transformer_submodules") or 1) != 1 or d.get("task_type") == "SEQ_2_SEQ_LM":
        raise ConfigError("encoder-decoder prefix tuning (num_transformer_submodules=2, SEQ_2_SEQ_LM) is not supported")
    # the file holds the flattened prefix (the MLP's output when prefix_projection was used)
    config = PrefixTuning(num_virtual_tokens=d["num_virtual_tokens"], prefix_projection=False,
                          init_weights=d.get("init_weights"))
    heads, width = d.get("num_attention_heads"), d.get("token_dim")
    if d.get("num_layers") and heads and width:  # the layout, until the config is resolved against a model
        config.__dict__.update(num_layers=d["num_layers"], num_kv_heads=heads, head_dim=width // heads)
    return config


def _prefix_export(state: dict[str, torch.Tensor], layer: dict[str, Any]) -> dict[str, torch.Tensor]:
    """peft's ``prompt_embeddings``: the flattened prefix (the MLP evaluated when there is one)."""
    if "prefix" in state:
        return {"prefix": state["prefix"]}
    with torch.no_grad():
        hidden = torch.tanh(nn.functional.linear(state["embedding"].float(), state["transform.0.weight"].float(),
                                                 state["transform.0.bias"].float()))
        flat = nn.functional.linear(hidden, state["transform.2.weight"].float(), state["transform.2.bias"].float())
    return {"prefix": flat}


PrefixTuning.hf_codec = HFCodec(
    peft_type="PREFIX_TUNING",
    config_to_hf=lambda c, targets: prefix_tuning_to_hf(c),
    config_from_hf=prefix_tuning_from_hf,
    read_names={"prompt_embeddings": "prefix"},
    options=frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                       "num_layers", "encoder_hidden_size", "prefix_projection", "init_weights", "modules_to_save"}),
    module_level=False,
    export=_prefix_export,
)
