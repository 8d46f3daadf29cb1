"""Reading and writing safetensors files one tensor at a time, with memory bounded by one tensor.

A safetensors file is ``u64 header length (little endian) | JSON header | raw tensor bytes``; the
header maps each name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the
data section). :class:`TensorFile` reads the header and then one tensor at a time with ``readinto``
into a fresh buffer (no memory map, so pages of tensors already merged do not stay resident and
peak RSS really is bounded by the tensors in flight). :class:`StreamWriter` writes the header
first (every shape and dtype is known before the merge starts) and then each tensor's bytes as
they are produced, into a temporary file renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..core.errors import AdapterLoadError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


class TensorFile:
    """The header of one safetensors file, and its tensors read one by one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise ValueError(f"header length {n} is implausible")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise AdapterLoadError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, dict[str, Any]] = header
        for key, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise AdapterLoadError(f"{self.path}: tensor {key} has unsupported dtype {e.get('dtype')!r}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def nbytes(self, key: str) -> int:
        b, e = self.entries[key]["data_offsets"]
        return e - b

    def get(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buf) != len(buf):
                raise AdapterLoadError(f"{self.path}: truncated while reading tensor {key}")
        dtype = DTYPES[e["dtype"]]
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class StreamWriter:
    """Write ``{name: (shape, dtype)}`` declared up front, then the tensors in the declared order.

    ``close()`` fsyncs and renames the temporary file to ``path``; ``abort()`` removes it.
    """

    def __init__(self, path: Path, layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = metadata
        self.order: list[str] = []
        self.expect: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in layout:
            size = _dtype_size(dtype)
            for d in shape:
                size *= d
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            self.order.append(name)
            self.expect[name] = (tuple(shape), dtype)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.f = os.fdopen(fd, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise RuntimeError(f"tensor {name} written out of the declared order")
        shape, dtype = self.expect[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"tensor {name}: declared {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        self.next += 1
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self.f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))

    def close(self) -> None:
        if self.next != len(self.order):
            raise RuntimeError(f"only {self.next} of {len(self.order)} tensors were written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
