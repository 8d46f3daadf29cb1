"""Learning-rate schedules with linear warmup (the conventions of transformers' schedulers).

With ``W`` warmup steps and ``T`` total optimizer steps, the multiplier of the base lr at step ``s``
(0-based, the value used by the ``s``-th optimizer step) is

* warmup (``s < W``): ``s / W``
* linear:   ``max(0, (T - s) / (T - W))``
* cosine:   ``0.5 · (1 + cos(π · (s - W) / (T - W)))``
* constant: ``1``
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..core.errors import ConfigError
from .config import SCHEDULES


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` < 1 is a fraction of ``total_steps`` (rounded up), otherwise a step count."""
    if warmup < 1:
        return math.ceil(warmup * total_steps)
    return int(warmup)


def lr_multiplier(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The function ``step -> lr multiplier`` described in the module docstring."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule: unknown value {schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def fn(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return fn


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: float,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_multiplier` to every parameter group's lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, warmup_steps(warmup, total_steps),
                                                                       total_steps))
