"""peftkit's own adapter format: a folder with ``peftkit_adapter.json`` and ``adapter.safetensors``.

* ``adapter.safetensors`` — each adapted module's state keyed ``<module path>.<tensor name>``
  (module paths as in the user's model) and the adapter's shared tensors keyed
  ``__shared__.<name>``; its metadata holds a ``save_id``;
* ``peftkit_adapter.json`` — the method config, the adapted modules, the layer facts, the base
  model's class and size, every tensor's shape and dtype, and the same ``save_id``.

Several adapters go into one sub-folder each. Reading checks that the two files belong to the
same save (``save_id``) and describe the same tensors; nothing here knows about models.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch

from ..core.adapter_state import AdapterState
from ..core.errors import AdapterLoadError, ConfigError
from ..core.files import FolderReader, json_to_bytes, parse_json, parse_safetensors, tensors_to_bytes
from ..core.registry import config_from_dict

CONFIG_FILE = "peftkit_adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT_VERSION = 1
SHARED_PREFIX = "__shared__."
NAME = "peftkit"


def detect(reader: FolderReader) -> bool:
    return reader.exists(CONFIG_FILE)


def files(states: list[AdapterState], version: str) -> dict[str, bytes]:
    """``{relative path: bytes}`` of ``states`` (one adapter at the root, several in sub-folders)."""
    out: dict[str, bytes] = {}
    for state in states:
        prefix = "" if len(states) == 1 else f"{state.name}/"
        out.update({prefix + k: v for k, v in _one(state, version).items()})
    return out


def _one(state: AdapterState, version: str) -> dict[str, bytes]:
    save_id = uuid.uuid4().hex
    tensors = dict(state.tensors)
    for k, v in state.shared.items():
        tensors[SHARED_PREFIX + k] = v
    meta = {
        "format": NAME,
        "format_version": FORMAT_VERSION,
        "peftkit_version": version,
        "save_id": save_id,
        "name": state.name,
        "method": state.config.method,
        "config": state.config.to_dict(),
        "targets": state.targets,
        "layers": state.layers,
        "base_model": state.base,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
    }
    return {WEIGHTS_FILE: tensors_to_bytes(tensors, {"save_id": save_id}), CONFIG_FILE: json_to_bytes(meta)}


def owned(path: Path) -> bool:
    """Entries of an adapter folder that a save replaces (the rest is carried over)."""
    return path.name in (CONFIG_FILE, WEIGHTS_FILE) or (path.is_dir() and (path / CONFIG_FILE).is_file())


def read(reader: FolderReader, name: str | None = None) -> AdapterState:
    """The adapter in the folder of ``reader``."""
    root = reader.root
    meta = parse_json(reader.read(CONFIG_FILE), root / CONFIG_FILE)
    where = root / CONFIG_FILE
    if meta.get("format") != NAME or not isinstance(meta.get("config"), dict):
        raise AdapterLoadError(f"{where}: not a peftkit adapter file (fields format/config/targets)")
    targets = meta.get("targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets)):
        raise AdapterLoadError(f"{where}: targets must be a list of module names, got {targets!r}")
    if targets is not None and len(set(targets)) != len(targets):
        dup = next(t for t in targets if targets.count(t) > 1)
        raise AdapterLoadError(f"{where}: targets lists {dup!r} twice")
    try:
        config = config_from_dict(meta["config"])
    except (ConfigError, TypeError, ValueError) as e:
        raise AdapterLoadError(f"{where}: invalid config: {e}") from None
    raw = reader.read(WEIGHTS_FILE)
    tensors = parse_safetensors(raw, root / WEIGHTS_FILE)
    _check_same_save(meta, raw, tensors, root)
    shared = {k[len(SHARED_PREFIX):]: v for k, v in tensors.items() if k.startswith(SHARED_PREFIX)}
    own = {k: v for k, v in tensors.items() if not k.startswith(SHARED_PREFIX)}
    saved_name = meta.get("name")
    if name is None:
        name = saved_name if isinstance(saved_name, str) and saved_name else "default"
    layers = meta.get("layers") if isinstance(meta.get("layers"), dict) else {}
    base = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
    return AdapterState(name, config, targets, own, shared, layers, base)


def _check_same_save(meta: dict[str, Any], raw: bytes, tensors: dict[str, torch.Tensor], root: Path) -> None:
    """The config and the weights must come from one save (a torn or mixed folder is refused)."""
    import json
    import struct

    file_id = None
    try:
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        file_id = (header.get("__metadata__") or {}).get("save_id")
    except Exception:  # parse_safetensors already accepted the file; metadata is optional
        file_id = None
    meta_id = meta.get("save_id")
    if meta_id is not None and file_id is not None and meta_id != file_id:
        raise AdapterLoadError(f"{root}: {CONFIG_FILE} and {WEIGHTS_FILE} come from different saves "
                               "(the folder was changed by another program while it was read)")
    listed = meta.get("tensors")
    if isinstance(listed, dict) and set(listed) != set(tensors):
        missing = sorted(set(listed) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(listed))[:3]
        raise AdapterLoadError(f"{root}: {WEIGHTS_FILE} does not hold the tensors {CONFIG_FILE} lists "
                               f"(missing {missing}, unlisted {extra})")
