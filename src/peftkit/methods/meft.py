"""MEFT: memory-efficient fine-tuning with reversible adapters (Liao, Tan and Monz 2023, arXiv:2306.00477).

The frozen layer stack of a transformer is run as a reversible network of two streams. Both start
as the embedding output, ``x1⁰ = x2⁰ = h₀``, and layer ``n`` (``L_n``, frozen) is one coupling

    a = λ·x1 + F(x2)
    b = β·x2 + G(a)
    (x1, x2) ← (b, a)                        the streams swap after every layer

with two zero-initialised bottleneck adapters per layer, ``A(h) = W_up·σ(W_down·h + b_down) + b_up``
(``W_up = 0, b_up = 0`` at init; only the adapters train):

* **MEFT1** (``variant=1``, default λ = 1/8, β = 1): ``F = L_n + A_layer`` (the PLM layer with a
  parallel adapter), ``G = A_rev`` (an adapter);
* **MEFT2** (``variant=2``, default λ = 1, β = 1/8): ``F = A_rev``, ``G = L_n + A_layer``;
* **MEFT3** (``variant=3``, default λ = β = 1/8): ``F`` = the layer's attention block (with its
  residual path) ``+ A_rev``, ``G`` = its MLP block ``+ A_layer``, and the streams do not swap.

(The official scripts use 0.1; 1/8 is the nearest power of two, by which scaling is exact in
floating point.) At init the adapters are zero, so for MEFT1 the layer
stream is ``a_n = L_n(a_{n−1}) + λ·a_{n−2}`` (MEFT2: ``b_n = L_n(b_{n−1}) + β·b_{n−2}``): the
pre-trained model plus a λ- (β-)scaled skip from two layers back (MEFT3: each block gets its own
input from one block back, scaled by λ or β). The model's output is the stream the last layer
(MLP block) wrote (``a`` for MEFT1, ``b`` for MEFT2 and MEFT3; MEFT1's last ``G`` is never read,
so that layer has no ``A_rev``), so as the scales → 0 the network is exactly the PLM. λ (β) cannot be 0:
the coupling must stay invertible, and the skip compounds with depth (SmolLM2, 30 layers, λ = 1/8:
the top-1 token at init is the PLM's at 18% of positions; λ = 2^-8: 90%; see the README).

**Memory.** In training the stack runs as one autograd node (:mod:`peftkit.methods.reversible`)
that keeps only the two final streams; the backward pass rebuilds every layer's inputs from its
outputs (``x2 = (b − G(a))/β``, ``x1 = (a − F(x2))/λ``) and re-runs the layer. The activations
kept for backward no longer grow with the number of layers.

**Precision.** Rebuilding ``x1 = (a − F(x2))/λ`` multiplies the rounding error of ``a`` by ``1/λ``,
once per layer going down: in float32 the rebuilt embeddings of MiniLM (6 layers, λ = 0.1) are
6% off and SmolLM2's (30 layers) are garbage. So the two streams are kept in float64
(``stream_dtype``; the layers still run in their own dtype on the stream rounded to it) and the
scales are powers of two: then ``λ·x1 + f`` is exact as long as the stream has ``log2(1/λ)`` spare
bits per layer, and the inputs are rebuilt bit for bit (``reconstruction_error`` = 0 on MiniLM).
``reversible_layers`` (None) makes only the lowest ``⌊(53 − 24 − 2)/log2(1/λ)⌋`` layers reversible
for float32 layers (9 of SmolLM2's 30 at λ = 1/8; all 6 of MiniLM's; MEFT3 pays for λ and β: 4);
the layers above use ordinary
autograd, as the official code's ``num_rev_layers`` for deep models. The rule assumes layer outputs
of similar magnitude; the backward pass checks every rebuilt input against the forward's (norms)
and warns when one is not exact. An explicit number overrides it; ``reversible_layers=0`` runs the
same coupling with ordinary autograd (for comparison).

Differences from the paper's code, and why: the adapters start at exactly zero (``W_up = 0``, the
paper draws both matrices from N(0, 0.02²)), so the start is the PLM-with-skip above; the layer
adapter runs in parallel to the whole layer (the paper puts it beside the feed-forward block,
inside the layer), so one implementation serves pre-norm (Llama) and post-norm (BERT) layers;
the output is the layer stream rather than the mean of the two streams (the mean starts further
from the PLM, at about ``(h_N + h_{N−1})/2``); float64 streams and power-of-two scales (above).
MEFT3's attention adapter is parallel to the attention block (the paper's sits on the attention
output inside it); BERT's cross-attention (decoder use) is not run by MEFT3.

**Where it sits.** The adapter has one module per layer of the stack (Llama's
``model.layers.N``, BERT's ``encoder.layer.N``); all layers must be targeted. The first layer's
call runs the whole reversible stack and the others pass its result through, so the model's own
``forward`` (masks, rotary embeddings, final norm, head) is untouched; the per-layer hidden states
it reports with ``output_hidden_states`` are then all the final one. Streams are in
``stream_dtype`` whatever the base dtype (the layers run in their own). Not mergeable (there is no weight form)
and no mixed batches; a KV cache works without gradients (generation) and is dropped while
training. Layer arguments other than the hidden states (masks, rotary embeddings) get no
gradient. Supported: Llama-style decoders and BERT encoders; other model types are refused.
"""

