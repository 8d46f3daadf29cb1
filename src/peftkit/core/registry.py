"""The method registry: ``@register`` on a config class makes a method known by its name.

Save/load, validation, the CLI and the docs' method table read the registry, so adding a
method is one file in ``peftkit/methods/``.
"""

from __future__ import annotations

from .config import AdapterConfig
from .errors import ConfigError, did_you_mean

METHODS: dict[str, type[AdapterConfig]] = {}


def register(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    name = cls.method
    if not name:
        raise TypeError(f"{cls.__name__} sets no `method` name")
    if name in METHODS and METHODS[name] is not cls:
        raise TypeError(f"method {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__})")
    METHODS[name] = cls
    return cls


def get_method(name: str) -> type[AdapterConfig]:
    if not isinstance(name, str):
        raise ConfigError(f"a method name must be a string such as 'lora', got {name!r}; known: {', '.join(sorted(METHODS))}")
    key = name.lower().replace("-", "_")
    for cname, cls in METHODS.items():
        if key in (cname, cls.__name__.lower()):
            return cls
    raise ConfigError(f"unknown method {name!r}{did_you_mean(name, METHODS)}; known: {', '.join(sorted(METHODS))}")


def config_from_dict(data: dict) -> AdapterConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"an adapter config must be a JSON object, got {type(data).__name__}")
    if "method" not in data:
        raise ConfigError("adapter config has no 'method' field")
    return get_method(data["method"]).from_dict(data)


def method_table() -> str:
    """The Markdown table of every registered method (the README's method table is generated from it)."""
    hf = {n for n, cls in METHODS.items() if cls.hf_codec is not None}
    rows = ["| method | config | family | trains | merge | HF PEFT format | paper |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in sorted(METHODS, key=lambda n: (METHODS[n].family, n)):
        cls = METHODS[name]
        layers = ", ".join(cls.supported_layers) if cls.supported_layers else "any module"
        merge = "yes" if cls.mergeable else "no"
        rows.append(f"| `{name}` | `peftkit.{cls.__name__}` | {cls.family} | {cls.formula} ({layers}) | {merge} | "
                    f"{_hf_column(cls) if name in hf else '—'} | {cls.paper} |")
    return "\n".join(rows)


def _hf_column(cls: type[AdapterConfig]) -> str:
    codec = cls.hf_codec
    return f"write (as {codec.peft_type})" if getattr(codec, "write_only", False) else "read + write"
