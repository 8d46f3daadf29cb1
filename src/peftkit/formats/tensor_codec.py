"""Tensor encodings for compressed adapters: ComPEFT (sparse ternary) and low-bit (int8 / int4) factors.

**ComPEFT** (Yadav et al. 2023, arXiv:2311.13171). A task vector ``τ = θ − θ₀`` (the change of each
tensor from its value when the adapter was built: for IA3 ``l − 1``; for a LoRA factor drawn from a
recorded seed ``A − A₀``, with ``A₀`` regenerated from the config when decoding; otherwise ``θ`` itself) is
replaced by

    τ̂ = c · m ⊙ sign(τ),     m = top-k mask of |τ| (k = ⌈density · numel⌉),

one scale ``c`` per tensor: ``scale="l2"`` (default) takes ``c = mean_{m}|τ|``, the value that
minimises ``‖τ − c m ⊙ sign τ‖₂``; ``scale="std"`` takes the paper's ``c = alpha · std(τ)``.
Stored: the kept positions as gaps between successive flat indices in LEB128 varints, the signs
bit-packed (1 bit each), the scale as float32 — then the whole file is LZMA-compressed.

**Low-bit** (``int8`` / ``int4``): symmetric per-row quantisation of each tensor seen as
``(rows, last dim)`` — ``q = round(x / s_r)``, ``s_r = max_j |x_rj| / qmax`` with ``qmax = 127`` or ``7`` —
int4 values packed two per byte, float32 row scales.

Non-floating tensors and tensors of fewer than ``min_numel`` entries are stored unchanged (``raw``).
Every encoder returns ``(record, payload)``: JSON-able facts and the bytes; :func:`decode` inverts it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..core.errors import AdapterLoadError

LOWBIT_QMAX = {"int8": 127, "int4": 7}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise AdapterLoadError(f"unknown dtype {name!r} in a compressed adapter")
    return d


def varint_encode(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of non-negative integers (7 bits per byte, high bit = more bytes follow)."""
    v = values.astype(np.uint64)
    out = bytearray()
    for x in v.tolist():
        while True:
            b = x & 0x7F
            x >>= 7
            if x:
                out.append(b | 0x80)
            else:
                out.append(b)
                break
    return bytes(out)


