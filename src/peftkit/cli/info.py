"""``peftkit info``: what an adapter directory holds, with its files checked.

Each safetensors file is validated without loading it: the 8-byte header length, the JSON header,
every tensor's byte range (``dtype size × number of elements`` bytes, inside the file) and, for
peftkit's format, the names and shapes listed in ``peftkit_adapter.json``. A truncated or corrupt
file is an error naming the file and the first tensor that does not fit, so ``info`` never prints a
normal table for an adapter that cannot load. Method names are shown in lower case for both formats
(peft writes ``LORA``), and a ``--method full`` output (``extra.safetensors`` and no adapter) is
described as full fine-tuning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import AdapterLoadError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 * 2**20


def check_safetensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` of a safetensors file whose header and sizes are consistent; raises
    :class:`AdapterLoadError` naming the problem otherwise."""
    size = path.stat().st_size
    if size < 8:
        raise AdapterLoadError(f"{path}: {size} bytes, too short to be a safetensors file (truncated?)")
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > MAX_HEADER:
            raise AdapterLoadError(f"{path}: header of {n:,} bytes but the file holds {size - 8:,} after the length "
                                   "(truncated or not a safetensors file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterLoadError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise AdapterLoadError(f"{path}: the header is not a JSON object")
    data = size - 8 - n
    out: dict[str, tuple[str, list[int]]] = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = t["dtype"], [int(d) for d in t["shape"]], t["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise AdapterLoadError(f"{path}: tensor {name!r}: malformed header entry {t!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        need = numel * DTYPE_BYTES.get(dtype, 0)
        if dtype not in DTYPE_BYTES or end - begin != need or begin < 0:
            raise AdapterLoadError(f"{path}: tensor {name!r} ({dtype}, shape {shape}) spans bytes {begin}..{end}, "
                                   f"expected {need} bytes")
        if end > data:
            raise AdapterLoadError(f"{path}: tensor {name!r} ends at byte {end:,} of the data but the file holds "
                                   f"{data:,} (truncated?)")
        out[name] = (dtype, shape)
    return out


def adapter_root(path: Path) -> Path:
    """The adapter directory of ``path`` (a directory, or a file inside one)."""
    if path.is_file():
        return path.parent
    if not path.is_dir():
        raise AdapterLoadError(f"{path} does not exist (give an adapter directory or a file in one)")
    return path


def describe(d: Path) -> list[str] | None:
    """A table row for the adapter in directory ``d`` (files checked), or None when ``d`` holds none."""
    from ..core.files import read_json

    if (d / "peftkit_adapter.json").is_file():
        meta = read_json(d / "peftkit_adapter.json")
        listed = meta.get("tensors", {})
        found = check_safetensors(d / "adapter.safetensors") if (d / "adapter.safetensors").is_file() else None
        if found is None:
            raise AdapterLoadError(f"{d}: peftkit_adapter.json without adapter.safetensors")
        missing = sorted(set(listed) - set(found))
        wrong = [k for k in listed if k in found and list(listed[k].get("shape", [])) != found[k][1]]
        if missing or wrong:
            raise AdapterLoadError(f"{d / 'adapter.safetensors'} does not match peftkit_adapter.json (missing: "
                                   f"{missing[:5]}, wrong shape: {wrong[:5]})")
        cfg = {k: v for k, v in meta.get("config", {}).items() if k not in ("method", "target_modules", "exclude_modules")}
        n = sum(_numel(shape) for _, shape in found.values())
        return [str(d), "peftkit", str(meta.get("method", "?")).lower(), str(len(meta.get("targets", []))),
                str(len(found)), f"{n:,}", _short(cfg)]
    if (d / "adapter_config.json").is_file():
        cfg = read_json(d / "adapter_config.json")
        weights = d / "adapter_model.safetensors"
        if not weights.is_file():
            raise AdapterLoadError(f"{d}: adapter_config.json without adapter_model.safetensors")
        found = check_safetensors(weights)
        n = sum(_numel(shape) for _, shape in found.values())
        mods = {k.rsplit(".", 2)[0] for k in found}
        shown = ("r", "lora_alpha", "use_dora", "use_rslora", "num_virtual_tokens", "oft_block_size", "modules_to_save")
        keep = {k: cfg[k] for k in shown if k in cfg}
        return [str(d), "hf peft", str(cfg.get("peft_type")).lower(), str(len(mods)), str(len(found)), f"{n:,}",
                _short(keep)]
    return None


def describe_full(d: Path) -> list[str] | None:
    """The row of a ``--method full`` output: every weight in ``extra.safetensors``, no adapter."""
    if not (d / "extra.safetensors").is_file():
        return None
    found = check_safetensors(d / "extra.safetensors")
    n = sum(_numel(shape) for _, shape in found.values())
    return [str(d), "peftkit", "full fine-tuning", "-", str(len(found)), f"{n:,}", "every weight (extra.safetensors)"]


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _short(d: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in d.items() if v not in (None, {}, [], False))
    return text if len(text) <= 70 else text[:67] + "..."
