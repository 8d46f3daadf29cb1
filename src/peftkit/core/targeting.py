"""Which modules of a model a config targets.

Pattern forms accepted in ``target_modules`` / ``exclude_modules``:

* an exact module name (``"model.layers.0.self_attn.q_proj"``) or a dotted suffix (``"q_proj"``,
  ``"self_attn.q_proj"``);
* a glob with ``*``/``?``/``[...]`` (``"layers.*.mlp.*_proj"``), matched against the full name
  or any dotted suffix;
* a regular expression prefixed with ``re:`` (``"re:.*\\.(q|v)_proj$"``), matched against the full name;
* a module class (``torch.nn.Linear``) or its class name (``"Linear"``);
* ``"all-linear"``: every ``nn.Linear``/``Conv1D`` except the output head.

Every pattern must match at least one module, even when another pattern matches: a pattern
that matches nothing is a typo, and the error names it with the closest module names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from torch import nn

from .errors import ConfigError, TargetError, closest
from .layers import is_linear_like
from .patterns import compile_pattern, fullmatch
from .targets import OUTPUT_HEADS

ALL_LINEAR = "all-linear"
_GLOB_CHARS = set("*?[")


def as_list(patterns: Any) -> list:
    """``None`` → ``[]``, one pattern → ``[pattern]``, a sequence → a list."""
    if patterns is None:
        return []
    if isinstance(patterns, (str, type)):
        return [patterns]
    return list(patterns)


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def pattern_matches(pattern: Any, name: str, module: nn.Module, head_names: set[str]) -> bool:
    if isinstance(pattern, type):
        return isinstance(module, pattern)
    if not isinstance(pattern, str):
        raise ConfigError(f"target pattern {pattern!r} must be a string or a module class")
    if pattern == ALL_LINEAR:
        return is_linear_like(module) and name not in head_names
    if pattern.startswith("re:"):
        return fullmatch(pattern[3:], name, "target pattern")
    if any(c in _GLOB_CHARS for c in pattern):
        return any(fnmatch.fnmatchcase(s, pattern) for s in _suffixes(name))
    if name == pattern or name.endswith("." + pattern):
        return True
    return type(module).__name__ == pattern


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s): the module returned by ``get_output_embeddings`` and common head names."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:
            head = None
        if head is not None:
            for n, m in model.named_modules():
                if m is head:
                    heads.add(n)
    for n, _ in model.named_modules():
        if n.split(".")[-1] in OUTPUT_HEADS:
            heads.add(n)
    if not heads:  # a plain network: its last linear layer is the head
        last = [n for n, m in model.named_modules() if is_linear_like(m)]
        if last:
            heads.add(last[-1])
    return heads


def _check_regex(p: Any) -> None:
    if isinstance(p, str) and p.startswith("re:"):
        compile_pattern(p[3:], f"target pattern {p!r}")


def candidate_modules(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """Named modules that can be targeted: not the root, not peftkit's own modules."""
    from .adapter import AdapterModule
    from .site import AdapterSite

    skip = set(skip)
    out = []
    inside_site: list[str] = []
    for name, module in model.named_modules():
        if not name or name in skip:
            continue
        if any(name.startswith(p + ".adapters") for p in inside_site) or isinstance(module, AdapterModule):
            continue
        if isinstance(module, AdapterSite):
            inside_site.append(name)
            continue
        out.append((name, module))
    return out


def display_name(name: str) -> str:
    """The user's name of a module inside a site: ``a.q_proj.base`` is shown as ``a.q_proj``."""
    return name[: -len(".base")] if name.endswith(".base") else name.replace(".base.", ".")


def resolve_targets(model: nn.Module, target_modules: Any, exclude_modules: Any = None,
                    default: list[str] | None = None) -> list[str]:
    """Module names (as in ``model.named_modules()``) selected by the patterns, in model order.

    Raises :class:`TargetError` naming every pattern that matches nothing, with the closest names.
    """
    patterns = as_list(target_modules)
    if not patterns:
        if not default:
            raise ConfigError(
                "target_modules is empty and there is no default for this model; "
                "give target_modules (names, globs, 're:regex', module classes or 'all-linear')"
            )
        patterns = list(default)
    excludes = as_list(exclude_modules)
    for p in patterns + excludes:
        _check_regex(p)
    heads = output_head_names(model)
    modules = candidate_modules(model)
    hits: dict[int, int] = {i: 0 for i in range(len(patterns))}
    selected: list[str] = []
    for name, module in modules:
        user_name = display_name(name)
        matched = False
        for i, p in enumerate(patterns):
            if pattern_matches(p, user_name, module, heads):
                hits[i] += 1
                matched = True
        if matched and not any(pattern_matches(p, user_name, module, heads) for p in excludes):
            selected.append(name)
    missing = [patterns[i] for i, n in hits.items() if n == 0]
    if missing:
        names = [display_name(n) for n, _ in modules]
        lines = []
        leaves = list(dict.fromkeys(display_name(n).rsplit(".", 1)[-1] for n, m in modules
                                    if n and next(m.parameters(recurse=False), None) is not None))
        for p in missing:
            near = closest(str(p), names) if isinstance(p, str) else []
            if near:
                hint = f"; closest module names: {', '.join(near)}"
            else:
                shown = ", ".join(leaves[:15]) + (", ..." if len(leaves) > 15 else "")
                hint = f"; the model's layers are named (last part): {shown}" if leaves else ""
            lines.append(f"target pattern {p!r} matches no module of {type(model).__name__}{hint}")
        raise TargetError("; ".join(lines))
    return selected
