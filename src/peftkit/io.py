"""``peftkit.save`` / ``peftkit.load``: adapters between a model and a folder, in either file format.

    save = extract (model → AdapterState) + write_adapters (AdapterState → folder)
    load = read_adapters (folder → AdapterState) + install (AdapterState → model)

Formats (``formats/``): ``"peftkit"`` (``peftkit_adapter.json`` + ``adapter.safetensors``) and
``"hf"`` (the Hugging Face PEFT folder format). A folder is written atomically as a whole:
readers see the old adapter or the new one, never a mix, and a failed save leaves the old
folder as it was. Loading checks everything before the model is touched and, with several
adapters, installs all of them or none.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ._version import __version__
from .core.adapter_state import AdapterState, extract, install
from .core.api import delete
from .core.errors import AdapterLoadError, ConfigError, did_you_mean
from .core.files import FolderReader, write_folder
from .core.model import active_names, adapter_names, check_names, iter_sites
from .core.sharding import check_unsharded, is_sharded, write_once_with
from .core.targeting import display_name
from .formats import compressed, hf_peft
from .formats import peftkit as native

FORMATS = ("peftkit", "hf")


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}{did_you_mean(str(format), FORMATS)}; use 'peftkit' or 'hf'")


def _check_path(path: str | Path) -> Path:
    if not isinstance(path, (str, Path)) or str(path).strip() == "":
        raise ConfigError(f"an adapter folder path is needed, got {path!r}")
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a directory")
    return root


def write_adapters(states: Sequence[AdapterState], path: str | Path, format: str = "peftkit",
                   module_names: list[str] | None = None) -> Path:
    """Write adapter values to folder ``path`` (atomically, as a whole). Several adapters: one
    sub-folder each (peftkit) or peft's layout (the first at ``path``, the others in ``path/<name>``)."""
    _check_format(format)
    root = _check_path(path)
    states = list(states)
    if not states:
        raise ConfigError("no adapter to write")
    names = [s.name for s in states]
    if len(set(names)) != len(names):
        raise ConfigError(f"two adapters named {next(n for n in names if names.count(n) > 1)!r} cannot share a folder")
    if format == "hf":
        files, owned = hf_peft.files(states, module_names), hf_peft.owned
    else:
        files, owned = native.files(states, __version__), native.owned
    write_folder(root, files, owned=lambda p: owned(p) or hf_peft.owned(p) or native.owned(p))
    return root


def read_adapters(path: str | Path, name: str | None = None, attempts: int = 5) -> list[AdapterState]:
    """The adapter(s) in folder ``path`` as values (format detected from the files).

    A folder of sub-folders gives one adapter each, named after its sub-folder; ``name``
    renames a single adapter. A folder replaced by a concurrent save is read again.
    """
    if not isinstance(path, (str, Path)) or str(path).strip() == "":
        raise ConfigError(f"an adapter folder path is needed, got {path!r}")
    root = Path(path)
    if root.is_file():
        raise AdapterLoadError(f"{root}: expected an adapter directory, got a file (pass the folder that holds it)")
    for attempt in range(attempts):
        reader = None
        try:
            reader = FolderReader(root)
            return _read_folder(reader, name)
        except AdapterLoadError as e:
            if attempt + 1 < attempts and ((reader is not None and reader.stale()) or _torn(e)):
                time.sleep(0.002 * (attempt + 1))
                continue
            raise
        finally:
            if reader is not None:
                reader.close()
    raise AssertionError("unreachable")  # pragma: no cover


def _torn(e: AdapterLoadError) -> bool:
    """A read that failed because a concurrent save swapped or removed files underneath."""
    text = str(e)
    return "file not found" in text or "no such adapter directory" in text or "different saves" in text


def _read_folder(reader: FolderReader, name: str | None) -> list[AdapterState]:
    for fmt in (native, hf_peft, compressed):  # compressed: written by peftkit.compress
        if fmt.detect(reader):
            return [fmt.read(reader, name)]
    subs = []
    for sub in reader.subfolders():
        with reader.sub(sub) as r:
            if native.detect(r) or hf_peft.detect(r):
                subs.append(sub)
    if not subs:
        raise AdapterLoadError(f"{reader.root}: no adapter here (expected {native.CONFIG_FILE} or peft's "
                               f"{hf_peft.CONFIG_FILE})")
    if name is not None and len(subs) > 1:
        raise ConfigError(f"{reader.root} holds {len(subs)} adapters; load them one by one to rename them")
    out = []
    for sub in subs:
        with reader.sub(sub) as r:
            fmt = native if native.detect(r) else hf_peft
            out.append(fmt.read(r, name if name is not None else sub))
    return out


def save(model: nn.Module, path: str | Path, name: str | None = None, format: str = "peftkit") -> Path:
    """Save adapter ``name`` (default: every attached adapter) to folder ``path``.

    ``format="peftkit"`` (default) or ``"hf"`` (the Hugging Face PEFT folder format). The folder
    is replaced atomically as a whole; files in it that are not adapter files are kept.

    On a model sharded with FSDP2 (``fully_shard``) call it on every rank: the tensors are
    gathered and rank 0 writes; every rank returns once the files exist.
    """
    _check_format(format)
    root = _check_path(path)
    names = adapter_names(model) if name is None else [name]
    if not names:
        raise ConfigError("the model has no adapter to save")
    check_names(model, names)
    states = [extract(model, n) for n in names]  # under FSDP2: gathered on every rank
    module_names = _module_names(model) if format == "hf" else None
    write_once_with(lambda: write_adapters(states, root, format, module_names), is_sharded(model))
    return root


def _module_names(model: nn.Module) -> list[str]:
    names = {display_name(n) for n, _ in model.named_modules()} | {p for p, _ in iter_sites(model)}
    return sorted(n for n in names if n and ".adapters." not in f".{n}.")


def load(model: nn.Module, path: str | Path, name: str | None = None, trainable: bool = False,
         allow_nonfinite: bool = False) -> nn.Module:
    """Load adapter(s) saved by :func:`save` or by Hugging Face ``peft`` from folder ``path``.

    The format is recognised from the files. ``name`` names the loaded adapter (default: the
    saved name, ``"default"`` for peft files). A folder of sub-folders loads each, all or none.
    Everything is checked before the model is touched (tensor names, shapes, dtypes, and
    NaN/inf unless ``allow_nonfinite``). The last loaded adapter becomes the active one. With
    FSDP2, load on every rank before ``fully_shard``.
    """
    check_unsharded(model, "load")
    states = read_adapters(path, name)
    taken = set(adapter_names(model))
    for s in states:
        if s.name in taken:
            raise ConfigError(f"an adapter named {s.name!r} is already attached; pick another name or delete it first")
        taken.add(s.name)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    active = active_names(model)
    installed: list[str] = []
    try:
        for s in states:
            sub = Path(path) / s.name if len(states) > 1 else Path(path)
            install(model, s, trainable=trainable, allow_nonfinite=allow_nonfinite, source=str(sub))
            installed.append(s.name)
    except BaseException:
        for n in reversed(installed):
            delete(model, n)
        for p, flag in flags:
            p.requires_grad_(flag)
        for _, site in iter_sites(model):
            site.active = list(active)
        raise
    return model


__all__ = ["FORMATS", "load", "read_adapters", "save", "write_adapters"]
