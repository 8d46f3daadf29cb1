"""The running batch's key/value cache: one left-padded tensor pair per layer, rows joining and leaving.

Every request owns one row. Row ``i`` holds its tokens right-aligned in columns ``T - n_i .. T - 1``
(``n_i`` its length so far) and zeros on the left; ``mask[i, t] = 1`` exactly on its own columns,
so attention never sees another request's tokens or the padding, and position ids are counted per
row (``n_i`` for the next token). Joining requests are prefilled together and concatenated in
(the shorter side padded on the left); finished rows are dropped with ``index_select`` and the
columns no row uses any more are trimmed from the left. This is what ``model.generate`` does for
a left-padded batch, except that the batch changes between decode steps (continuous batching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ConfigError(f"the model returned a {type(cache).__name__} cache without per-layer tensors; "
                          "serving needs transformers >= 4.56 (DynamicCache with .layers)")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise ConfigError(f"cache layer {type(layer).__name__} is not supported by the serving engine "
                              "(sliding-window and recurrent caches cannot be re-batched); use a model with full attention")
    return layers


@dataclass
class BatchKV:
    """The cache (a transformers ``DynamicCache``) and the attention mask ``[rows, columns]`` of the running batch."""

    cache: object
    mask: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def lengths(self) -> torch.Tensor:
        """Tokens per row so far (the position id of each row's next token)."""
        return self.mask.sum(-1)

    def pad_left(self, n: int) -> None:
        if n <= 0:
            return
        for layer in _layers(self.cache):
            layer.keys = F.pad(layer.keys, (0, 0, n, 0))
            layer.values = F.pad(layer.values, (0, 0, n, 0))
        self.mask = F.pad(self.mask, (n, 0))

    def append_column(self) -> None:
        """The mask grows by one column of ones: the token every row is about to feed."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep ``rows`` (in that order), then drop the left columns no kept row uses."""
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        self.mask = self.mask.index_select(0, rows)
        self.trim()

    def trim(self) -> None:
        used = self.mask.any(0)
        if self.rows == 0 or bool(used[0]):
            return
        first = int(used.to(torch.int8).argmax()) if bool(used.any()) else self.width
        for layer in _layers(self.cache):
            layer.keys = layer.keys[..., first:, :]
            layer.values = layer.values[..., first:, :]
        self.mask = self.mask[:, first:]

    def extend(self, other: BatchKV) -> None:
        """Append ``other``'s rows after this batch's rows (both right-aligned to a common width)."""
        width = max(self.width, other.width)
        self.pad_left(width - self.width)
        other.pad_left(width - other.width)
        mine, theirs = _layers(self.cache), _layers(other.cache)
        if len(mine) != len(theirs):
            raise RuntimeError("caches with different layer counts")  # pragma: no cover
        for a, b in zip(mine, theirs, strict=True):
            a.keys = torch.cat([a.keys, b.keys], dim=0)
            a.values = torch.cat([a.values, b.values], dim=0)
        self.mask = torch.cat([self.mask, other.mask], dim=0)


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of prompts right-aligned in one tensor."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, width - len(p):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (padding gets 0 too)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
