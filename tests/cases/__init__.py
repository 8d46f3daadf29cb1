"""Method cases for the contract suite: each module here exports ``CASES``, a list of :class:`Case`.

Adding a method = adding ``tests/cases/<method>.py``; ``tests/test_contract.py`` runs every
case through the same checks.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Case:
    id: str
    model: str  # a key of tests.models.MODELS
    config: Callable[[], Any]  # () -> peftkit config
    identity_at_init: bool = True
    mergeable: bool = True
    hf: bool = False  # has a Hugging Face PEFT form
    mixed: bool = True  # mixed batches supported
    tol: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict)


def all_cases() -> list[Case]:
    out: list[Case] = []
    for info in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        out.extend(getattr(mod, "CASES", []))
    return out
