"""Merging full checkpoints lazily, tensor by tensor (memory bounded by one tensor per input).

``merge_checkpoints(inputs, output, method, weights, options, base)``: for every tensor name
``k`` the inputs' tensors ``θ_i[k]`` are read (one at a time from each file, no memory map), the
method merges their task vectors ``τ_i = θ_i[k] − θ_0[k]`` against ``base`` (or ``θ_i[k]`` themselves
for methods that need no base: task arithmetic, SLERP), and ``θ_0[k] + τ[k]`` is streamed to the
output file before the next name is read. Peak memory is about ``(n + 2)`` times the largest
tensor (inputs, base, result) plus the interpreter — never the whole model, as in mergekit.

Everything is checked before a byte is written: every input has the same tensor names (a missing
or extra name is reported with the input it concerns), shapes and dtypes agree, the method takes
this many inputs and these weights. The output directory (``model.safetensors``, or shards
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` above ``shard_size``
bytes) is written to a temporary sibling directory and renamed into place, so a failed merge
leaves no partial output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError
from .registry import MaskSource, MergeOptions, check_weights, get_merge_method, make_options
from .streaming import StreamWriter, TensorFile

DEFAULT_SHARD_SIZE = 5 * 1024**3


class Checkpoint:
    """A safetensors checkpoint: one file, or a directory of ``*.safetensors`` shards (with or without an index)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_file():
            files = [self.path]
        elif self.path.is_dir():
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"{self.path}: no *.safetensors file in this directory")
        else:
            raise ConfigError(f"{self.path}: no such checkpoint file or directory")
        self.where: dict[str, TensorFile] = {}
        for f in files:
            tf = TensorFile(f)
            for k in tf.keys():
                if k in self.where:
                    raise ConfigError(f"{self.path}: tensor {k} appears in two files ({self.where[k].path.name}, {f.name})")
                self.where[k] = tf

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.where[key].dtype(key)

    def nbytes(self, key: str) -> int:
        return self.where[key].nbytes(key)

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get(key)


def check_compatible(inputs: list[Checkpoint], base: Checkpoint | None) -> list[str]:
    """The common tensor names in the first input's order; :class:`ConfigError` naming the first mismatch."""
    ref = inputs[0]
    names = ref.keys()
    others = ([base] if base is not None else []) + inputs[1:]
    for ck in others:
        missing = [k for k in names if k not in ck.where]
        extra = [k for k in ck.keys() if k not in ref.where]
        if missing or extra:
            what = f"lacks tensor {missing[0]!r}" if missing else f"has tensor {extra[0]!r} that {ref.path} lacks"
            more = len(missing) + len(extra) - 1
            raise ConfigError(f"{ck.path} {what}{f' (and {more} more differences)' if more else ''}: "
                              "the checkpoints are not of the same architecture")
        for k in names:
            if ck.shape(k) != ref.shape(k):
                raise ConfigError(f"tensor {k!r} has shape {ck.shape(k)} in {ck.path} but {ref.shape(k)} in {ref.path}")
            if ck.dtype(k).is_floating_point != ref.dtype(k).is_floating_point:
                raise ConfigError(f"tensor {k!r} is {ck.dtype(k)} in {ck.path} but {ref.dtype(k)} in {ref.path}")
    return names


def merge_checkpoints(inputs: Sequence[str | Path], output: str | Path, method: str = "task_arithmetic",
                      weights: Sequence[float] | None = None, options: dict[str, Any] | MergeOptions | None = None,
                      base: str | Path | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                      masks: MaskSource | None = None, progress: bool = True, overwrite: bool = False) -> Path:
    """Merge safetensors checkpoints into directory ``output``; see the module docstring. Returns ``output``."""
    m = get_merge_method(method)
    if not inputs:
        raise ConfigError("no input checkpoints to merge")
    cks = [Checkpoint(p) for p in inputs]
    base_ck = Checkpoint(base) if base is not None else None
    w = check_weights(m, weights, len(cks), "checkpoints")
    opts = make_options(m, options, len(cks))
    if base_ck is None and m.needs_base:
        raise ConfigError(f"merge method {m.name!r} works on task vectors θ_i − θ_0: give the base checkpoint ('base')")
    if shard_size <= 0:
        raise ConfigError(f"shard_size must be a positive number of bytes, got {shard_size}")
    out = Path(output)
    if out.exists() and not (overwrite and out.is_dir()):
        raise ConfigError(f"{out} already exists; remove it or pass overwrite=True")
    names = check_compatible(cks, base_ck)
    ref = cks[0]
    shards = _plan_shards(names, ref, shard_size)
    source = masks or MaskSource(getattr(opts, "seed", None))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        bar = _progress(len(names), progress, f"merging {len(cks)} checkpoints ({m.name})")
        weight_map: dict[str, str] = {}
        for i, group in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            writer = StreamWriter(tmp / fname, [(k, ref.shape(k), ref.dtype(k)) for k in group],
                                  metadata={"format": "pt", "merged_by": "peftkit", "merge_method": m.name})
            try:
                for k in group:
                    writer.write(k, _merge_one(k, cks, base_ck, m, w, opts, source))
                    weight_map[k] = fname
                    bar.update(1)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        bar.close()
        if len(shards) > 1:
            total = sum(ref.nbytes(k) for k in names)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _merge_one(key: str, cks: list[Checkpoint], base: Checkpoint | None, m: Any, w: list[float] | None,
               opts: MergeOptions, masks: MaskSource) -> torch.Tensor:
    dtype = cks[0].dtype(key)
    if not dtype.is_floating_point:  # integer buffers (position ids, ...) are copied from the first input
        return cks[0].get(key)
    theta0 = base.get(key).float() if base is not None else None
    taus = []
    for ck in cks:
        t = ck.get(key).float()
        taus.append(t - theta0 if theta0 is not None else t)
    merged = m(taus, w, opts, masks)
    del taus
    if theta0 is not None:
        merged = merged.add_(theta0) if merged.dtype == theta0.dtype else merged + theta0
    return merged.to(dtype)


def _plan_shards(names: list[str], ref: Checkpoint, shard_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for k in names:
        n = ref.nbytes(k)
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


class _NoBar:
    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="tensor", leave=False)
