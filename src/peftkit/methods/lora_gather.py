"""Mixed batches of LoRA adapters in two batched products: ``y_i = base_i + s_{a(i)} B_{a(i)} A_{a(i)} x_i``.

The factors of the adapters on one site are stacked once, ``𝔸 = [0, A_1, ..., A_n]`` of shape
``(n+1, r_max, in)`` and ``𝔹 = [0, s_1 B_1, ..., s_n B_n]`` of shape ``(n+1, out, r_max)`` (ranks
below ``r_max`` padded with zero rows/columns, which add exact zeros; slot 0 serves rows without an
adapter). Row ``i`` of the batch gathers its adapter's slot ``k(i)``, and the whole batch costs

    h = bmm(x, 𝔸[k]ᵀ)            (rows, tokens, r_max)
    y = baddbmm(base, h, 𝔹[k]ᵀ)   (rows, tokens, out)

whatever the number of adapters: no loop over rows or adapters. For inference (no gradient needed)
the stacks are cached on the site and rebuilt only when its adapters change (loaded, deleted, or a
factor written in place, moved or cast: the tensors' version counters and storages are part of the
cache key); the slot index of each row is computed once per ``mixed_batch`` block for all sites that share the same adapters,
and the gathered factors are kept while the rows' adapters stay the same (consecutive decode steps).
While gradients flow into the factors the stacks are built per call, so autograd reaches them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class FactorStack:
    """The stacked factors of some LoRA layers of one site, and what they were built from."""

    names: tuple[str, ...]
    a: torch.Tensor  # (n+1, r_max, in)
    b: torch.Tensor  # (n+1, out, r_max), scaling folded in
    site_modules: tuple = ()  # every adapter module of the site when built (identity)
    parts: tuple = ()  # per stacked layer: (module, A, B, scaling, state of A and B)

    def still_valid(self, site: Any) -> bool:
        if tuple(site.adapters._modules.values()) != self.site_modules:
            return False
        for m, a, b, s, state in self.parts:
            p = m._parameters
            if p["lora_A"] is not a or p["lora_B"] is not b or m.scaling != s or _state(a, b) != state:
                return False
        return True


def _state(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """What changes when a factor is written in place (version) or moved / cast (``.data`` replaced)."""
    return a._version, b._version, a.data_ptr(), b.data_ptr(), a.dtype, b.dtype


def build_stack(mods: dict[str, Any]) -> FactorStack:
    """Stack ``mods`` (name → LoRA layer; same dtype and device) into ``(n+1, ...)`` factor tensors."""
    r_max = max(m.r for m in mods.values())
    ref = next(iter(mods.values()))
    a_parts = [ref.lora_A.new_zeros((r_max, ref.lora_A.shape[1]))]
    b_parts = [ref.lora_B.new_zeros((ref.lora_B.shape[0], r_max))]
    for m in mods.values():
        pad = r_max - m.r
        a_parts.append(F.pad(m.lora_A, (0, 0, 0, pad)) if pad else m.lora_A)
        b = m.lora_B * m.scaling
        b_parts.append(F.pad(b, (0, pad)) if pad else b)
    parts = tuple((m, m.lora_A, m.lora_B, m.scaling, _state(m.lora_A, m.lora_B)) for m in mods.values())
    return FactorStack(tuple(mods), torch.stack(a_parts), torch.stack(b_parts), parts=parts)


def cached_stack(site: Any, build: Any) -> FactorStack:
    """The site's cached stack for inference, rebuilt by ``build()`` when the site's adapters changed."""
    cached: FactorStack | None = site.__dict__.get("_lora_factor_stack")
    if cached is None or not cached.still_valid(site):
        with torch.no_grad():
            cached = build()
        cached.site_modules = tuple(site.adapters._modules.values())
        site.__dict__["_lora_factor_stack"] = cached  # a plain attribute: not a buffer, never saved
    return cached


def slots(stack: FactorStack, names_per_row: list[str | None], memo: dict | None,
          device: torch.device) -> torch.Tensor:
    """Each row's slot in ``stack`` (0: no adapter of this site); shared by every site with the same names."""
    key = ("lora_slots", stack.names, device)
    if memo is not None and key in memo:
        return memo[key]
    lookup = {n: i + 1 for i, n in enumerate(stack.names)}
    ids = torch.tensor([lookup.get(n, 0) for n in names_per_row], dtype=torch.long, device=device)
    if memo is not None:
        memo[key] = ids
    return ids


def row_factors(site: Any, stack: FactorStack, names_per_row: list[str | None], memo: dict,
                device: torch.device, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(𝔸[k]ᵀ, 𝔹[k]ᵀ)``: each row's factors, ``(rows, in, r_max)`` and ``(rows, r_max, out)``.

    ``keep`` (inference): remembered on the site with the row assignment, so the decode steps between
    two changes of the running batch (most of them) reuse them instead of gathering again."""
    rows_key = memo.get("lora_rows")
    if rows_key is None:
        rows_key = memo["lora_rows"] = tuple(names_per_row)
    if keep:
        hit = site.__dict__.get("_lora_row_factors")
        if hit is not None and hit[0] is stack and hit[1] == rows_key:
            return hit[2], hit[3]
    ids = slots(stack, names_per_row, memo, device)
    a = stack.a.index_select(0, ids).transpose(1, 2)
    b = stack.b.index_select(0, ids).transpose(1, 2)
    if keep:
        site.__dict__["_lora_row_factors"] = (stack, rows_key, a, b)
    return a, b


def gathered_lora(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """``base + bmm(bmm(x, a), b)`` per row, with ``a, b`` from :func:`row_factors`."""
    rows = x.shape[0]
    xr = x.reshape(rows, -1, x.shape[-1])
    if xr.dtype != a.dtype:
        xr = xr.to(a.dtype)
    h = torch.bmm(xr, a)
    yr = base_out.reshape(rows, -1, base_out.shape[-1])
    if yr.dtype == a.dtype and not torch.is_grad_enabled():  # inference: accumulate into the base output
        return yr.baddbmm_(h, b).view(base_out.shape)
    if yr.dtype == a.dtype:
        out = torch.baddbmm(yr, h, b)
    else:
        out = yr + torch.bmm(h, b).to(yr.dtype)
    return out.reshape(base_out.shape)
