"""Checkable answers in generated text (GSM8K style: the final answer follows ``####``)."""

from __future__ import annotations

import re

# An optional minus sign that is not a subtraction ("16-3" is 16 and 3; "x = -3" is -3), then an integer with
# thousands separators ("1,234") or plain digits, then an optional decimal part.
_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w)\]])-)?\.\d+")


def normalize_number(s: str) -> str:
    """Canonical text of a number: commas dropped, trailing decimal zeros dropped (``"1,234.50"`` → ``"1234.5"``)."""
    s = s.replace(",", "").strip()
    neg = s.startswith("-")
    s = s.lstrip("+-")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return "-" + s if neg and s != "0" else s


def extract_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style solution or of a model's generation, or ``None``.

    The first number after the first ``####`` (the answer marker; a model may keep generating past it), else the
    last number in the text. Numbers are normalized with :func:`normalize_number`, so ``"#### 1,234"`` gives
    ``"1234"`` and ``"$3.50"`` gives ``"3.5"``. When ``####`` is followed by text but no number, that text
    (stripped) is the answer.
    """
    if not text:
        return None
    if "####" in text:
        tail = text.split("####", 1)[1]
        m = _NUMBER.search(tail)
        if m:
            return normalize_number(m.group(0))
        tail = tail.strip().splitlines()[0].strip() if tail.strip() else ""
        return tail or None
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None
