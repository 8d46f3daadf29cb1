"""Atomic writes (single files and whole folders) and checked reads of safetensors and JSON files.

* :func:`atomic_write_bytes` writes one file to a temporary name in the same directory, flushes
  it to disk and renames it over the destination.
* :func:`write_folder` replaces a whole folder at once: every file goes into a temporary sibling
  folder, which is then swapped in (``renameat2(RENAME_EXCHANGE)`` on Linux, else two renames),
  so a reader sees the old folder or the new one, never a mix, and a save that fails at any
  step leaves the old folder as it was. Files in the old folder that the save does not own
  (a training run's ``peftkit_task.json``, a user's README) are carried over.
* :class:`FolderReader` reads several files of one folder through one directory handle, so a
  folder swapped by a concurrent writer is read whole from one version or the other.

Reads turn every low-level failure into an :class:`AdapterLoadError` that names the file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
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


MAX_JSON_BYTES = 64 * 2**20


def parse_json(raw: bytes, path: Path | str) -> dict[str, Any]:
    """A JSON object from ``raw``; every failure (encoding, syntax, nesting, size) as an :class:`AdapterLoadError`."""
    if len(raw) > MAX_JSON_BYTES:
        raise AdapterLoadError(f"{path}: {len(raw)} bytes is too large for a config file (limit {MAX_JSON_BYTES})")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AdapterLoadError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise AdapterLoadError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:
        raise AdapterLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_json(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AdapterLoadError(f"{path}: file not found") from None
    except OSError as e:
        raise AdapterLoadError(f"{path}: cannot read ({e})") from None
    return parse_json(raw, path)


def parse_safetensors(raw: bytes, path: Path | str) -> dict[str, torch.Tensor]:
    try:
        return st_load(raw)
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise AdapterLoadError(f"{path}: corrupt or truncated safetensors file ({e})") from None


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


def read_torch_bin(path: Path | str, raw: bytes | None = None) -> dict[str, torch.Tensor]:
    """Legacy ``adapter_model.bin`` files, read with ``weights_only=True`` (no arbitrary code)."""
    import io

    try:
        source = io.BytesIO(raw) if raw is not None else str(path)
        data = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterLoadError(f"{path}: cannot read as a weights-only torch file ({e})") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path}: expected a dict of tensors")
    return data


# -- whole folders -------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_libc: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018 - missing before glibc 2.28
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    at_fdcwd = -100
    rc = _libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _carry_over(old: Path, new: Path, owned: Callable[[Path], bool]) -> None:
    """Hard-link (or copy) every entry of ``old`` that this save does not own into ``new``."""
    for entry in old.iterdir():
        if owned(entry) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src: Any, dst: Any) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def write_folder(root: Path, files: dict[str, bytes], owned: Callable[[Path], bool] = lambda p: False,
                 attempts: int = 50) -> None:
    """Replace folder ``root`` by one holding ``files`` (``{relative path: bytes}``), atomically as a whole.

    Entries of an existing ``root`` for which ``owned(path)`` is False are carried over. Two
    concurrent writers both succeed; the later swap wins, and no reader sees a mix.
    """
    root = Path(root)
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        for rel, data in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(path, 0o666 & ~_umask())
        for d in {(tmp / rel).parent for rel in files}:
            _fsync_dir(d)
        _swap_in(tmp, root, owned, attempts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)


def _swap_in(tmp: Path, root: Path, owned: Callable[[Path], bool], attempts: int) -> None:
    for attempt in range(attempts):
        if root.is_dir():
            _carry_over(root, tmp, owned)
            if _exchange(tmp, root):  # tmp now holds the old folder
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            os.rmdir(old)
            try:
                os.rename(root, old)
            except FileNotFoundError:  # another writer is mid-swap
                time.sleep(0.001 * (attempt + 1))
                continue
            try:
                os.rename(tmp, root)
            except OSError:
                os.rename(old, root)  # put the old folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, root)
            return
        except OSError as e:  # another writer created root meanwhile: swap with it instead
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            time.sleep(0.001 * (attempt + 1))
    raise OSError(errno.EBUSY, f"could not swap in {root}: other writers kept changing it")


class FolderReader:
    """Reads files of one folder through one directory handle.

    A concurrent :func:`write_folder` swaps whole folders, so every file read through one
    reader (and the sub-folder readers it opens) comes from the same version of the folder.
    """

    def __init__(self, root: Path, _parent: FolderReader | None = None) -> None:
        self.root = Path(root)
        self._fd: int | None = None
        if os.open not in os.supports_dir_fd:
            if not self.root.exists():
                raise AdapterLoadError(f"{self.root}: no such adapter directory")
            return
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
        try:
            if _parent is not None and _parent._fd is not None:
                self._fd = os.open(self.root.name, flags, dir_fd=_parent._fd)
            else:
                self._fd = os.open(self.root, flags)
        except FileNotFoundError:
            raise AdapterLoadError(f"{self.root}: no such adapter directory") from None
        except NotADirectoryError:
            raise AdapterLoadError(f"{self.root}: expected an adapter directory, got a file") from None

    def __enter__(self) -> FolderReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def stale(self) -> bool:
        """Whether the folder read was removed or replaced meanwhile (a concurrent save swapped in another)."""
        if self._fd is None:
            return not self.root.is_dir()
        try:
            mine = os.fstat(self._fd)
            if mine.st_nlink == 0:
                return True
            now = os.stat(self.root)
            return (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev)
        except OSError:
            return True

    def sub(self, name: str) -> FolderReader:
        return FolderReader(self.root / name, self)

    def exists(self, rel: str) -> bool:
        try:
            st = os.stat(rel, dir_fd=self._fd) if self._fd is not None else os.stat(self.root / rel)
        except OSError:
            return False
        import stat

        return stat.S_ISREG(st.st_mode)

    def read(self, rel: str) -> bytes:
        try:
            if self._fd is None:
                return (self.root / rel).read_bytes()
            fd = os.open(rel, os.O_RDONLY, dir_fd=self._fd)
            with os.fdopen(fd, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise AdapterLoadError(f"{self.root / rel}: file not found") from None
        except OSError as e:
            raise AdapterLoadError(f"{self.root / rel}: cannot read ({e})") from None

    def subfolders(self) -> list[str]:
        import stat

        names = os.listdir(self._fd) if self._fd is not None else os.listdir(self.root)
        out = []
        for n in sorted(names):
            if n.startswith("."):
                continue
            try:
                st = os.stat(n, dir_fd=self._fd) if self._fd is not None else os.stat(self.root / n)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                out.append(n)
        return out
