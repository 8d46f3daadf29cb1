"""The compressed adapter format (written by ``peftkit.compress``, read transparently by ``peftkit.load``).

A folder holding

* ``peftkit_compressed.json`` — the adapter's identity as in peftkit's own format (name, method
  config, targets, layer facts, base model) plus the compression settings and sizes;
* ``adapter.pkc`` — ``LZMA( u32 n | n bytes of JSON: {tensor: record} | payloads )``: each tensor's
  encoding record (:mod:`peftkit.formats.tensor_codec`: ``raw``, ``compeft``, ``int8`` or ``int4``; shape,
  dtype, scale, and the offset and length of its payload) followed by the payloads back to back.
  Shared tensors are keyed ``__shared__.<name>``.

The folder is written atomically as a whole (``core.files.write_folder``). Reading decodes every
tensor back to its dtype, so the result is an ordinary ``AdapterState``; nothing here knows about models.
"""

from __future__ import annotations

import json
import lzma
import struct
from pathlib import Path
from typing import Any

import torch

from ..core.adapter_state import AdapterState, total_size
from ..core.errors import AdapterLoadError, ConfigError
from ..core.files import FolderReader, json_to_bytes, parse_json
from ..core.registry import config_from_dict

CONFIG_FILE = "peftkit_compressed.json"
DATA_FILE = "adapter.pkc"
NAME = "peftkit-compressed"
FORMAT_VERSION = 1
SHARED_PREFIX = "__shared__."
Records = dict[str, tuple[dict[str, Any], bytes]]


def detect(reader: FolderReader) -> bool:
    return reader.exists(CONFIG_FILE)


def owned(path: Path) -> bool:
    """Entries of an adapter folder that writing a compressed adapter replaces."""
    return path.name in (CONFIG_FILE, DATA_FILE) or (path.is_dir() and (path / CONFIG_FILE).is_file())


def files(state: AdapterState, records: Records, shared: Records, settings: dict[str, Any], version: str) -> dict[str, bytes]:
    """``{relative path: bytes}`` of the compressed adapter (``records``/``shared``: encoded tensors by name)."""
    table: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    items = list(records.items()) + [(SHARED_PREFIX + k, v) for k, v in shared.items()]
    for key, (rec, data) in items:
        table[key] = {**rec, "offset": offset, "length": len(data)}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(table, separators=(",", ":")).encode()
    blob = lzma.compress(struct.pack("<I", len(head)) + head + b"".join(chunks), preset=9 | lzma.PRESET_EXTREME)
    meta = {
        "format": NAME,
        "format_version": FORMAT_VERSION,
        "peftkit_version": version,
        "compression": settings,
        "name": state.name,
        "method": state.config.method,
        "config": state.config.to_dict(),
        "targets": state.targets,
        "layers": state.layers,
        "base_model": state.base,
        "sizes": {"tensor_bytes": total_size(state), "compressed_bytes": len(blob)},
    }
    return {DATA_FILE: blob, CONFIG_FILE: json_to_bytes(meta)}


def read(reader: FolderReader, name: str | None = None) -> AdapterState:
    """The adapter in the compressed folder of ``reader``, decoded."""
    from .tensor_codec import decode

    root = reader.root
    where = root / CONFIG_FILE
    meta = parse_json(reader.read(CONFIG_FILE), where)
    if meta.get("format") != NAME or not isinstance(meta.get("config"), dict):
        raise AdapterLoadError(f"{where}: not a compressed peftkit adapter (format {meta.get('format')!r})")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise AdapterLoadError(f"{where}: format version {meta.get('format_version')!r}; this peftkit reads "
                               f"up to {FORMAT_VERSION}")
    try:
        config = config_from_dict(meta["config"])
    except (ConfigError, TypeError, ValueError) as e:
        raise AdapterLoadError(f"{where}: invalid config: {e}") from None
    data_path = root / DATA_FILE
    try:
        raw = lzma.decompress(reader.read(DATA_FILE))
        (n,) = struct.unpack("<I", raw[:4])
        table = json.loads(raw[4: 4 + n])
        body = memoryview(raw)[4 + n:]
        tensors: dict[str, torch.Tensor] = {}
        shared: dict[str, torch.Tensor] = {}
        for key, rec in table.items():
            end = rec["offset"] + rec["length"]
            if end > len(body):
                raise ValueError(f"tensor {key} runs past the end of the data")
            initial = None
            if rec.get("neutral") == "initial" and not key.startswith(SHARED_PREFIX):
                module, _, tensor = key.rpartition(".")
                layer = meta["layers"].get(module, {}) if isinstance(meta.get("layers"), dict) else {}
                start = config.initial_value(module, tensor, tuple(rec["shape"]), layer if isinstance(layer, dict) else {})
                initial = start if isinstance(start, torch.Tensor) else None
            t = decode(rec, bytes(body[rec["offset"]: end]), initial)
            if key.startswith(SHARED_PREFIX):
                shared[key[len(SHARED_PREFIX):]] = t
            else:
                tensors[key] = t
    except AdapterLoadError as e:
        raise AdapterLoadError(f"{data_path}: {e}") from None
    except (lzma.LZMAError, struct.error, ValueError, KeyError, TypeError) as e:
        raise AdapterLoadError(f"{data_path}: corrupt compressed adapter ({e})") from None
    saved = meta.get("name")
    name = name if name is not None else (saved if isinstance(saved, str) and saved else "default")
    layers = meta.get("layers") if isinstance(meta.get("layers"), dict) else {}
    base = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
    return AdapterState(name, config, meta.get("targets"), tensors, shared, layers, base)
