"""Atomic file writes and checked reads of safetensors and JSON files.

A save writes each file to a temporary name in the same directory, flushes it to disk and
renames it over the destination, so an interrupted or failed save leaves the files that
were there intact. Reads turn every low-level failure into an :class:`AdapterLoadError`
that names the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import AdapterLoadError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(clean, metadata=metadata)


def json_to_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def write_files(files: dict[Path, bytes]) -> None:
    """Write several files, each atomically; the data is prepared before the first rename."""
    for path, data in files.items():
        atomic_write_bytes(path, data)


def read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise AdapterLoadError(f"{path}: file not found") from None
    except OSError as e:
        raise AdapterLoadError(f"{path}: cannot read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterLoadError(f"{path}: file not found")
    try:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise AdapterLoadError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    """Legacy ``adapter_model.bin`` files, read with ``weights_only=True`` (no arbitrary code)."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterLoadError(f"{path}: cannot read as a weights-only torch file ({e})") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path}: expected a dict of tensors")
    return data
