"""Regular expressions from configs and files, matched with a time limit.

Target patterns (``re:...``) and rank/alpha patterns come from users and from adapter files.
A crafted pattern such as ``(.*.*)*z`` backtracks for minutes on a long module name, so
patterns are compiled with the ``regex`` engine and every match runs under a time limit;
a pattern that is invalid or too slow raises :class:`ConfigError` naming it.
"""

from __future__ import annotations

import functools
from typing import Any

import regex

from .errors import ConfigError

#: seconds one match may take; module names are short, so honest patterns take microseconds
MATCH_TIMEOUT = 0.05
MAX_PATTERN_LENGTH = 4096


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str, where: str) -> Any:
    if not isinstance(pattern, str):
        raise ConfigError(f"{where}: pattern {pattern!r} must be a string")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ConfigError(f"{where}: pattern of {len(pattern)} characters is too long (limit {MAX_PATTERN_LENGTH})")
    try:
        return regex.compile(pattern, flags=regex.VERSION0)
    except (regex.error, ValueError, OverflowError, RecursionError) as e:
        raise ConfigError(f"{where}: {pattern!r} is not a valid regular expression ({e})") from None


def fullmatch(pattern: str, text: str, where: str) -> bool:
    """``re.fullmatch(pattern, text)`` with a time limit."""
    compiled = compile_pattern(pattern, where)
    try:
        return compiled.fullmatch(text, timeout=MATCH_TIMEOUT) is not None
    except TimeoutError:
        raise ConfigError(f"{where}: pattern {pattern!r} takes too long to match {text!r} "
                          "(catastrophic backtracking); simplify it") from None
