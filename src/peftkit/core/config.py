"""The base of every method configuration.

A config is a dataclass: the method's hyper-parameters plus the targeting fields shared by
all methods. ``build(base, module_name)`` makes the :class:`AdapterModule` for one
targeted layer; ``check_layer`` says, before anything is touched, whether that layer can
take the method. ``to_dict``/``from_dict`` give the JSON form saved next to the weights.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .errors import ConfigError, did_you_mean
from .patterns import fullmatch

if TYPE_CHECKING:
    from ..formats.codec import HFCodec


@dataclass
class AdapterConfig:
    """Fields every method shares.

    ``target_modules``: which layers to adapt — exact names, dotted suffixes, globs
    (``"layers.*.q_proj"``), a regular expression (``"re:..."``), module classes, or
    ``"all-linear"``. ``exclude_modules``: the same forms, removed from the match.
    """

    method: ClassVar[str] = ""
    #: layer kinds (see :mod:`peftkit.core.layers`) the method can adapt; None means any module
    supported_layers: ClassVar[tuple[str, ...] | None] = None
    #: True for methods that work on a layer whose weight is quantized (peftkit.quant): LoRA, DoRA
    supports_quantized_base: ClassVar[bool] = False
    #: default targets per model family (``config.model_type``) when ``target_modules`` is None
    default_targets: ClassVar[dict[str, list[str]]] = {}
    #: for the method table in the docs: the family (low-rank, scaling, ...), the paper, one line of math
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True
    #: the method's Hugging Face PEFT form (:class:`peftkit.formats.codec.HFCodec`), None if peft has none
    hf_codec: ClassVar[HFCodec | None] = None

    target_modules: Any = None
    exclude_modules: Any = None
    modules_to_save: list[str] | None = field(default=None, kw_only=True)

    # -- hooks a method may override -------------------------------------------------
    def validate(self) -> None:
        """Check the values on their own (ranks > 0, probabilities in [0, 1), ...)."""

    def build(self, base: nn.Module, module_name: str):  # -> AdapterModule
        raise NotImplementedError

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        """A reason the layer cannot take this adapter, or None if it can."""
        from .layers import layer_kind

        if self.supported_layers is not None and layer_kind(base) not in self.supported_layers:
            kinds = ", ".join(self.supported_layers)
            return f"{self.method} does not support {type(base).__name__} layers (supported: {kinds})"
        return None

    def check_model(self, model: nn.Module, module_names: list[str]) -> str | None:
        """A reason the selected modules, taken together, cannot take this adapter (None: they can).

        For methods whose placement depends on the whole model (prompt tuning needs the input embedding).
        """
        return None

    def build_shared(self, model: nn.Module, module_names: list[str]) -> dict[str, torch.Tensor] | None:
        """Tensors shared by every layer of the adapter (VeRA's seeded bases), built once per adapter.

        Called after every check, before ``build``; each built module then reads them as
        ``self.shared.<name>``. They are saved once and restored on load. Default: none.
        """
        return None

    def initial_value(self, module: str, tensor: str, shape: tuple[int, ...],
                      facts: dict[str, Any]) -> torch.Tensor | float | None:
        """The value adapter tensor ``tensor`` of layer ``module`` had when it was built, when the config
        alone determines it (a constant such as IA3's 1, or a factor drawn from a recorded seed);
        None when it does not. ``facts`` are the layer's facts (``kind``, weight ``shape``). Compression
        stores a tensor's change from this value (ComPEFT's task vector). Default: None."""
        return None

    def resolve(self, model: nn.Module, module_names: list[str]) -> AdapterConfig:
        """The config the adapter modules are built with, with model-dependent defaults made explicit
        (IA3's feed-forward modules). Called after every check; the default is ``self``."""
        return self

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: a config must be a JSON object, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "method"}
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown option {unknown[0]!r}{did_you_mean(str(unknown[0]), names)}"
            )
        config = cls(**data)
        config.check_types()
        return config

    def check_types(self) -> None:
        """Every field against its annotation (``r=4.5`` or ``use_rslora="false"`` are refused, not coerced)."""
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            hint = hints.get(f.name)
            value = getattr(self, f.name)
            if f.name in ("target_modules", "exclude_modules"):
                _check_patterns(type(self).__name__, f.name, value)
                continue
            if f.name == "modules_to_save":
                from .saved_modules import check_entries

                check_entries(type(self).__name__, value)
                continue
            problem = _type_problem(value, hint)
            if problem:
                raise ConfigError(f"{type(self).__name__}: {f.name} {problem}, got {value!r}")

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first key of ``patterns`` that matches ``module_name`` (peft's rank/alpha patterns).

    A key matches when it equals the name, is a dotted suffix of it, or is a regular expression that
    matches the end of the name (``re.match(rf"(.*\\.)?({key})$", name)``, the peft rule).
    """
    for key, value in patterns.items():
        if module_name == key or module_name.endswith("." + key):
            return value
        try:
            if fullmatch(rf"(?:.*\.)?(?:{key})", module_name, "pattern"):
                return value
        except ConfigError as e:
            if "not a valid regular expression" in str(e):
                continue  # a plain name that is no regular expression (peft skips it too)
            raise ConfigError(f"pattern key {key!r}: {e}") from None
    return default


@dataclass
class LowRankOptions(AdapterConfig):
    """Options shared by low-rank methods (LoRA, DoRA, LoHa, LoKr, VeRA, AdaLoRA, ...).

    ``r`` the rank and ``alpha`` the scale numerator: the update is scaled by ``s = alpha / r``
    (``use_rslora``: ``alpha / √r``). ``rank_pattern`` / ``alpha_pattern`` map module-name
    patterns (names, dotted suffixes or regular expressions, peft's rule) to a per-module value.
    """

    r: int = 8
    alpha: float = 8.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        owner = type(self).__name__
        positive_int(owner, "r", self.r)
        if not isinstance(self.rank_pattern, dict) or not isinstance(self.alpha_pattern, dict):
            raise ConfigError(f"{owner}: rank_pattern and alpha_pattern must map module patterns to numbers")
        for k, v in self.rank_pattern.items():
            positive_int(owner, f"rank_pattern[{k!r}]", v)
        finite_number(owner, "alpha", self.alpha)
        for k, v in self.alpha_pattern.items():
            finite_number(owner, f"alpha_pattern[{k!r}]", v)

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scale_for(self, module_name: str) -> float:
        r, a = self.rank_for(module_name), self.alpha_for(module_name)
        return a / math.sqrt(r) if self.use_rslora else a / r


def finite_number(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{owner}: {name} must be a finite number, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    """Field annotations of ``cls`` and its bases, each evaluated in its own module (unresolvable ones skipped)."""
    import sys

    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        module = sys.modules.get(klass.__module__)
        namespace = dict(vars(typing))
        namespace.update(vars(module) if module else {})
        for name, ann in vars(klass).get("__annotations__", {}).items():
            if isinstance(ann, str):
                try:
                    ann = eval(ann, namespace)
                except Exception:
                    out.pop(name, None)
                    continue
            out[name] = ann
    return out


def _check_patterns(owner: str, name: str, value: Any) -> None:
    if value is None or isinstance(value, (str, type)):
        return
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{owner}: {name} must be a pattern, a module class or a list of them, got {value!r}")
    seen = set()
    for v in value:
        if not isinstance(v, (str, type)):
            raise ConfigError(f"{owner}: {name} entries must be strings or module classes, got {v!r}")
        if v in seen:
            raise ConfigError(f"{owner}: {name} lists {v!r} twice")
        seen.add(v)


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit annotation ``hint`` (None when it fits or the hint is not checked)."""
    if hint is None or hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if all(_type_problem(value, o) for o in options):
            return "must be " + " or ".join(_describe(o) for o in options)
        return None
    if hint is type(None):
        return None if value is None else "must be null"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin is dict:
        if not isinstance(value, dict):
            return "must be a mapping"
        args = typing.get_args(hint)
        if len(args) == 2:
            for k, v in value.items():
                if _type_problem(k, args[0]) or _type_problem(v, args[1]):
                    return f"must map {_describe(args[0])} to {_describe(args[1])} (entry {k!r}: {v!r})"
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return "must be a list"
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(args) == 1:
            for v in value:
                if _type_problem(v, args[0]):
                    return f"must hold {_describe(args[0])} entries (found {v!r})"
        return None
    return None


def _describe(hint: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin is dict:
        return "a mapping"
    if origin in (list, tuple):
        return "a list"
    return getattr(hint, "__name__", str(hint))


def _jsonable(v: Any) -> Any:
    if isinstance(v, type):
        return v.__name__
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{owner}: {name} must be a positive integer, got {value!r}")


def probability(owner: str, name: str, value: Any, *, upper_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and 0.0 <= value and (value < 1.0 if upper_open else value <= 1.0)
    if not ok:
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"{owner}: {name} must be in {bound}, got {value!r}")


def one_of(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{owner}: {name}={value!r} is not one of {', '.join(map(repr, choices))}"
            f"{did_you_mean(str(value), choices)}"
        )


field = field  # re-exported for method files
