"""``peftkit.compress``: shrink an adapter with ComPEFT or low-bit factors, as a folder ``peftkit.load`` reads.

    peftkit.compress("out/adapter", "out/adapter-compeft", method="compeft", density=0.1)
    peftkit.load(model, "out/adapter-compeft")      # decoded transparently

Methods (math in :mod:`peftkit.formats.tensor_codec`):

* ``"compeft"`` — the top-``density`` entries of each tensor's task vector, their signs and one scale
  per tensor (``scale="l2"``: the mean kept magnitude; ``"std"``: ``alpha · std``), entropy-coded;
* ``"int8"`` / ``"int4"`` — symmetric per-row quantisation with float32 row scales.

Tensors smaller than ``min_numel`` and non-floating tensors stay exact; shared tensors (frozen
seeded bases) stay exact. The task vector of an IA3 vector is ``l − 1`` (its identity is 1); of every
other tensor the tensor itself (LoRA: A and B are compressed, ``B A`` is never formed). From a folder,
the files that are not adapter files (a trained head ``extra.safetensors``, ``peftkit_task.json``) are
copied unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, did_you_mean
from ..formats import tensor_codec as codec

METHODS = ("compeft", "int8", "int4")
SCALES = ("l2", "std")
#: tensors whose "no change" value is not 0: {method: {tensor name: neutral value}}
NEUTRAL = {"ia3": {"ia3_l": 1.0}}


def check_options(method: str, density: float, scale: str, alpha: float, min_numel: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown compression method {method!r}{did_you_mean(str(method), METHODS)}; "
                          f"known: {', '.join(METHODS)}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1], got {density!r}")
    if scale not in SCALES:
        raise ConfigError(f"scale={scale!r} is not one of {', '.join(SCALES)}{did_you_mean(str(scale), SCALES)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"alpha must be a positive number, got {alpha!r}")
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ConfigError(f"min_numel must be a non-negative integer, got {min_numel!r}")


def encode_tensor(key: str, t: Any, method_name: str, method: str, density: float, scale: str, alpha: float,
                  min_numel: int) -> tuple[dict[str, Any], bytes]:
    if not t.is_floating_point() or t.numel() < max(min_numel, 2):
        return codec.raw_encode(t)
    if method == "compeft":
        offset = NEUTRAL.get(method_name, {}).get(key.rsplit(".", 1)[-1], 0.0)
        return codec.compeft_encode(t, density, scale, alpha, offset)
    return codec.lowbit_encode(t, method)


def compress(adapter: Any, output: str | Path | None = None, method: str = "compeft", density: float = 0.1,
             scale: str = "l2", alpha: float = 1.0, min_numel: int = 64, overwrite: bool = False) -> Any:
    """Compress ``adapter`` (an ``AdapterState`` or an adapter folder) and, with ``output``, write it there.

    Returns the compressed-then-decoded ``AdapterState`` (what loading the folder gives). Options are
    checked, and an existing ``output`` refused unless ``overwrite``, before any work; the folder is
    written atomically as a whole.
    """
    check_options(method, density, scale, alpha, min_numel)
    out = Path(output) if output is not None else None
    if out is not None and out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; remove it or pass overwrite=True")
    from .._version import __version__
    from ..core.files import write_folder
    from ..formats import compressed, hf_peft
    from ..formats import peftkit as native
    from ..io import read_adapters

    src = Path(adapter) if isinstance(adapter, (str, Path)) else None
    states = read_adapters(src) if src is not None else [adapter]
    if len(states) != 1:
        raise ConfigError(f"{adapter} holds {len(states)} adapters; compress them one by one")
    state = states[0]
    settings = {"method": method, "density": density if method == "compeft" else None,
                "scale": scale if method == "compeft" else None, "alpha": alpha if scale == "std" else None,
                "min_numel": min_numel}
    records = {k: encode_tensor(k, t, state.config.method, method, density, scale, alpha, min_numel)
               for k, t in state.tensors.items()}
    shared = {k: codec.raw_encode(t) for k, t in state.shared.items()}
    if out is not None:
        files = compressed.files(state, records, shared, settings, __version__)
        if src is not None:  # side files (a trained head, the task record) travel unchanged
            for f in sorted(src.iterdir()):
                if f.is_file() and not (native.owned(f) or hf_peft.owned(f) or compressed.owned(f)):
                    files.setdefault(f.name, f.read_bytes())
        write_folder(out, files, owned=lambda p: compressed.owned(p) or native.owned(p) or hf_peft.owned(p))
    decoded = {k: codec.decode(*rec) for k, rec in records.items()}
    return state.replace(tensors=decoded, shared={k: codec.decode(*rec) for k, rec in shared.items()})
