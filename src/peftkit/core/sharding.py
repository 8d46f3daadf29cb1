"""Saving adapters of a model sharded with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under ``fully_shard`` every parameter is a ``DTensor`` holding one shard per rank. Saving
gathers each adapter tensor (``DTensor.full_tensor()``, a collective: every rank calls it, in
the same order) and only the main rank (rank 0) writes the files; the other ranks wait until
the write is done and raise if it failed.

Nothing here runs unless ``torch.distributed`` is initialised, so the single-process path
is unchanged. Under plain DDP (no ``DTensor``, no FSDP module) nothing is gathered and every
caller writes, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, PeftkitError
from .files import write_files


def is_distributed() -> bool:
    """Whether a default ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_rank() -> bool:
    """True on rank 0, and when not running distributed."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing when not running distributed)."""
    if is_distributed():
        torch.distributed.barrier()


def _is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or part of it) was sharded with ``fully_shard``."""
    if not is_distributed():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(_is_dtensor(p) for p in model.parameters())


def check_unsharded(model: nn.Module, action: str) -> None:
    """Raise :class:`ConfigError` if ``model`` is already sharded: adapters are built before sharding."""
    if is_sharded(model):
        raise ConfigError(
            f"cannot {action} an adapter on a model already sharded with FSDP (fully_shard): the new adapter "
            f"parameters would not be sharded; call peftkit.{action}(...) on every rank before fully_shard"
        )


def full_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every ``DTensor`` replaced by its full tensor.

    Collective when there is a ``DTensor``: every rank must call it with the same keys in the
    same order. Returns ``tensors`` itself when not running distributed.
    """
    if not is_distributed():
        return tensors
    return {k: v.full_tensor() if _is_dtensor(v) else v for k, v in tensors.items()}


def copy_full_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    """``dst.copy_(full)``; for a ``DTensor`` ``dst``, ``full`` is laid out like it first (collective)."""
    if is_distributed() and _is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(device=dst.device, dtype=dst.dtype), dst.device_mesh, dst.placements)
    dst.copy_(full)


def scalar(t: torch.Tensor) -> float:
    """A 0-d tensor (or a ``DTensor`` such as FSDP's gradient norm) as a float."""
    return float(t.full_tensor() if is_distributed() and _is_dtensor(t) else t)


@contextlib.contextmanager
def _full_tensors_in(module: nn.Module, full: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, ``module``'s ``DTensor`` parameters and buffers are their full tensors."""
    swapped: list[tuple[dict, str, object]] = []
    try:
        for key, value in list(module.state_dict(keep_vars=True).items()):
            if not _is_dtensor(value):
                continue
            owner_name, _, leaf = key.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            table = owner._parameters if leaf in owner._parameters else owner._buffers
            swapped.append((table, leaf, table[leaf]))
            t = full[key]
            table[leaf] = nn.Parameter(t, requires_grad=False) if table is owner._parameters else t
        yield
    finally:
        for table, leaf, original in reversed(swapped):
            table[leaf] = original


def module_state(module: nn.Module,
                 export: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` (or ``export(module)``) with full tensors.

    Under FSDP2 the state is gathered first (a collective) and ``export`` sees the module with
    its full tensors in place of the shards.
    """
    if not is_distributed():
        return export(module) if export is not None else module.state_dict()
    full = full_state(module.state_dict())
    if export is None:
        return full
    with torch.no_grad(), _full_tensors_in(module, full):
        return export(module)


def class_name(model: nn.Module) -> str:
    """The model's class name; for a ``fully_shard``-ed model the user's class, not ``FSDP<class>``."""
    cls = type(model)
    if is_distributed():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            cls = next((b for b in cls.__mro__[1:] if b is not FSDPModule and not issubclass(b, FSDPModule)), cls)
    return cls.__name__


def write_once_with(write: Callable[[], object], sharded: bool) -> None:
    """Run ``write()``; for a sharded model only on rank 0, the other ranks waiting for it.

    Every rank returns only after rank 0 has written (or failed: then every rank raises).
    """
    if not sharded:
        write()
        return
    error: str | None = None
    if is_main_rank():
        try:
            write()
        except Exception as e:  # told to the other ranks, then raised here
            error = f"{type(e).__name__}: {e}"
            outcome = [error]
            torch.distributed.broadcast_object_list(outcome, src=0)
            raise
    outcome = [error]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None and not is_main_rank():
        raise PeftkitError(f"rank 0 failed to write the adapter files: {outcome[0]}")


def write_once(files: dict[Path, bytes], sharded: bool) -> None:
    """:func:`write_once_with` for a set of single files, each written atomically."""
    write_once_with(lambda: write_files(files), sharded)