def varint_decode(data: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`varint_encode` for the first ``count`` values (vectorised)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    last = arr < 0x80
    ends = np.flatnonzero(last)
    if len(ends) < count:
        raise AdapterLoadError(f"compressed adapter: expected {count} varints, found {len(ends)}")
    arr = arr[: ends[count - 1] + 1] if count else arr[:0]
    group = np.concatenate([[0], np.cumsum(last[: len(arr)])[:-1]]).astype(np.int64)
    starts = np.concatenate([[0], ends[: count - 1] + 1]) if count else np.zeros(0, np.int64)
    pos = np.arange(len(arr)) - starts[group]
    out = np.zeros(count, dtype=np.int64)
    np.add.at(out, group, (arr & 0x7F).astype(np.int64) << (7 * pos))
    return out


def raw_encode(t: torch.Tensor) -> tuple[dict[str, Any], bytes]:
    c = t.detach().cpu().contiguous()
    data = c.view(torch.uint8).numpy().tobytes() if c.numel() else b""
    return {"encoding": "raw", "shape": list(c.shape), "dtype": _dtype_name(c.dtype)}, data


def compeft_encode(t: torch.Tensor, density: float, scale: str = "l2", alpha: float = 1.0,
                   offset: float | torch.Tensor = 0.0) -> tuple[dict[str, Any], bytes]:
    """ComPEFT of ``t − offset``: top-k positions, signs and one scale (see the module docstring).

    A tensor ``offset`` (the tensor's initial value) is not stored: the record says ``"neutral":
    "initial"`` and :func:`decode` must be given the same tensor back."""
    base = offset.detach().cpu().float() if isinstance(offset, torch.Tensor) else offset
    x = (t.detach().cpu().float() - base).reshape(-1)
    n = x.numel()
    k = max(1, min(n, math.ceil(density * n)))
    idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
    kept = x[idx]
    c = float(kept.abs().mean()) if scale == "l2" else float(alpha * x.std())
    gaps = np.diff(idx.numpy(), prepend=0)
    positions = varint_encode(gaps)
    signs = np.packbits((kept < 0).numpy().astype(np.uint8)).tobytes()
    record = {"encoding": "compeft", "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "k": k,
              "scale": c, "neutral": "initial" if isinstance(offset, torch.Tensor) else offset,
              "index_bytes": len(positions)}
    return record, positions + signs


def lowbit_encode(t: torch.Tensor, bits: str) -> tuple[dict[str, Any], bytes]:
    """Symmetric per-row int8 / int4 quantisation (rows = all but the last dimension)."""
    qmax = LOWBIT_QMAX[bits]
    x = t.detach().cpu().float()
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    s = rows.abs().amax(dim=1) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(rows / s[:, None]), -qmax, qmax).to(torch.int8).numpy().reshape(-1)
    if bits == "int4":
        u = (q + 8).astype(np.uint8)  # 1..15
        if u.size % 2:
            u = np.append(u, np.uint8(8))
        q_bytes = (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()
    else:
        q_bytes = q.astype(np.int8).tobytes()
    record = {"encoding": bits, "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "rows": rows.shape[0]}
    return record, s.numpy().astype(np.float32).tobytes() + q_bytes


def decode(record: dict[str, Any], data: bytes, initial: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor a record and its payload stand for (``initial``: the starting value a ComPEFT record
    with ``"neutral": "initial"`` was encoded against)."""
    enc = record.get("encoding")
    shape = [int(d) for d in record["shape"]]
    dtype = _dtype(record["dtype"])
    n = math.prod(shape)
    if enc == "raw":
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).clone()
    if enc == "compeft":
        k, nb = int(record["k"]), int(record["index_bytes"])
        gaps = varint_decode(data[:nb], k)
        idx = torch.from_numpy(np.cumsum(gaps))
        neg = np.unpackbits(np.frombuffer(data[nb:], dtype=np.uint8))[:k].astype(bool)
        vals = torch.full((k,), float(record["scale"]))
        vals[torch.from_numpy(neg)] *= -1
        neutral = record.get("neutral", 0.0)
        if neutral == "initial":
            if initial is None or list(initial.shape) != shape:
                raise AdapterLoadError("compressed adapter: a tensor was encoded against its initial value, "
                                       "which the adapter's config does not give back")
            out = initial.detach().cpu().float().reshape(-1).clone()
        else:
            out = torch.full((n,), float(neutral))
        if idx.numel() and int(idx[-1]) >= n:
            raise AdapterLoadError(f"compressed adapter: a kept position ({int(idx[-1])}) is outside the tensor ({n})")
        out[idx] += vals
        return out.reshape(shape).to(dtype)
    if enc in LOWBIT_QMAX:
        rows = int(record["rows"])
        cols = n // rows if rows else 0
        s = torch.from_numpy(np.frombuffer(data[: 4 * rows], dtype=np.float32).copy())
        body = np.frombuffer(data[4 * rows:], dtype=np.uint8)
        if enc == "int4":
            q = np.empty(body.size * 2, dtype=np.int16)
            q[0::2] = (body & 0x0F).astype(np.int16) - 8
            q[1::2] = (body >> 4).astype(np.int16) - 8
            q = q[:n]
        else:
            q = body.view(np.int8).astype(np.int16)
        vals = torch.from_numpy(q.astype(np.float32)).reshape(rows, cols) * s[:, None]
        return vals.reshape(shape).to(dtype)
    raise AdapterLoadError(f"unknown tensor encoding {enc!r} in a compressed adapter")
