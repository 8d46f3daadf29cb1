"""Length-bucketed batches of token examples, padded into tensors.

Bucketing: the (shuffled) examples are cut into chunks of about 50 batches; each chunk is sorted by length and
split into batches, so a batch holds examples of similar length and little padding; then the order of the batches
is shuffled so that training does not see lengths in order. The order depends only on ``seed``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from ..core.errors import ConfigError

BUCKET_BATCHES = 50
IGNORE_INDEX = -100


def batches(examples: Sequence[dict[str, Any]], batch_size: int, pad_id: int, shuffle: bool, seed: int,
            bucket: bool = True, drop_last: bool = False) -> list[dict[str, torch.Tensor]]:
    """Group ``examples`` into padded batches of ``batch_size``; every example appears exactly once per call
    (except those of an incomplete batch when ``drop_last``).

    Padding is on the right: ``input_ids`` with ``pad_id``, ``attention_mask`` (built as ones when an example has
    none) and ``token_type_ids`` with 0, token-level ``labels`` (lists) with -100; scalar ``labels`` become a
    1-d tensor. The result depends only on the examples and ``seed``, not on any global random state.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(pad_id, int):
        raise ConfigError(f"pad_id must be an integer token id, got {pad_id!r} (does the tokenizer have a pad token?)")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    groups: list[list[int]] = []
    if bucket:
        chunk = batch_size * BUCKET_BATCHES
        for s in range(0, len(order), chunk):
            part = sorted(order[s: s + chunk], key=lambda i: len(examples[i]["input_ids"]))
            groups.extend(part[k: k + batch_size] for k in range(0, len(part), batch_size))
    else:
        groups = [order[k: k + batch_size] for k in range(0, len(order), batch_size)]
    if drop_last:
        groups = [g for g in groups if len(g) == batch_size]
    if shuffle and bucket:
        rng.shuffle(groups)
    return [collate([examples[i] for i in g], pad_id) for g in groups]


def collate(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad one list of examples into a batch of tensors (see :func:`batches`)."""
    width = max(len(x["input_ids"]) for x in items)
    out: dict[str, torch.Tensor] = {}
    keys = list(items[0])
    if "attention_mask" not in keys:
        keys.append("attention_mask")
    for key in keys:
        if key == "attention_mask":
            rows = [x.get("attention_mask") or [1] * len(x["input_ids"]) for x in items]
        else:
            missing = [j for j, x in enumerate(items) if key not in x]
            if missing:
                raise ConfigError(f"example {missing[0]} of a batch lacks {key!r}, which other examples have")
            rows = [x[key] for x in items]
        if not isinstance(rows[0], (list, tuple)):
            out[key] = torch.tensor(rows)
            continue
        value = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        out[key] = torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)
    return out


def pad_count(batch_list: Sequence[dict[str, torch.Tensor]]) -> int:
    """Total number of padding positions in ``batch_list`` (for measuring what bucketing saves)."""
    return int(sum((b["attention_mask"] == 0).sum() for b in batch_list))