from __future__ import annotations

import contextvars
import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, one_of, positive_int
from ..core.errors import ConfigError, PeftkitError
from ..core.registry import register
from ..core.site import AdapterSite
from .reversible import Coupling, run_couplings

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
#: the model's ``hidden_act`` → the adapter's non-linearity (when ``non_linearity`` is None)
_HIDDEN_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "silu": "silu",
               "swish": "silu", "tanh": "tanh"}
STREAM_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: (λ, β) of each variant: the official scripts' 0.1 rounded to a power of two (scaling by it is exact)
VARIANT_SCALES = {1: (0.125, 1.0), 2: (1.0, 0.125), 3: (0.125, 0.125)}
#: mantissa bits (with the implicit one) per floating dtype: what a stream can hold exactly
_MANTISSA = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}
_SAFETY_BITS = 2
#: supported ``model_type`` → the class of its layers
SUPPORTED = {"llama": "LlamaDecoderLayer", "bert": "BertLayer"}
_LAYER_PATTERNS = {"llama": [r"re:(.*\.)?layers\.\d+"], "bert": [r"re:(.*\.)?encoder\.layer\.\d+"]}
_FALLBACK = [r"re:(.*\.)?(layers|layer|h|blocks?)\.\d+"]  # other families: found, then refused by name
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")
#: per thread / task: {id(first layer's module): weak reference to the stack output the other layers pass on}
_STACK_OUTPUT: contextvars.ContextVar[dict[int, weakref.ref] | None] = contextvars.ContextVar(
    "peftkit_meft_stack_output", default=None)


class _LayerDefaults(dict):
    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(key, _FALLBACK)


