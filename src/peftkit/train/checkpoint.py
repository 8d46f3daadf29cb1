"""Training checkpoints: everything needed to continue a run bit-for-bit.

``OUTPUT/checkpoint/`` holds

* ``adapter/``              the adapter(s) as :func:`peftkit.save` writes them (usable on their own);
* ``trained.safetensors``   the exact trained state: every adapter's tensors (``adapter/<name>/<key>``)
  and the ``trainable_extra`` parameters (``extra/<parameter name>``);
* ``optimizer.pt``          optimizer and scheduler state and torch RNG states (read back with
  ``torch.load(weights_only=True)``: tensors and plain containers only, no pickled objects);
* ``state.json``            step, epoch, position in the epoch's batches, python/numpy RNG states,
  metric history, best metric, the training config;
* ``rank_rng.pt``           under ``torchrun``: the RNG states of every rank (rank ``r`` restores entry ``r``).

The directory is written under a temporary name and renamed into place; the previous checkpoint
is moved aside first and deleted last, so a crash leaves one complete checkpoint
(``checkpoint/`` or ``.checkpoint.old/``, which :func:`find` also accepts).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import AdapterLoadError
from ..core.files import json_to_bytes, read_json, read_safetensors, tensors_to_bytes, write_files
from ..core.model import adapter_modules, adapter_names
from ..core.sharding import copy_full_into, full_state

CHECKPOINT = "checkpoint"
OLD = ".checkpoint.old"
EXTRA_FILE = "extra.safetensors"
RANK_RNG_FILE = "rank_rng.pt"


def capture_rng() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) RNG states."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *[_plain(x) for x in np_state[2:]]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trained_tensors(model: nn.Module, extra: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Every adapter's state and the extra trained parameters (full tensors, detached), keyed for
    ``trained.safetensors``. Under FSDP the shards are gathered: every rank must call it."""
    return {k: v.detach() for k, v in full_state(_live_tensors(model, extra)).items()}


def _live_tensors(model: nn.Module, extra: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The model's own tensors behind :func:`trained_tensors` (shards under FSDP), under the same keys."""
    out: dict[str, torch.Tensor] = {}
    for name in adapter_names(model):
        for path, _, mod in adapter_modules(model, name):
            out.update({f"adapter/{name}/{path}.{k}": v for k, v in mod.state_dict(keep_vars=True).items()})
    out.update({f"extra/{k}": p for k, p in extra.items()})
    return out


def restore_trained(model: nn.Module, extra: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors saved by :func:`trained_tensors` back into the model, checking every name and shape."""
    current = _live_tensors(model, extra)
    missing = sorted(set(current) - set(tensors))
    unexpected = sorted(set(tensors) - set(current))
    bad = [k for k in current if k in tensors and tensors[k].shape != current[k].shape]
    if missing or unexpected or bad:
        raise AdapterLoadError(f"{source}: the checkpoint does not match the model (missing: {missing[:5]}, "
                               f"unexpected: {unexpected[:5]}, wrong shape: {bad[:5]}); was the same adapter attached?")
    with torch.no_grad():
        for k, t in current.items():
            copy_full_into(t, tensors[k])


def save_extra(extra: dict[str, nn.Parameter], directory: Path) -> dict[Path, bytes]:
    """``extra.safetensors`` (the ``trainable_extra`` parameters by model parameter name), when there are any."""
    if not extra:
        return {}
    return {directory / EXTRA_FILE: tensors_to_bytes({k: p.detach() for k, p in extra.items()})}


def load_extra(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``extra.safetensors`` (from a file or an adapter directory) into ``model``'s parameters of the same names."""
    p = Path(path)
    if p.is_dir():
        p = p / EXTRA_FILE
    tensors = read_safetensors(p)
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    bad = [k for k in tensors if k in params and params[k].shape != tensors[k].shape]
    if missing or bad:
        raise AdapterLoadError(f"{p}: parameters not in the model: {missing[:5]}; wrong shapes: {bad[:5]}")
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t.to(params[k].dtype))
    return model


def save(output: Path, model: nn.Module, extra: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
         scheduler: Any, state: dict[str, Any], rng: dict[str, Any],
         best: dict[str, torch.Tensor] | None = None, rank_rngs: list[dict[str, Any]] | None = None) -> Path:
    """Write ``output/checkpoint`` atomically (see the module docstring); returns its path.

    ``best``: the best-so-far trained tensors (as :func:`trained_tensors`), kept as ``best.safetensors``.
    ``rank_rngs``: under ``torchrun``, every rank's :func:`capture_rng` in rank order.
    """
    from ..io import save

    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f".checkpoint.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if adapter_names(model):
        save(model, tmp / "adapter")
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "torch_rng": rng["torch"]}
    if "cuda" in rng:
        trainer["cuda_rng"] = rng["cuda"]
    torch.save(trainer, tmp / "optimizer.pt")
    if rank_rngs is not None:
        torch.save(rank_rngs, tmp / RANK_RNG_FILE)
    plain_rng = {k: v for k, v in rng.items() if k in ("python", "numpy")}
    files = {tmp / "trained.safetensors": tensors_to_bytes(trained_tensors(model, extra)),
             tmp / "state.json": json_to_bytes({**state, "rng": plain_rng})}
    if best is not None:
        files[tmp / "best.safetensors"] = tensors_to_bytes(best)
    files.update(save_extra(extra, tmp / "adapter"))
    write_files(files)
    final, old = output / CHECKPOINT, output / OLD
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find(output: Path) -> Path | None:
    """The checkpoint directory in ``output`` (or the one set aside by an interrupted save), if any."""
    for d in (output / CHECKPOINT, output / OLD):
        if (d / "state.json").is_file():
            return d
    return None


def load(directory: Path, model: nn.Module, extra: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
         scheduler: Any, rank: int = 0) -> dict[str, Any]:
    """Restore model tensors, optimizer and scheduler from ``directory``; returns ``state.json`` with ``"rng"``
    set to the RNG states of process ``rank`` (not yet applied)."""
    state = read_json(directory / "state.json")
    restore_trained(model, extra, read_safetensors(directory / "trained.safetensors"), str(directory))
    try:
        trainer = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterLoadError(f"{directory / 'optimizer.pt'}: cannot read ({e})") from None
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    state["rng"]["torch"] = trainer["torch_rng"]
    if "cuda_rng" in trainer:
        state["rng"]["cuda"] = trainer["cuda_rng"]
    if (directory / RANK_RNG_FILE).is_file():
        per_rank = torch.load(directory / RANK_RNG_FILE, map_location="cpu", weights_only=True)
        if rank >= len(per_rank):
            raise AdapterLoadError(f"{directory / RANK_RNG_FILE}: holds {len(per_rank)} ranks, this is rank {rank}")
        state["rng"] = per_rank[rank]
    return state


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
