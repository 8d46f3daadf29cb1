"""The merge-method registry: one typed function per method, registered by a decorator.

A merge method combines ``n`` *task vectors* ``τ_1 … τ_n`` of one tensor (same shape) into one:
``τ = f(τ_1 … τ_n; w, options)``. For adapters ``τ_i`` is an adapter's ΔW (or its factors);
for full checkpoints ``τ_i = θ_i − θ_0`` against a base checkpoint (or ``θ_i`` itself for
methods that need no base). Each method declares an options dataclass; :func:`make_options`
builds it from plain values (YAML, keyword arguments), refusing unknown keys with the closest
name and checking every type, before any tensor is read.

    @merge_method("ties", TiesOptions)
    def ties(tensors, weights, options, masks): ...
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import ConfigError, did_you_mean


@dataclass
class MergeOptions:
    """Base of every method's options (a dataclass of plain values)."""

    def validate(self, n_inputs: int) -> None:
        """Check the values for a merge of ``n_inputs`` inputs; raise :class:`ConfigError` naming the culprit."""


class MaskSource:
    """Where random keep-masks come from: a seeded generator, or masks passed in by the caller.

    ``keep(like, p)`` returns a 0/1 tensor shaped like ``like`` with ``P(1) = p`` (``p`` a float or a
    tensor of probabilities). With ``masks`` given they are returned in order instead (exactly the
    masks another library drew, for reproducing its result); with ``seed`` the draws are those of
    ``torch.bernoulli`` on a generator seeded with it (the same stream as ``torch.manual_seed(seed)``
    followed by the same draws on the default CPU generator).
    """

    def __init__(self, seed: int | None = None, masks: Sequence[torch.Tensor] | None = None) -> None:
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.masks = list(masks) if masks is not None else None
        self.used = 0

    def keep(self, like: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
        if self.masks is not None:
            if self.used >= len(self.masks):
                raise ConfigError(f"{len(self.masks)} masks were given but the merge needs more (mask #{self.used + 1})")
            m = self.masks[self.used]
            self.used += 1
            if tuple(m.shape) != tuple(like.shape):
                raise ConfigError(f"mask #{self.used} has shape {tuple(m.shape)}; the tensor it masks has {tuple(like.shape)}")
            return m.to(like.dtype)
        probs = torch.full_like(like, p, device="cpu") if not torch.is_tensor(p) else p.to("cpu", like.dtype)
        return torch.bernoulli(probs, generator=self.generator).to(like.device)


MergeFn = Callable[[list[torch.Tensor], torch.Tensor, Any, MaskSource], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function and what it needs.

    ``linear``: the result is ``Σ w_i τ_i`` (so LoRA factors can be concatenated exactly);
    ``uses_weights``: per-input weights mean something (else they must be omitted);
    ``needs_base``: on checkpoints the inputs must be task vectors against a base;
    ``inputs``: (min, max) number of inputs (max None: any); ``random``: draws masks.
    """

    name: str
    fn: MergeFn
    options: type[MergeOptions]
    linear: bool = False
    uses_weights: bool = True
    needs_base: bool = True
    inputs: tuple[int, int | None] = (1, None)
    random: bool = False
    summary: str = ""

    def __call__(self, tensors: list[torch.Tensor], weights: Sequence[float] | torch.Tensor | None = None,
                 options: MergeOptions | None = None, masks: MaskSource | None = None) -> torch.Tensor:
        """Merge one tensor's task vectors (validated inputs; see :func:`check_inputs` for the checks)."""
        opts = options if options is not None else self.options()
        w = torch.as_tensor(list(weights) if weights is not None else [1.0] * len(tensors), dtype=torch.float32)
        return self.fn(list(tensors), w.to(tensors[0].device), opts, masks or MaskSource(getattr(opts, "seed", None)))


MERGE_METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, options: type[MergeOptions], *, linear: bool = False, uses_weights: bool = True,
                 needs_base: bool = True, inputs: tuple[int, int | None] = (1, None),
                 random: bool = False) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn(tensors, weights, options, masks) -> tensor`` as merge method ``name``."""

    def deco(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise TypeError(f"merge method {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        MERGE_METHODS[name] = MergeMethod(name, fn, options, linear, uses_weights, needs_base, inputs, random, doc)
        return fn

    return deco


def get_merge_method(name: str) -> MergeMethod:
    """The registered method ``name`` (the built-ins register when ``peftkit.merging`` is imported)."""
    key = str(name).lower().replace("-", "_")
    if key not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method {name!r}{did_you_mean(str(name), MERGE_METHODS)}; "
                          f"known: {', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[key]


def make_options(method: MergeMethod, values: dict[str, Any] | MergeOptions | None, n_inputs: int) -> MergeOptions:
    """The method's options from plain values: unknown keys refused with the closest name, types checked."""
    if isinstance(values, MergeOptions):
        if not isinstance(values, method.options):
            raise ConfigError(f"merge method {method.name!r} takes {method.options.__name__}, got {type(values).__name__}")
        values.validate(n_inputs)
        return values
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(method.options)}
    for key in values:
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise ConfigError(f"merge method {method.name!r} has no option {key!r}{did_you_mean(key, fields)}; "
                              f"its options: {valid}")
    hints = typing.get_type_hints(method.options)
    for key, value in values.items():
        _check_type(method.name, key, value, hints[key])
        if hints[key] is float and isinstance(value, int):
            values[key] = float(value)
    opts = method.options(**values)
    opts.validate(n_inputs)
    return opts


def _check_type(method: str, key: str, value: Any, hint: Any) -> None:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for t in allowed:
        if t is type(None) and value is None:
            return
        if t is bool and isinstance(value, bool):
            return
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return
        if t is str and isinstance(value, str):
            return
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"merge method {method!r}: option {key!r} must be {names}, got {value!r}")


def check_weights(method: MergeMethod, weights: Sequence[float] | None, n_inputs: int,
                  what: str = "inputs") -> list[float] | None:
    """Weights that make sense for ``method`` on ``n_inputs`` inputs, else :class:`ConfigError` naming the problem."""
    lo, hi = method.inputs
    if n_inputs < lo or (hi is not None and n_inputs > hi):
        want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        raise ConfigError(f"merge method {method.name!r} takes {want} {what}, got {n_inputs}")
    if weights is None:
        return None
    if not method.uses_weights:
        raise ConfigError(f"merge method {method.name!r} does not take weights (it sets its own coefficients); remove 'weights'")
    weights = list(weights)
    if len(weights) != n_inputs:
        raise ConfigError(f"{len(weights)} weights for {n_inputs} {what}; give one weight per input")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"weight #{i + 1} is {w!r}; weights must be finite numbers")
    if all(w == 0 for w in weights):
        raise ConfigError("every weight is 0: the merge would be empty")
    return [float(w) for w in weights]


def probability_option(method: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = (0.0 <= value <= 1.0) if allow_zero else (0.0 < value <= 1.0)
    if not ok:
        raise ConfigError(f"merge method {method!r}: {name} must be in {'[0, 1]' if allow_zero else '(0, 1]'}, got {value!r}")
