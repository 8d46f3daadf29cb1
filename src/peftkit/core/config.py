"""The base of every method configuration.

A config is a dataclass: the method's hyper-parameters plus the targeting fields shared by
all methods. ``build(base, module_name)`` makes the :class:`AdapterModule` for one
targeted layer; ``check_layer`` says, before anything is touched, whether that layer can
take the method. ``to_dict``/``from_dict`` give the JSON form saved next to the weights.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from .errors import ConfigError, did_you_mean


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

    target_modules: Any = None
    exclude_modules: Any = None

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
        data = {k: v for k, v in data.items() if k != "method"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown option {unknown[0]!r}{did_you_mean(unknown[0], names)}"
            )
        return cls(**data)

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
            if re.match(rf"(.*\.)?({key})$", module_name):
                return value
        except re.error:
            continue
    return default


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
