"""Per-row task ids for task-routed methods (Poly/MHR): ``with peftkit.task_ids(model, ids): model(...)``.

peft passes ``task_ids=`` to its wrapper's forward; peftkit has no wrapper, so the ids of the
rows of the batches run inside the block live in a context variable (like ``mixed_batch``'s row
assignment, :data:`peftkit.core.site.ROW_GROUPS`): blocks nest, threads and async tasks each see
their own, and nothing is left on the model. A module reads them with :func:`current_task_ids`
(its site must belong to the model given to :func:`task_ids`). Any method can use it: an
adapter module that has an ``n_tasks`` attribute gets its ids range-checked when the block opens,
before the model runs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class TaskIds:
    """The task id of each row, and the sites (ids) of the model they were given for."""

    ids: torch.Tensor
    sites: frozenset[int]


TASK_IDS: contextvars.ContextVar[TaskIds | None] = contextvars.ContextVar("peftkit_task_ids", default=None)


def _as_ids(ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        t = ids
    elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        t = torch.tensor(list(ids), dtype=torch.long)
    else:
        raise ConfigError(f"task_ids expects a 1-D tensor or list of integer task ids (one per row), got {ids!r}")
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ConfigError(f"task_ids expects a 1-D integer tensor (one id per row), got dtype {t.dtype} and shape "
                          f"{tuple(t.shape)}")
    if t.numel() == 0:
        raise ConfigError("task_ids: the list of task ids is empty (one id per row is needed)")
    if int(t.min()) < 0:
        raise ConfigError(f"task_ids: task ids must be >= 0, got {int(t.min())}")
    return t.long()


@contextlib.contextmanager
def task_ids(model: nn.Module, ids: torch.Tensor | Sequence[int]) -> Iterator[nn.Module]:
    """Row ``i`` of every batch run inside the block belongs to task ``ids[i]`` (for Poly/MHR adapters).

    Checked before anything runs: ids are non-negative integers, and below ``n_tasks`` of every
    attached adapter that routes by task (the error names the adapter, the id and the valid range).
    """
    from .model import adapter_names, iter_sites

    t = _as_ids(ids)
    sites = []
    for _path, site in iter_sites(model):
        sites.append(id(site))
        for name, mod in site.adapters.items():
            n = getattr(mod, "n_tasks", None)
            if isinstance(n, int) and int(t.max()) >= n:
                raise ConfigError(f"task_ids: task id {int(t.max())} is out of range for adapter {name!r} "
                                  f"({mod.config.method}, n_tasks={n}: ids 0..{n - 1})")
    if not sites:
        raise ConfigError(f"task_ids: {type(model).__name__} has no adapters attached "
                          f"(attached: {', '.join(adapter_names(model)) or 'none'})")
    token = TASK_IDS.set(TaskIds(t, frozenset(sites)))
    try:
        yield model
    finally:
        TASK_IDS.reset(token)


def current_task_ids(site: nn.Module) -> torch.Tensor | None:
    """The task ids in force for ``site`` (None outside a :func:`task_ids` block of its model)."""
    value = TASK_IDS.get()
    if value is None or id(site) not in value.sites:
        return None
    return value.ids
