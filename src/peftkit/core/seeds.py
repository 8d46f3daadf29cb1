"""Per-layer random generators: one adapter seed, a different but reproducible stream for every layer.

``module_generator(seed, "model.layers.0.self_attn.q_proj")`` is a CPU ``torch.Generator`` seeded with
``(seed · 1000003 + CRC-32(module name)) mod 2⁶³``, so layers of the same shape draw different values,
and the same (seed, layer) pair always draws the same ones: a saved adapter that records its seed can
regenerate what it was built from (LoRA's initial factor, SparseFT's random subset).
"""

from __future__ import annotations

import zlib

import torch


def module_generator(seed: int, module_name: str) -> torch.Generator:
    mixed = (int(seed) * 1_000_003 + zlib.crc32(module_name.encode())) % (2**63)
    return torch.Generator().manual_seed(mixed)


def fresh_seed() -> int:
    """A seed drawn from torch's global generator (so ``torch.manual_seed`` makes it reproducible)."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())
