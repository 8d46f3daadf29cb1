"""The compressed adapter format (written by ``peftkit.compress``, read transparently by ``peftkit.load``).

A directory holding

* ``peftkit_compressed.json`` — the adapter's identity as in peftkit's own format (name, method
  config, targets, per-layer facts, base model) plus the compression settings and sizes;
* ``adapter.pkc`` — ``LZMA( u32 n | n bytes of JSON: {tensor: record} | payloads )``: every tensor's
  encoding record (:mod:`peftkit.compress.codec`: ``raw``, ``compeft``, ``int8``, ``int4``; shape,
  dtype, scale, offset and length of its payload) followed by the payloads back to back.

Both files are written atomically (the data is prepared before the first rename). Reading decodes
every tensor back to its dtype, so the result is an ordinary ``AdapterState``.
"""

from __future__ import annotations

import json
import lzma
import struct
from pathlib import Path
from typing import Any

import torch

from ..core.errors import AdapterLoadError, ConfigError

CONFIG_FILE = "peftkit_compressed.json"
DATA_FILE = "adapter.pkc"
FORMAT = "peftkit-compressed"
FORMAT_VERSION = 1


def is_compressed(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _pack(records: dict[str, tuple[dict[str, Any], bytes]]) -> tuple[dict[str, Any], list[bytes]]:
    table: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for k, (rec, data) in records.items():
        table[k] = {**rec, "offset": offset, "length": len(data)}
        chunks.append(data)
        offset += len(data)
    return table, chunks


def write_compressed(directory: Path, state: Any, records: dict[str, tuple[dict[str, Any], bytes]],
                     shared: dict[str, tuple[dict[str, Any], bytes]], settings: dict[str, Any]) -> Path:
    """Write ``state``'s identity and the encoded ``records`` / ``shared`` tensors to ``directory``."""
    from .. import __version__
    from ..core.files import json_to_bytes, write_files

    table, chunks = _pack({**{f"t:{k}": v for k, v in records.items()}, **{f"s:{k}": v for k, v in shared.items()}})
    head = json.dumps(table, separators=(",", ":")).encode()
    blob = lzma.compress(struct.pack("<I", len(head)) + head + b"".join(chunks), preset=9 | lzma.PRESET_EXTREME)
    original = sum(t.numel() * t.element_size() for t in list(state.tensors.values()) + list(state.shared.values()))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftkit_version": __version__,
        "compression": settings,
        "name": state.name,
        "method": state.config.method,
        "config": state.config.to_dict(),
        "targets": state.targets,
        "layers": state.layers,
        "base_model": state.base,
        "sizes": {"tensor_bytes": original, "compressed_bytes": len(blob)},
    }
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory")
    write_files({directory / DATA_FILE: blob, directory / CONFIG_FILE: json_to_bytes(meta)})
    return directory


def decode_records(records: dict[str, tuple[dict[str, Any], bytes]]) -> dict[str, torch.Tensor]:
    from ..compress.codec import decode

    return {k: decode(rec, data) for k, (rec, data) in records.items()}


def read_compressed(path: str | Path) -> Any:
    """The ``AdapterState`` stored in a compressed adapter directory."""
    from ..compress.codec import decode
    from ..core.adapter_state import AdapterState
    from ..core.files import read_json
    from ..core.registry import config_from_dict

    root = Path(path)
    meta = read_json(root / CONFIG_FILE)
    if meta.get("format") != FORMAT:
        raise AdapterLoadError(f"{root / CONFIG_FILE}: not a compressed peftkit adapter (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise AdapterLoadError(f"{root / CONFIG_FILE}: format version {meta.get('format_version')} is newer than this "
                               f"peftkit reads ({FORMAT_VERSION})")
    try:
        config = config_from_dict(meta["config"])
    except (ConfigError, TypeError, KeyError) as e:
        raise AdapterLoadError(f"{root / CONFIG_FILE}: invalid config: {e}") from None
    try:
        raw = lzma.decompress((root / DATA_FILE).read_bytes())
        (n,) = struct.unpack("<I", raw[:4])
        table = json.loads(raw[4: 4 + n])
        body = memoryview(raw)[4 + n:]
        tensors: dict[str, torch.Tensor] = {}
        shared: dict[str, torch.Tensor] = {}
        for key, rec in table.items():
            data = bytes(body[rec["offset"]: rec["offset"] + rec["length"]])
            (tensors if key.startswith("t:") else shared)[key[2:]] = decode(rec, data)
    except FileNotFoundError:
        raise AdapterLoadError(f"{root / DATA_FILE}: file not found") from None
    except (lzma.LZMAError, struct.error, ValueError, KeyError) as e:
        raise AdapterLoadError(f"{root / DATA_FILE}: corrupt compressed adapter ({e})") from None
    return AdapterState(name=meta.get("name") or "default", config=config, targets=meta.get("targets"),
                        tensors=tensors, shared=shared, layers=meta.get("layers") or {}, base=meta.get("base_model") or {})
