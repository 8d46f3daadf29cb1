"""Multi-process training helpers (``torchrun``): process group, DDP wrapping, batch sharding.

Choices:

* ``TrainConfig.batch_size`` is the per-rank batch. The collate function is called with
  ``batch_size × world_size`` so every rank builds the same *global* batches (same examples, same
  seed, same padding); rank ``r`` takes the ``r``-th contiguous slice of every global batch.
  DDP averages the gradients of the ranks, so with equal-sized shards the update equals that of
  one process on the global batch when the loss is a mean over examples (or over tokens with
  the same number of label tokens per shard).
* The model is wrapped in ``DistributedDataParallel`` with ``find_unused_parameters=False``; DDP
  registers only parameters with ``requires_grad``, so only the adapter (and the ``trainable_extra``
  modules) are all-reduced; frozen base weights are never communicated after the initial broadcast.
* Rank 0 writes every output; the other ranks wait at barriers.
* Rank 0 alone runs the periodic evaluation (the adapters are identical on every rank) and
  broadcasts the metrics, so that every rank takes the same best-adapter and early-stopping
  decisions. (The others wait in the broadcast: an evaluation longer than the process group's
  timeout, 30 minutes by default, needs a larger ``timeout`` in ``init_process_group``.)
* Checkpoints hold the RNG states of every rank, and each rank restores its own on ``resume``.
* ``TrainConfig.fsdp``: instead of DDP, the model is sharded with FSDP2 (:func:`fully_shard_model`);
  every rank then evaluates (a sharded forward needs all of them) and takes part in saving
  (the adapter tensors are gathered, rank 0 writes).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(model: nn.Module) -> DistInfo:
    """Initialise the process group when launched with ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on GPU).

    Nothing happens for a single process. An already initialised group is used as it is.
    """
    if not dist.is_available():
        return DistInfo()
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistInfo()
        on_gpu = any(p.is_cuda for p in model.parameters())
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if on_gpu:
            torch.cuda.set_device(local)
            model.to(torch.device("cuda", local))
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
        global _OWNED
        _OWNED = True
        atexit.register(_shutdown)  # a group left alive at exit can abort the process ("terminate called ...")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return info


_OWNED = False  # True once setup() created the process group (a torchrun launch of peftkit itself)


def _shutdown() -> None:
    """Destroy the process group this module created, once, at interpreter exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_if_launched(code: int) -> None:
    """End a ``torchrun``-launched peftkit process now, with ``code``, once every rank is done.

    After a distributed run the interpreter's teardown sometimes aborts a rank with "terminate called
    without an active exception" (a communication thread of the process group destroyed while still
    joinable during C++ static destruction), which torchrun reports as a failed run although every
    output was written. So the command-line process waits for all ranks, destroys the group, flushes
    its streams and leaves with ``os._exit``, skipping that teardown. Nothing happens when peftkit did
    not create the group (a single process, or a user's own launcher in Python)."""
    if not _OWNED:
        return
    import sys

    try:
        if dist.is_initialized() and code == 0:  # a failed rank leaves at once: torchrun stops the others
            dist.barrier()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """``DistributedDataParallel(model)`` over the trainable parameters, or ``model`` itself for one process."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.local_rank] if any(p.is_cuda for p in model.parameters()) else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the modules whose class is in transformers' ``_no_split_modules``,
    else the children of the longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    return blocks


def fully_shard_model(model: nn.Module) -> int:
    """FSDP2: ``fully_shard`` every transformer block, then the root (embeddings, head, the rest); returns the
    number of blocks. Base weights and adapters alike are sharded over the ranks; a block's full weights
    exist only while it runs. Attach adapters before this."""
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return len(blocks)


def shard(batch: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor] | None:
    """This rank's contiguous slice of a global batch; ``None`` when the batch has fewer rows than ranks."""
    if not info.enabled:
        return batch
    rows = next(iter(batch.values())).shape[0]
    if rows < info.world_size:
        return None
    return {k: (v.tensor_split(info.world_size)[info.rank] if torch.is_tensor(v) else v) for k, v in batch.items()}


def from_main(compute: Callable[[], T], info: DistInfo) -> T:
    """``compute()`` run on rank 0 only, its result sent to every rank (pickled)."""
    if not info.enabled:
        return compute()
    box = [compute() if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: T, info: DistInfo) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across(value: float, info: DistInfo) -> float:
    """The mean of a float over ranks (the value itself for one process)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def sum_across(value: float, info: DistInfo) -> float:
    return mean_across(value, info) * info.world_size
