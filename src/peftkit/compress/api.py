"""``peftkit.compress``: shrink an adapter with ComPEFT or low-bit factors, as a folder ``peftkit.load`` reads.

    peftkit.compress("out/adapter", "out/adapter-compeft", method="compeft", density=0.1)
    peftkit.load(model, "out/adapter-compeft")      # decoded transparently

Methods (math in :mod:`peftkit.formats.tensor_codec`):

* ``"compeft"`` — the top-``density`` entries of each tensor's task vector, their signs and one scale
  per tensor (``scale="l2"``: the mean kept magnitude; ``"std"``: ``alpha · std``), entropy-coded;
* ``"int8"`` / ``"int4"`` — symmetric per-row quantisation with float32 row scales.

Tensors smaller than ``min_numel`` and non-floating tensors stay exact; shared tensors (frozen
seeded bases) and ``modules_to_save`` copies (a whole classification head, no task vector) stay
exact. ComPEFT's task vector is each tensor's change from the value it was built with, when the
method's config determines that value (``AdapterConfig.initial_value``): ``l − 1`` for an IA3
vector, ``A − A₀`` for a LoRA factor drawn from the recorded ``init_seed`` (``A₀`` is regenerated
when decoding, never stored); otherwise the tensor itself (LoRA adapters read from peft files,
which carry no seed, compress ``A`` as it is, a lossier approximation, with a warning). ``B A`` is
never formed. From a folder, the files that are not adapter files (a trained head
``extra.safetensors`` of older outputs, ``peftkit_task.json``) are copied unchanged.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..core import saved_modules
from ..core.errors import ConfigError, did_you_mean
from ..formats import tensor_codec as codec

METHODS = ("compeft", "int8", "int4")
SCALES = ("l2", "std")


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


def initial_value(state: Any, key: str, shape: tuple[int, ...]) -> Any:
    """The value tensor ``key`` of ``state`` was built with, when its config gives it (else None)."""
    module, _, tensor = key.rpartition(".")
    return state.config.initial_value(module, tensor, tuple(shape), state.layers.get(module, {}))


def encode_tensor(key: str, t: Any, state: Any, method: str, density: float, scale: str, alpha: float,
                  min_numel: int) -> tuple[dict[str, Any], bytes]:
    if not t.is_floating_point() or t.numel() < max(min_numel, 2):
        return codec.raw_encode(t)
    if saved_modules.saved_root(key, saved_modules.entries(state.config)) is not None:
        return codec.raw_encode(t)  # a modules_to_save copy (a whole head): trained values, not a task vector
    if method == "compeft":
        start = initial_value(state, key, tuple(t.shape))
        return codec.compeft_encode(t, density, scale, alpha, 0.0 if start is None else start)
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
    if method == "compeft" and getattr(state.config, "init_seed", 0) is None \
            and getattr(state.config, "init", None) in ("default", "gaussian"):
        warnings.warn(f"{state.name}: this {state.config.method} adapter records no init_seed (a file from another "
                      "library?), so ComPEFT compresses its random factor as it is rather than its change from the "
                      "start; expect a larger accuracy loss than for adapters trained with peftkit", stacklevel=2)
    records = {k: encode_tensor(k, t, state, method, density, scale, alpha, min_numel)
               for k, t in state.tensors.items()}
    shared = {k: codec.raw_encode(t) for k, t in state.shared.items()}
    if out is not None:
        files = compressed.files(state, records, shared, settings, __version__)
        if src is not None:  # side files (a trained head, the task record) travel unchanged
            for f in sorted(src.iterdir()):
                if f.is_file() and not (native.owned(f) or hf_peft.owned(f) or compressed.owned(f)):
                    files.setdefault(f.name, f.read_bytes())
        write_folder(out, files, owned=lambda p: compressed.owned(p) or native.owned(p) or hf_peft.owned(p))
    decoded = {k: codec.decode(*rec, initial_value(state, k, tuple(t.shape)))
               for (k, rec), t in zip(records.items(), state.tensors.values(), strict=True)}
    return state.replace(tensors=decoded, shared={k: codec.decode(*rec) for k, rec in shared.items()})
