"""Turning command-line flags into a method config.

``peftkit train --method lora --r 16 --alpha 32 --target-modules q_proj,v_proj`` — every flag
that is not a training flag is a method option: ``--target-modules`` becomes ``target_modules``
and the value is converted by the type of the option's default (int, float, bool, a comma list
for list options, JSON for dicts). Options from peft keep their peft names too (``--lora-alpha``,
``--lora-dropout``, ``--rank``). An option the method does not have is an error naming the closest
training flag or option.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..core.config import AdapterConfig
from ..core.errors import ConfigError
from ..core.registry import get_method
from .flags import METHOD_ALIASES, unknown_option

# options whose value is a list even though their default is None
LIST_OPTIONS = {"target_modules", "exclude_modules", "modules_to_save", "feedforward_modules", "init_token_ids"}


def method_fields(cls: type[AdapterConfig]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.repr or f.name in LIST_OPTIONS}


def parse_method_flags(flags: list[str]) -> dict[str, str]:
    """``["--r", "16", "--use-rslora", ...]`` → ``{"r": "16", "use_rslora": "true"}`` (a flag without value is true)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(flags):
        tok = flags[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r} (method options are written --name value)")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            value = flags[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        out[key.replace("-", "_")] = value
    return out


def option_name(cls: type[AdapterConfig], name: str) -> str:
    """``name`` as an option of ``cls``: aliases from peft resolved (``lora_alpha`` → ``alpha``, ``rank`` → ``r``);
    an unknown name raises, suggesting from the training flags and the method's options together."""
    fields = method_fields(cls)
    name = name.replace("-", "_")
    if name not in fields and METHOD_ALIASES.get(name) in fields:
        name = METHOD_ALIASES[name]
    if name not in fields:
        raise unknown_option(name, cls.method, list(fields))
    return name


def convert(cls: type[AdapterConfig], name: str, raw: Any) -> Any:
    """The value of option ``name`` of ``cls`` from a string (or pass a YAML value through, numbers written as
    strings parsed). Negative numbers are refused: no method option takes one."""
    value = _convert(cls, name, raw)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"--{name.replace('_', '-')}: {raw!r} is negative; method options take values >= 0")
    return value


def _convert(cls: type[AdapterConfig], name: str, raw: Any) -> Any:
    fields = method_fields(cls)
    f = fields[name]
    if not isinstance(raw, str):
        return raw
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
    try:
        if name in LIST_OPTIONS or isinstance(default, list):
            if raw.startswith("["):
                return json.loads(raw)
            items = [s.strip() for s in raw.split(",") if s.strip()]
            if name == "init_token_ids":
                return [int(s) for s in items]
            return items[0] if len(items) == 1 and items[0] in ("all-linear", "all-bias", "all-norm") else items
        if isinstance(default, bool):
            low = raw.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, dict):
            return json.loads(raw)
        if default is None:
            for conv in (int, float):
                try:
                    return conv(raw)
                except ValueError:
                    pass
        return raw
    except (ValueError, json.JSONDecodeError):
        kind = type(default).__name__ if default is not None else "value"
        raise ConfigError(f"--{name.replace('_', '-')}: {raw!r} is not a valid {kind}") from None


def build_config(method: str, options: dict[str, Any], total_steps: int | None = None) -> AdapterConfig:
    """The method's config from CLI options; ``total_steps`` (the run's ``--max-steps``) fills a schedule's
    ``total_step`` (AdaLoRA, IncreLoRA) when the options leave it out."""
    cls = get_method(method)
    values: dict[str, Any] = {}
    for k, v in options.items():
        name = option_name(cls, k)
        if name in values:
            raise ConfigError(f"--{name.replace('_', '-')} is given twice (as --{k.replace('_', '-')} too)")
        values[name] = convert(cls, name, v)
    if "total_step" in {f.name for f in dataclasses.fields(cls)} and values.get("total_step") is None and total_steps:
        values["total_step"] = int(total_steps)
    config = cls(**values)
    config.validate()
    return config
