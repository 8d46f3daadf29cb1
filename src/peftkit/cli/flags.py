"""The training flags of ``peftkit train``: their names, types and aliases, and how user input is normalised.

Users bring habits from transformers and peft: ``--learning_rate``, ``--max_steps``, ``--lora-alpha``.
Underscores are accepted as dashes everywhere (flags and YAML keys), common aliases map to peftkit's
names, a negative number after a flag is its value (``--lr -1e-3`` reaches the check that refuses it),
and numbers written as strings in YAML (PyYAML reads ``1e-3`` as a string) are parsed. An unknown
name is suggested from the union of the training flags and the method's options.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import ConfigError, closest

#: numeric training flags (the TrainConfig field, or a CLI setting) and their types
TRAIN_NUMBERS: dict[str, type] = {
    "epochs": int, "max_steps": int, "batch_size": int, "grad_accum": int, "lr": float, "head_lr": float,
    "warmup": float, "seed": int, "max_length": int, "eval_every": int, "save_every": int,
    "early_stopping_patience": int, "weight_decay": float, "max_grad_norm": float, "loraplus_ratio": float,
    "log_every": int, "exact_match": int, "max_new_tokens": int,
}
#: the other training settings (flags or YAML keys)
TRAIN_OTHER = ("model", "task", "method", "data", "eval_data", "output", "columns", "schedule", "metric",
               "gradient_checkpointing", "resume", "overwrite", "prompt_format", "fsdp", "quantize",
               "optimizer")
TRAIN_KEYS = frozenset(TRAIN_NUMBERS) | frozenset(TRAIN_OTHER)
#: names users bring from transformers' TrainingArguments → peftkit's training flag (dash form)
TRAIN_ALIASES: dict[str, str] = {"learning-rate": "lr", "num-train-epochs": "epochs",
                                 "per-device-train-batch-size": "batch-size",
                                 "gradient-accumulation-steps": "grad-accum", "warmup-ratio": "warmup",
                                 "warmup-steps": "warmup", "logging-steps": "log-every", "eval-steps": "eval-every",
                                 "save-steps": "save-every"}
TRAIN_ALIASES_DASHED = tuple(TRAIN_ALIASES)
TRAIN_ALIASES = {k.replace("-", "_"): v.replace("-", "_") for k, v in TRAIN_ALIASES.items()}
#: names users bring from peft → the method option
METHOD_ALIASES: dict[str, str] = {"lora_alpha": "alpha", "lora_dropout": "dropout", "rank": "r"}
TRAIN_HELP = {
    "warmup": "linear lr warmup: a fraction of the optimizer steps when below 1 (0.06 = the first 6%%), "
              "else a number of steps",
    "lr": "learning rate of the adapter (> 0; classification default 1e-3, causal-lm 2e-4)",
    "head_lr": "classification: learning rate of the new classification head (default 5e-3)",
    "epochs": "passes over the training data (give this or --max-steps, not both)",
    "max_steps": "optimizer steps to run (give this or --epochs, not both)",
    "eval_every": "evaluate every N steps (classification also evaluates after each epoch)",
}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def normalize_train_argv(tokens: list[str]) -> list[str]:
    """``--max_steps 2`` → ``--max-steps 2``; ``--learning-rate 1e-3`` → ``--lr 1e-3``; ``--lr -1e-3`` →
    ``--lr=-1e-3`` (so that argparse takes the negative number as the value)."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--") and len(tok) > 2:
            key, eq, value = tok[2:].partition("=")
            key = canonical_key(key).replace("_", "-")
            tok = f"--{key}{eq}{value}"
            if not eq and i + 1 < len(tokens) and tokens[i + 1].startswith("-") and _is_number(tokens[i + 1]):
                out.append(f"{tok}={tokens[i + 1]}")
                i += 2
                continue
        out.append(tok)
        i += 1
    return out


def canonical_key(key: str) -> str:
    """A YAML key or flag name in peftkit's underscore form, aliases resolved (``learning-rate`` → ``lr``)."""
    k = str(key).replace("-", "_")
    return TRAIN_ALIASES.get(k, k)


def coerce(key: str, value: Any, source: str) -> Any:
    """A training setting from YAML: numeric strings parsed for numeric fields (``lr: 1e-3``), other types refused."""
    typ = TRAIN_NUMBERS.get(key)
    if typ is None or value is None or isinstance(value, bool):
        if typ is not None and isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return value
    if isinstance(value, (int, float)):
        if typ is int and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
            return int(value)
        return value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{source}: {key}: {value!r} is not a number") from None
        if typ is int:
            if not number.is_integer():
                raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
            return int(number)
        return number
    raise ConfigError(f"{source}: {key}: expected a number, got {type(value).__name__} {value!r}")


def unknown_option(name: str, method: str, options: list[str]) -> ConfigError:
    """The error for a flag that is neither a training flag nor an option of ``method``: the suggestion comes from
    both lists (``--max-step`` → ``--max-steps``; ``--learning_rate`` → ``--lr``)."""
    dashed = name.replace("_", "-")
    train_flags = [k.replace("_", "-") for k in sorted(TRAIN_KEYS)]
    method_flags = [o.replace("_", "-") for o in options]
    aliases = [a.replace("_", "-") for a, target in METHOD_ALIASES.items() if target in options]
    aliases += list(TRAIN_ALIASES_DASHED)
    near = closest(dashed, [*train_flags, *method_flags, *aliases])
    hint = f" (did you mean {', '.join('--' + n for n in near)}?)" if near else ""
    return ConfigError(f"unknown option --{dashed}{hint}: it is neither a training flag (peftkit train --help) nor an "
                       f"option of method {method!r} ({', '.join(method_flags)})")