@register
@dataclass
class MEFT(AdapterConfig):
    """Reversible adapters over the whole layer stack (MEFT1 or MEFT2; see the module docstring).

    ``variant``: 1 (F = layer + adapter, G = adapter), 2 (F = adapter, G = layer + adapter) or 3
    (F = attention block + adapter, G = MLP block + adapter, no swap).
    ``bottleneck_size``: the adapters' hidden width. ``lam`` / ``beta``: the stream scales λ and β
    (None: the variant's defaults, 1/8 and 1 for MEFT1, 1 and 1/8 for MEFT2, 1/8 and 1/8 for MEFT3).
    ``reversible_layers``:
    how many of the lowest layers use the activation-free backward (None: as many as the stream precision
    rebuilds exactly, see :func:`exact_layers`; 0: none).
    ``non_linearity``: relu, gelu, silu or tanh (None: the model's ``hidden_act``). ``stream_dtype``:
    ``"float64"`` (default) or ``"float32"``, the precision of the two streams (the layers run in their own
    dtype); with float32 streams nothing is rebuilt exactly, so ``reversible_layers=None`` means 0.
    ``target_modules`` defaults to every layer of the stack.
    """

    method: ClassVar[str] = "meft"
    family: ClassVar[str] = "adapter"
    paper: ClassVar[str] = "Liao et al. 2023 (arXiv:2306.00477)"
    formula: ClassVar[str] = ("reversible layers: a = λx1 + F(x2), b = βx2 + G(a), F/G = frozen layer + adapter "
                              "/ adapter; the adapters")
    mergeable: ClassVar[bool] = False
    default_targets: ClassVar[dict[str, list[str]]] = _LayerDefaults(_LAYER_PATTERNS)

    variant: int = 1
    bottleneck_size: int = 8
    lam: float | None = None
    beta: float | None = None
    reversible_layers: int | None = None
    non_linearity: str | None = None
    stream_dtype: str = "float64"

    def validate(self) -> None:
        owner = type(self).__name__
        if self.variant not in VARIANT_SCALES:
            raise ConfigError(f"{owner}: variant={self.variant!r} is not 1 (MEFT1: F = layer + adapter), 2 "
                              "(MEFT2: G = layer + adapter) or 3 (MEFT3: F = attention block, G = MLP block)")
        positive_int(owner, "bottleneck_size", self.bottleneck_size)
        for name in ("lam", "beta"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v == 0):
                raise ConfigError(f"{owner}: {name} must be a finite non-zero number (the coupling divides by it "
                                  f"to rebuild the layer inputs), got {v!r}; the paper uses 0.1 or 1, and powers "
                                  "of two such as 0.125 are exact")
        if self.reversible_layers is not None and self.reversible_layers < 0:
            raise ConfigError(f"{owner}: reversible_layers must be >= 0 (0: ordinary autograd, None: as many as "
                              "the stream precision allows), "
                              f"got {self.reversible_layers!r}")
        if self.non_linearity is not None:
            one_of(owner, "non_linearity", self.non_linearity, tuple(ACTIVATIONS))
        one_of(owner, "stream_dtype", self.stream_dtype, tuple(STREAM_DTYPES))

    def scales(self) -> tuple[float, float]:
        """``(λ, β)``: the given values or the variant's defaults."""
        lam, beta = VARIANT_SCALES[self.variant]
        return (lam if self.lam is None else float(self.lam), beta if self.beta is None else float(self.beta))

    def check_model(self, model: nn.Module, module_names: list[str]) -> str | None:
        cfg = getattr(model, "config", None)
        mtype = getattr(cfg, "model_type", None)
        supported = ", ".join(f"{t} ({c})" for t, c in SUPPORTED.items())
        if mtype not in SUPPORTED:
            return (f"MEFT supports the model types {supported}; {type(model).__name__} has model_type {mtype!r}")
        layers = {n: _unwrapped(model.get_submodule(n)) for n in module_names}
        want = SUPPORTED[mtype]
        wrong = [n for n, m in layers.items() if type(m).__name__ != want]
        if wrong:
            return (f"MEFT targets the {want} layers of a {mtype} model; {wrong[0]} is a "
                    f"{type(layers[wrong[0]]).__name__} (leave target_modules unset for every layer)")
        stack_path = module_names[0].rpartition(".")[0]
        stack = model.get_submodule(stack_path) if stack_path else None
        if not isinstance(stack, nn.ModuleList):
            return f"MEFT needs the layers in one ModuleList; the parent of {module_names[0]} is not one"
        expected = [f"{stack_path}.{i}" for i in range(len(stack))]
        if list(module_names) != expected:
            missing = [n for n in expected if n not in module_names]
            return (f"MEFT makes the whole layer stack reversible, so it targets all {len(stack)} layers of "
                    f"{stack_path}; missing: {', '.join(missing[:4]) or 'none (other modules selected)'}")
        if self.reversible_layers is not None and self.reversible_layers > len(stack):
            return f"reversible_layers={self.reversible_layers} exceeds the {len(stack)} layers of {stack_path}"
        return None

    def resolve(self, model: nn.Module, module_names: list[str]) -> MEFT:
        """A copy with λ, β and the non-linearity made explicit (the latter from the model's ``hidden_act``)."""
        lam, beta = self.scales()
        act = self.non_linearity
        if act is None:
            hidden_act = getattr(getattr(model, "config", None), "hidden_act", None)
            act = _HIDDEN_ACT.get(hidden_act, "relu") if isinstance(hidden_act, str) else "relu"
        out = self.replace(lam=lam, beta=beta, non_linearity=act)
        out.num_layers = len(module_names)  # not an option: MEFT1's last layer has no G adapter (see MEFTLayer)
        return out  # type: ignore[return-value]

    def build(self, base: nn.Module, module_name: str) -> MEFTLayer:
        return MEFTLayer(self, base, module_name)


