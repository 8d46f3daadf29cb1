"""A start-up cache for models converted from GGUF: de-quantizing SmolLM2's GGUF file takes ~16 s at every
start; the float weights, config and tokenizer are kept as a Hugging Face directory (safetensors) instead.

Location: ``$PEFTKIT_CACHE`` (``off`` disables the cache) or ``~/.cache/peftkit``, under
``converted/<name>-<peftkit version>-<sha256 of the source file, 16 hex digits>``: a new package
version or a changed file gets a new entry. An entry is built in a temporary sibling directory and
renamed into place whole, with a ``COMPLETE`` marker written last, so a reader sees a complete entry
or none; two processes building at once both succeed (the second rename loses and its copy is
deleted). When the cache cannot be written (read-only home, full disk) the model is used uncached.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def enabled() -> bool:
    """False when ``PEFTKIT_CACHE`` is ``off`` (or ``0``)."""
    return os.environ.get("PEFTKIT_CACHE", "").lower() not in ("off", "0")


def cache_root() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE") or Path.home() / ".cache" / "peftkit")


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256 (~0.3 s for SmolLM2's 98 MB file; once per process)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


def entry_dir(source: Path) -> Path:
    from .._version import __version__

    return cache_root() / "converted" / f"{source.stem}-{__version__}-{file_digest(source)}"


def lookup(source: Path) -> Path | None:
    """The complete cache entry of ``source``, or None."""
    d = entry_dir(source)
    return d if (d / MARKER).is_file() else None


def store(source: Path, write: Callable[[Path], None]) -> Path | None:
    """Build the entry of ``source`` with ``write(directory)`` and move it into place atomically; None when the
    cache cannot be written (the caller goes on without it)."""
    final = entry_dir(source)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        (tmp / MARKER).write_text(f"converted from {source}\n")
        try:
            os.replace(tmp, final)
        except OSError:  # another process put a complete entry there first
            shutil.rmtree(tmp, ignore_errors=True)
            return final if (final / MARKER).is_file() else None
        return final
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return None


def save_converted(model: Any, tokenizer: Any, directory: Path) -> None:
    """A model loaded from GGUF (transformers refuses ``save_pretrained`` on it) as ``config.json`` +
    ``model.safetensors`` (tied weights stored once) + the tokenizer files."""
    from safetensors.torch import save_file

    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).to_json_file(str(directory / "config.json"))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
