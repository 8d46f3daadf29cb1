"""Exceptions raised by peftkit, and the helper that suggests the closest valid name.

Every error names the culprit (a module path, an adapter name, a tensor) and, where a
choice was wrong, the closest valid choices. Errors are raised before any module of the
user's model is touched.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftkitError(Exception):
    """Base class of every error peftkit raises on purpose."""


class ConfigError(PeftkitError, ValueError):
    """A method configuration is invalid on its own or for the model it is applied to."""


class TargetError(ConfigError):
    """A target pattern matches nothing, or a matched module cannot take the method."""


class AdapterNotFoundError(PeftkitError, KeyError):
    """An adapter name that is not attached to the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class NotMergeableError(PeftkitError):
    """A merge was asked for an adapter whose method cannot be folded into the weights."""


class AdapterLoadError(PeftkitError):
    """A saved adapter is missing, corrupt, or does not fit the model it is loaded into."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` choices closest to ``word`` (by similarity of the full string and of its last part)."""
    pool = sorted(set(choices))
    if not pool:
        return []
    found = difflib.get_close_matches(word, pool, n=n, cutoff=0.5)
    if len(found) < n:
        tail = word.rsplit(".", 1)[-1]
        tails: dict[str, str] = {}
        for c in pool:
            tails.setdefault(c.rsplit(".", 1)[-1], c)
        for t in difflib.get_close_matches(tail, list(tails), n=n, cutoff=0.5):
            if tails[t] not in found:
                found.append(tails[t])
    return found[:n]


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean 'a', 'b'?)' or '' when nothing is close."""
    found = closest(word, choices, n)
    if not found:
        return ""
    return " (did you mean " + ", ".join(repr(f) for f in found) + "?)"