class BottleneckAdapter(nn.Module):
    """``A(h) = W_up·σ(W_down·h + b_down) + b_up`` with ``W_up = 0, b_up = 0`` at init (computed in float32)."""

    def __init__(self, hidden: int, size: int, act: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = act

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.down.weight
        return self.up(ACTIVATIONS[self.act](self.down(h.to(w.dtype)))).to(h.dtype)


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, AdapterSite) else module


def _hidden_size(base: nn.Module) -> int:
    size = getattr(base, "hidden_size", None)
    if isinstance(size, int):
        return size
    for m in base.modules():  # the first normalisation layer holds one weight per hidden unit
        w = getattr(m, "weight", None)
        if "norm" in type(m).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1:
            return int(w.shape[0])
    raise ConfigError(f"MEFT cannot find the hidden size of {type(base).__name__}")


class MEFTLayer(AdapterModule):
    """One layer's two adapters (``layer_adapter`` beside the PLM layer, ``rev_adapter`` the other side of
    the coupling; MEFT1's last layer has none, its ``G`` output is never read). The first layer's module
    runs the whole stack."""

    mergeable = False
    unmergeable_reason = ("MEFT (reversible adapters) changes how the layer stack runs (two coupled streams); "
                          "there is no weight to fold it into")
    supports_mixed_batch = False

    def __init__(self, config: MEFT, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        hidden, act = _hidden_size(base), config.non_linearity or "relu"
        self.stack_path, _, index = module_name.rpartition(".")
        self.index = int(index)
        self.layer_adapter = BottleneckAdapter(hidden, config.bottleneck_size, act)
        # MEFT1 reads out the last layer's a; its b = β·x2 + G(a) is never read, so that G is 0 (no dead adapter)
        last = self.index == getattr(config, "num_layers", 0) - 1
        self.rev_adapter = None if config.variant == 1 and last else BottleneckAdapter(hidden, config.bottleneck_size, act)
        self.__dict__["_stack"] = None  # the ModuleList of layer sites (a plain attribute, not a submodule)

    def on_attach(self, model: nn.Module, site: Any) -> None:
        self.__dict__["_stack"] = model.get_submodule(self.stack_path)

    def on_detach(self) -> None:
        self.__dict__["_stack"] = None

    def adapt_output(self, x: torch.Tensor, y: Any, base_out: Any, site: Any) -> Any:
        raise PeftkitError("a MEFT adapter runs the whole layer stack and cannot be stacked with another adapter "
                           "on the same layers; activate one MEFT adapter at a time")

    # -- the stack ------------------------------------------------------------------------------
    def _name(self, site: Any) -> str:
        return next(n for n, m in site.adapters.items() if m is self)

    def fused_call(self, args: tuple, kwargs: dict, site: Any) -> Any:
        if not args:
            args, kwargs = _first_positional(site.base, kwargs)
        stack = self._stack
        if stack is None:
            raise PeftkitError("this MEFT layer is not attached to a model")
        name = self._name(site)
        first: MEFTLayer = stack[0].adapters[name]
        if self.index > 0:
            ref = (_STACK_OUTPUT.get() or {}).get(id(first))
            expected = ref() if ref is not None else None
            if expected is None or expected is not args[0]:
                raise PeftkitError(f"MEFT runs the whole layer stack from its first layer ({self.stack_path}.0); "
                                   f"layer {self.index} was called on its own, which a reversible stack cannot do")
            return args[0]
        out = self._run_stack(stack, name, args[0], args[1:], kwargs)
        _STACK_OUTPUT.set({**(_STACK_OUTPUT.get() or {}), id(self): weakref.ref(out)})
        return out

    def couplings(self, stack: nn.ModuleList, name: str, rest: tuple, kwargs: dict, stream_dtype: torch.dtype
                  ) -> list[Coupling]:
        """One :class:`Coupling` per layer, reading the layer arguments ``rest`` / ``kwargs``."""
        out = []
        for i, s in enumerate(stack):
            if s.running() != [name]:
                raise PeftkitError(f"MEFT adapter {name!r} must run alone on every layer of {self.stack_path}; "
                                   f"layer {i} runs {s.running()}")
            mod: MEFTLayer = s.adapters[name]
            out.append(mod._coupling(s.base, rest, kwargs, stream_dtype))
        return out

    def _coupling(self, layer: nn.Module, rest: tuple, kwargs: dict, stream_dtype: torch.dtype) -> Coupling:
        lam, beta = self.config.scales()
        ref = next((p for p in layer.parameters() if p.is_floating_point()), None)
        layer_dtype = ref.dtype if ref is not None else stream_dtype
        layer_adapter, rev_adapter = self.layer_adapter, self.rev_adapter

        def with_layer(h: torch.Tensor) -> torch.Tensor:
            y = layer(h.to(layer_dtype), *rest, **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            return y.to(stream_dtype) + layer_adapter(h)

        def adapter(h: torch.Tensor) -> torch.Tensor:
            return rev_adapter(h) if rev_adapter is not None else torch.zeros_like(h)

        variant = self.config.variant
        if variant == 3:
            attention, mlp = _blocks(layer, rest, kwargs)

            def f(h: torch.Tensor) -> torch.Tensor:
                return attention(h.to(layer_dtype)).to(stream_dtype) + rev_adapter(h)

            def g(h: torch.Tensor) -> torch.Tensor:
                return mlp(h.to(layer_dtype)).to(stream_dtype) + layer_adapter(h)
        else:
            f, g = (with_layer, adapter) if variant == 1 else (adapter, with_layer)
        params = [p for p in (*layer.parameters(), *self.parameters()) if p.requires_grad]
        random = layer.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in layer.modules())
        return Coupling(f, g, lam, beta, params, random, swap=variant != 3)

    def _run_stack(self, stack: nn.ModuleList, name: str, h0: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
        stream_dtype = torch.promote_types(h0.dtype, STREAM_DTYPES[self.config.stream_dtype])
        params = [p for s in stack for p in (*s.base.parameters(), *s.adapters[name].parameters())]
        need_grad = torch.is_grad_enabled() and (h0.requires_grad or any(p.requires_grad for p in params))
        if need_grad:
            kwargs = _without_cache(kwargs)
        couplings = self.couplings(stack, name, rest, kwargs, stream_dtype)
        k = self.config.reversible_layers
        k = exact_layers(self.config, couplings, stream_dtype, stack) if k is None else min(k, len(couplings))
        s0 = h0.to(stream_dtype)
        o1, o2 = run_couplings(couplings, s0, s0, k, need_grad)
        for record in _RECORDS:
            record.append((s0.detach(), couplings))
        return (o1 if self.config.variant == 2 else o2).to(h0.dtype)  # the stream the layer (MLP) wrote last

    def extra_repr(self) -> str:
        lam, beta = self.config.scales()
        return f"method=meft, variant={self.config.variant}, layer={self.index}, lam={lam}, beta={beta}"


def exact_layers(config: MEFT, couplings: list[Coupling], stream_dtype: torch.dtype, stack: nn.ModuleList) -> int:
    """How many of the lowest layers the streams rebuild exactly (``reversible_layers=None``).

    Going down one layer divides a stream by λ (or β): with a power-of-two scale ``s < 1`` the
    rebuilt value is exact while the stream still holds the ``log2(1/s)`` extra bits per layer that
    the layer outputs (``p`` mantissa bits) were shifted by, i.e. for ``⌊(P − p − 2)/log2(1/s)⌋`` layers
    with ``P`` the stream's mantissa bits (2 bits of margin). ``s ≥ 1`` loses no bits: every layer.
    """
    n = len(couplings)
    per_layer = sum(math.log2(1.0 / abs(s)) for s in config.scales() if abs(s) < 1.0)  # MEFT3 scales twice
    if per_layer == 0:
        return n
    ref = next((p for p in stack[0].base.parameters() if p.is_floating_point()), None)
    layer_bits = _MANTISSA.get(ref.dtype if ref is not None else stream_dtype, 24)
    budget = _MANTISSA.get(stream_dtype, 24) - layer_bits - _SAFETY_BITS
    return max(0, min(n, math.floor(budget / per_layer)))


def _blocks(layer: nn.Module, rest: tuple, kwargs: dict) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                  Callable[[torch.Tensor], torch.Tensor]]:
    """MEFT3's two halves of a layer, each with its residual path: the attention block and the MLP block.

    Llama (pre-norm): ``h + attn(norm₁(h))`` and ``h + mlp(norm₂(h))``; BERT (post-norm):
    ``LN(h + attn(h))`` (``layer.attention``) and ``LN(h + ffn(h))`` (``layer.feed_forward_chunk``).
    """
    name = type(layer).__name__
    if name == "LlamaDecoderLayer":
        def attention(h: torch.Tensor) -> torch.Tensor:
            out = layer.self_attn(layer.input_layernorm(h), *rest, **kwargs)
            return h + (out[0] if isinstance(out, tuple) else out)

        def mlp(h: torch.Tensor) -> torch.Tensor:
            return h + layer.mlp(layer.post_attention_layernorm(h))

        return attention, mlp
    if name == "BertLayer":
        def bert_attention(h: torch.Tensor) -> torch.Tensor:
            out = layer.attention(h, *rest, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        return bert_attention, layer.feed_forward_chunk
    raise PeftkitError(f"MEFT3 splits LlamaDecoderLayer and BertLayer into attention and MLP blocks, not {name}")


def _first_positional(base: nn.Module, kwargs: dict) -> tuple[tuple, dict]:
    params = list(inspect.signature(base.forward).parameters)
    if not params or params[0] not in kwargs:
        raise PeftkitError(f"{type(base).__name__} was called without its hidden states; MEFT needs them")
    rest = dict(kwargs)
    return (rest.pop(params[0]),), rest


def _without_cache(kwargs: dict) -> dict:
    """The layer arguments without a KV cache: layers are re-run in the backward pass, which must not
    append to a cache again. A cache that already holds tokens cannot be trained through."""
    out = dict(kwargs)
    for key in _CACHE_KEYS:
        cache = out.get(key)
        if cache is None:
            continue
        length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if length:
            raise PeftkitError("MEFT cannot compute gradients through a KV cache that already holds tokens "
                               "(the reversible backward re-runs the layers); train without a cache")
        out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


#: active recorders (:func:`reconstruction_error`): each stack run appends (its input stream, its couplings)
_RECORDS: list[list[tuple[torch.Tensor, list[Coupling]]]] = []


@torch.no_grad()
def reconstruction_error(model: nn.Module, inputs: dict[str, Any], layers: int | None = None) -> float:
    """How well the lowest ``layers`` layers (None: all) rebuild their input from their outputs alone.

    One forward pass of ``model(**inputs)`` with the active MEFT adapter; the streams after ``layers``
    layers are inverted layer by layer down to the embeddings, as the backward pass does, and the
    result is ``max |x̂ − h₀| / max |h₀|`` over both streams. Use ``eval()`` mode for a model with
    dropout (the inverse replays random draws only in training mode).
    """
    record: list[tuple[torch.Tensor, list[Coupling]]] = []
    _RECORDS.append(record)
    try:
        model(**inputs)
    finally:
        _RECORDS.remove(record)
    if not record:
        raise PeftkitError("no MEFT adapter ran in this forward pass (attach one and activate it)")
    s0, couplings = record[0]
    couplings = couplings if layers is None else couplings[:layers]
    o1, o2 = s0, s0
    for c in couplings:
        o1, o2 = c.forward(o1, o2)
    for c in reversed(couplings):
        o1, o2 = c.inverse(o1, o2)
    scale = s0.abs().max().clamp_min(1e-30)
    return float(torch.maximum((o1 - s0).abs().max(), (o2 - s0).abs().max()) / scale)
