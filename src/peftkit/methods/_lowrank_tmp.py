"""Temporary stand-in for core.config.LowRankOptions until the seam lands (deleted after the merge)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..core.config import AdapterConfig, pattern_value, positive_int
from ..core.errors import ConfigError


@dataclass
class LowRankOptions(AdapterConfig):
    r: int = 8
    alpha: float = 8.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def validate(self) -> None:
        owner = type(self).__name__
        positive_int(owner, "r", self.r)
        for k, v in self.rank_pattern.items():
            positive_int(owner, f"rank_pattern[{k!r}]", v)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            raise ConfigError(f"{owner}: alpha must be a number, got {self.alpha!r}")

    def rank_for(self, name: str) -> int:
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return pattern_value(self.alpha_pattern, name, self.alpha)

    def scale_for(self, name: str) -> float:
        r, a = self.rank_for(name), self.alpha_for(name)
        return a / math.sqrt(r) if self.use_rslora else a / r
