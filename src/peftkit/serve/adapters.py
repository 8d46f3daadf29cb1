"""The adapter table: which adapters the server knows, which are in memory, and LRU eviction.

An adapter is *known* (a name and a directory, peftkit or Hugging Face PEFT format) and, while a
request needs it, *loaded* into the one base model with ``peftkit.load(model, dir, name=...)``.
At most ``max_adapters`` are loaded at once; loading one more evicts the least recently used
adapter that no running request holds (``peftkit.delete``). An evicted adapter stays known and is
loaded again, transparently, by the next request that names it.

Loaded adapters are cast to the dtype of the base weights (``peftkit serve --dtype bfloat16``: the
factors in bfloat16 too), so no forward casts between the two.

Directories given over HTTP must lie inside the configured adapter root: the path is resolved
(symbolic links and ``..`` included) and refused when it leaves the root.

Every method that changes the model runs on the engine thread; :meth:`names` and :meth:`describe`
only read a snapshot under a lock and may be called from any thread.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.errors import AdapterLoadError, AdapterNotFoundError, ConfigError, did_you_mean

BASE = "base"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> None:
    if name == BASE:
        raise ConfigError(f"adapter name {BASE!r} is reserved for the base model; pick another name")
    if not NAME_RE.match(name):
        raise ConfigError(f"adapter name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")


def resolve_under(root: Path, path: str) -> Path:
    """``root / path`` resolved; :class:`ConfigError` when it leaves ``root`` (``..``, absolute paths, symlinks)."""
    root = root.resolve()
    p = Path(path)
    full = (p if p.is_absolute() else root / p).resolve()
    if not full.is_relative_to(root):
        raise ConfigError(f"adapter path {path!r} is outside the adapter root {root}; give a directory inside it")
    return full


def check_dir(path: Path) -> None:
    from ..io import detect_format

    if not path.is_dir():
        raise AdapterLoadError(f"adapter directory {path} does not exist")
    if detect_format(path) is None:
        raise AdapterLoadError(f"{path}: no adapter here (expected peftkit_adapter.json or adapter_config.json)")


@dataclass
class Known:
    path: Path
    loaded_at: float | None = None  # wall time of the last load, None while not in memory


class AdapterTable:
    """Adapters over one base model: ``max_adapters`` in memory, least recently used evicted first."""

    def __init__(self, model: nn.Module, max_adapters: int = 8, root: str | Path | None = None) -> None:
        if max_adapters < 1:
            raise ConfigError(f"max_adapters must be at least 1, got {max_adapters}")
        self.model = model
        self.max_adapters = max_adapters
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ConfigError(f"adapter root {self.root} is not a directory")
        self.known: dict[str, Known] = {}
        self.lru: OrderedDict[str, None] = OrderedDict()  # loaded adapters, least recently used first
        #: adapters are served in the base weights' dtype (a bfloat16 base: bfloat16 factors, no casts per step)
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        self.loads = 0
        self.evictions = 0
        #: called after an adapter was loaded or evicted (base weights may have changed with it)
        self.changed: Callable[[], None] | None = None
        #: the engine runs packed steps: adapters must work on packed batches (checked at load)
        self.packed = False
        self._lock = threading.Lock()

    # -- reads (any thread) ------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return list(self.known)

    def describe(self) -> list[dict]:
        with self._lock:
            return [{"name": n, "path": str(k.path), "loaded": n in self.lru} for n, k in self.known.items()]

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self.lru)

    def check_known(self, name: str) -> None:
        with self._lock:
            if name not in self.known:
                raise AdapterNotFoundError(f"no adapter named {name!r}{did_you_mean(name, [BASE, *self.known])}; "
                                           f"available: {', '.join([BASE, *self.known])}")

    # -- changes (engine thread) ---------------------------------------------------------------
    def register(self, name: str, path: str | Path, from_root: bool = False) -> Path:
        """Make ``name`` known; ``from_root``: ``path`` is relative to (and must stay inside) the adapter root."""
        check_name(name)
        if from_root:
            if self.root is None:
                raise ConfigError("loading adapters by path is disabled: start the server with --adapter-root DIR")
            full = resolve_under(self.root, str(path))
        else:
            full = Path(path).resolve()
        check_dir(full)
        with self._lock:
            if name in self.known:
                raise ConfigError(f"an adapter named {name!r} is already known; unload it first or pick another name")
            self.known[name] = Known(full)
        return full

    def forget(self, name: str) -> None:
        self.check_known(name)
        if name in self.lru:
            self._evict(name)
        with self._lock:
            del self.known[name]

    def ensure(self, name: str, busy: set[str]) -> bool:
        """Load ``name`` if needed (evicting an idle adapter); False when every loaded adapter is busy."""
        if name in self.lru:
            with self._lock:
                self.lru.move_to_end(name)
            return True
        self.check_known(name)
        while len(self.lru) >= self.max_adapters:
            victim = next((n for n in self.lru if n not in busy), None)
            if victim is None:
                return False
            self._evict(victim)
        self._load(name)
        return True

    def _load(self, name: str) -> None:
        from ..core.api import activate, delete, get_adapter
        from ..io import load

        path = self.known[name].path
        load(self.model, path, name=name)
        bad = [(p, m.config.method) for p, m in get_adapter(self.model, name).items() if not m.supports_mixed_batch]
        activate(self.model, [])  # requests choose adapters per row (mixed_batch), never through the active set
        if bad:
            delete(self.model, name)
            raise AdapterLoadError(f"{path}: adapter {name!r} ({bad[0][1]}, at {bad[0][0]}) cannot be served: its rows "
                                   "cannot share a batch with other adapters' rows")
        if self.packed:
            culprit = _not_packable(self.model, name)
            if culprit is not None:
                delete(self.model, name)
                self._notify()
                raise AdapterLoadError(f"{path}: adapter {name!r} cannot be served with packed steps: {culprit}; "
                                       "start the server with --engine padded")
        self.model.eval()
        self._cast(name)
        with self._lock:
            self.lru[name] = None
            self.known[name].loaded_at = time.time()
        self.loads += 1
        self._notify()

    def _notify(self) -> None:
        if self.changed is not None:
            self.changed()

    @torch.no_grad()
    def _cast(self, name: str) -> None:
        from ..core.api import adapter_parameters

        for p in adapter_parameters(self.model, name).values():
            if p.is_floating_point() and self.dtype is not None and p.dtype != self.dtype:
                p.data = p.data.to(self.dtype)

    def _evict(self, name: str) -> None:
        from ..core.api import delete

        delete(self.model, name)
        with self._lock:
            self.lru.pop(name, None)
            if name in self.known:
                self.known[name].loaded_at = None
        self.evictions += 1
        self._notify()


def _not_packable(model: nn.Module, name: str) -> str | None:
    """Why adapter ``name`` cannot run on packed batches (None: it can; the rule is ``AdapterSite.packable``)."""
    from ..core.model import iter_sites

    for path, site in iter_sites(model):
        m = site.adapters._modules.get(name)
        if m is not None and not site.packable(m):
            return f"{m.config.method} at {path} changes the input of a {type(site.base).__name__}, which mixes tokens"
    return None

