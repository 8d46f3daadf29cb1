"""Sequence-classification examples: a text (or text pair) and a label → token ids and a label index.

Labels may be strings (``"positive"``) or integers (``0``/``1``, also as the text ``"1"`` read from a CSV/TSV
file). The label set is either given (``labels=[...]``, e.g. the one recorded with a trained adapter, so that
evaluation data maps to the same indices) or inferred from the data: sorted names, or numeric order when
every label is an integer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.errors import ConfigError, did_you_mean

_INT = re.compile(r"^[-+]?\d+$")
_KEEP = ("input_ids", "attention_mask", "token_type_ids")


def build_classification_examples(records: Iterable[Mapping[str, Any]], tokenizer: Any, max_length: int,
                                  text_col: str = "text", text_pair_col: str | None = None, label_col: str = "label",
                                  labels: list[str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Tokenize classification records; returns ``(examples, label_names)``.

    Each example is ``{"input_ids", "attention_mask", ["token_type_ids"], "labels": int}`` with plain lists
    (no padding: :func:`peftkit.data.batches` pads). Texts are truncated to ``max_length`` tokens, special
    tokens included (for a pair, the longer text is cut first).

    With ``labels`` given, a label is looked up by name; an integer label (or integer text) that is not a name
    is taken as an index when none of the names is an integer, so ``labels=["negative", "positive"]`` reads
    SST-2's 0/1. Without ``labels``, the names are the sorted distinct labels (integers in numeric order).

    Raises:
        ConfigError: a missing column (naming the closest present one), a non-text value, or a label that is not
            in ``labels`` (naming it and the known labels).
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
    records = list(records)
    if not records:
        return [], list(labels or [])
    texts, pairs, raw = [], [], []
    for i, r in enumerate(records):
        texts.append(_text(r, text_col, i))
        if text_pair_col is not None:
            pairs.append(_text(r, text_pair_col, i))
        raw.append(_label_key(_get(r, label_col, i), label_col, i))
    names = _label_names(raw) if labels is None else _check_names(labels)
    index = _label_index(raw, names, label_col, labels is not None)
    enc = tokenizer(texts, pairs if text_pair_col is not None else None, truncation=True, max_length=max_length)
    keys = [k for k in _KEEP if k in enc]
    examples = []
    for j, y in enumerate(index):
        ex: dict[str, Any] = {k: list(enc[k][j]) for k in keys}
        ex["labels"] = y
        examples.append(ex)
    return examples, names


def _get(r: Mapping[str, Any], col: str, i: int) -> Any:
    if col not in r or r[col] is None:
        what = "has no" if col not in r else "has an empty"
        raise ConfigError(f"record {i + 1} {what} column {col!r}{did_you_mean(col, r)}; "
                          f"columns present: {', '.join(map(repr, r)) or '(none)'}")
    return r[col]


def _text(r: Mapping[str, Any], col: str, i: int) -> str:
    v = _get(r, col, i)
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise ConfigError(f"record {i + 1}: column {col!r} must be text, got {type(v).__name__}")


def _label_key(v: Any, col: str, i: int) -> str:
    """The string form of a label value: ``1``, ``1.0`` and ``"1"`` are all ``"1"``."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (str, float)):
        return str(v).strip()
    raise ConfigError(f"record {i + 1}: label column {col!r} must be a string or an integer, got {type(v).__name__}")


def _label_names(keys: list[str]) -> list[str]:
    uniq = set(keys)
    if all(_INT.match(k) for k in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


def _check_names(labels: list[Any]) -> list[str]:
    names = [_label_key(x, "labels", i) for i, x in enumerate(labels)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"labels has duplicate names: {dupes}")
    if not names:
        raise ConfigError("labels is empty")
    return names


def _label_index(keys: list[str], names: list[str], col: str, given: bool) -> list[int]:
    pos = {n: j for j, n in enumerate(names)}
    by_index = given and not any(_INT.match(n) for n in names)
    out = []
    for i, k in enumerate(keys):
        if k in pos:
            out.append(pos[k])
        elif by_index and _INT.match(k) and 0 <= int(k) < len(names):
            out.append(int(k))
        else:
            raise ConfigError(f"unknown label {k!r} in record {i + 1} (column {col!r}){did_you_mean(k, names)}; "
                              f"known labels: {', '.join(map(repr, names))}")
    return out
