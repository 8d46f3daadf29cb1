"""The sparse-delta layer shared by every method that trains a set of a weight's entries.

A sparse delta on a frozen weight ``W`` is a sorted set ``I`` of ``k`` flat positions and one
trainable value per position::

    W' = W + scatter_I(values)         W'.flat[i_j] = W.flat[i_j] + values[j], other entries = W

The layer runs its own operation with ``W'``; only ``values`` trains. The state is two tensors,
``indices`` (int64, sorted, no duplicates; positions into ``W.view(-1)``) and ``values``.
Merging is exact: ``W.view(-1)[indices] += values``. SparseFT (fixed support), SaRA (the
smallest entries of ``W``), RoSA (a sparse part next to a low-rank one, support from
accumulated gradients) and SpIEL (drop and regrow) use this one piece of code:

* :class:`SparseDeltaMixin` — the forward override, merging, the checks of a loaded support,
  the dense-gradient probe (:meth:`~SparseDeltaMixin.capture_gradients`: while on, every
  backward adds ``g``, ``|g|`` or ``g²`` of ``∂loss/∂W'`` into ``grad_score``, a dense float32
  tensor that exists only while capturing) and :meth:`~SparseDeltaMixin.set_support`, which
  moves to a new support and keeps the optimizer state of the entries that stay (new entries'
  state is zeroed);
* :func:`select_support` — the ``k`` positions by magnitude (largest or smallest), at random
  (seeded per module) or from scores;
* :class:`SparseDeltaLayer` — the mixin on its own, for the methods that are nothing more.

**Fast path.** On a plain ``nn.Linear`` whose frozen weight has the adapter's dtype, when the
adapter runs alone on the layer and no gradient is being captured, the layer runs as one autograd
node (:class:`SparseDeltaLinear`): forward ``x W'ᵀ + b``; backward ``∂x = g W'`` (``W'`` rebuilt,
not kept) and ``∂values = (gᵀ x).view(-1)[indices]`` (the product is transient). Only ``x`` is
kept for backward (the general path keeps the dense ``W'`` of every layer too, when the layer's
input needs a gradient).

The dense gradient is read through a zero scalar "probe" added to ``W'`` only while capturing:
autograd then computes ``∂loss/∂W'`` for that backward (the cost of full fine-tuning's weight
gradient for those steps) and a tensor hook accumulates it; outside capture windows nothing
dense is kept.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.errors import AdapterLoadError
from ..core.layers import float_dtype_for_adapter, is_quantized

SELECTIONS = ("magnitude", "smallest", "random", "scores")
CAPTURE_MODES = ("sum", "abs", "square")


def select_support(selection: str, k: int, weight: torch.Tensor, module_name: str, seed: int = 0,
                   scores: torch.Tensor | None = None) -> torch.Tensor:
    """The sorted flat positions (int64, on ``weight``'s device) of ``k`` entries of ``weight``.

    ``"magnitude"``: the largest ``|W|``; ``"smallest"``: the smallest ``|W|`` (SaRA);
    ``"random"``: uniform, from a generator seeded with ``seed`` and the CRC-32 of
    ``module_name`` (layers of one shape differ); ``"scores"``: the largest ``scores``.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"select_support: selection={selection!r} is not one of {SELECTIONS}")
    w = weight.detach()
    numel = w.numel()
    if selection == "random":
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module_name.encode())) % (2**63))
        return torch.randperm(numel, generator=gen)[:k].sort().values.to(w.device)
    if selection == "scores":
        if scores is None:
            raise ValueError("selection='scores' needs scores")
        score = scores.detach().float().reshape(-1).to(w.device)
    elif selection == "smallest":
        score = -w.float().abs().reshape(-1)
    else:
        score = w.float().abs().reshape(-1)
    return torch.topk(score, k, sorted=False).indices.sort().values


def count_for(density: float, numel: int) -> int:
    """Trainable entries of a weight with ``numel`` entries at ``density``: ``max(1, round(density · numel))``."""
    return min(numel, max(1, round(density * numel)))


@torch.no_grad()
def remap_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, source: torch.Tensor,
                          fresh: torch.Tensor) -> None:
    """Reorder ``param``'s per-entry optimizer state: new entry ``j`` takes old entry ``source[j]``;
    entries where ``fresh`` is True start from zero state (Adam's moments, momentum buffers).

    Scalars of the state (Adam's ``step``) are left alone, so Adam's bias correction treats a fresh
    entry as an old one with zero moments: its first update is about ``(1 − β1)/√(1 − β2)`` times
    ``lr · sign(g)`` (≈3.2× with the defaults) instead of ``lr · sign(g)``. Nothing happens without
    an optimizer or before its first step.
    """
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for t in list(state.values()):
        if isinstance(t, torch.Tensor) and t.shape == param.shape and t.dim() > 0:
            moved = t[source.to(t.device)]
            moved[fresh.to(t.device)] = 0
            t.copy_(moved)


class SparseDeltaMixin:
    """``W' = W + scatter(values at indices)`` for an :class:`AdapterModule`: buffer ``indices``, parameter ``values``.

    Call :meth:`init_sparse` from ``__init__``. Provides ``override_params``, ``sparse_delta``,
    ``merge_into`` / ``unmerge_from`` (exact), the load checks of ``indices``, the gradient probe
    and :meth:`set_support`.
    """

    indices: torch.Tensor
    values: nn.Parameter
    module_name: str
    numel: int

    def init_sparse(self, base: nn.Module, module_name: str, indices: torch.Tensor) -> None:
        w = base.weight
        self.module_name = module_name
        self.numel = w.numel()
        self.register_buffer("indices", indices.to(device=w.device, dtype=torch.long))  # type: ignore[attr-defined]
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=float_dtype_for_adapter(w.dtype), device=w.device))
        #: the capture mode while the gradient probe is on (None: off)
        self.capture: str | None = None
        #: the dense accumulated gradient score (float32, shaped like the weight) while capturing
        self.grad_score: torch.Tensor | None = None

    # -- forward ---------------------------------------------------------------------------
    def sparse_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with ``values`` added at ``indices`` (a new tensor; ``weight`` is not modified)."""
        v = self.values
        flat = weight.reshape(-1)
        if flat.dtype != v.dtype:
            return flat.to(v.dtype).index_add(0, self.indices, v).to(weight.dtype).view(weight.shape)
        return flat.index_add(0, self.indices, v).view(weight.shape)

    def override_params(self, params: dict[str, torch.Tensor], site: Any) -> dict[str, torch.Tensor]:
        weight = params.get("weight", site.base.weight)
        w = self.sparse_weight(weight)
        if self.capture is not None and torch.is_grad_enabled():
            probe = torch.zeros((), dtype=w.dtype, device=w.device, requires_grad=True)
            w = w + probe
            w.register_hook(self._accumulate)
        return {**params, "weight": w}

    def fused_support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions and values the fast path adds to the weight (SaRA adds its frozen part)."""
        return self.indices, self.values

    def fused_forward(self, x: torch.Tensor, site: Any) -> torch.Tensor | None:
        """The whole layer as one :class:`SparseDeltaLinear` node, or None for the general path."""
        base = site.base
        if type(base) is not nn.Linear or self.capture is not None:
            return None
        w, b = base.weight, base.bias
        if is_quantized(w) or w.requires_grad or (b is not None and b.requires_grad):
            return None
        if x.dtype != w.dtype or w.dtype != self.values.dtype or x.device != w.device:
            return None
        idx, vals = self.fused_support()
        return SparseDeltaLinear.apply(x, w, b, idx, vals)

    # -- the dense-gradient probe -----------------------------------------------------------
    def capture_gradients(self, mode: str | None) -> None:
        """Start (``"sum"``: Σ g, ``"abs"``: Σ |g|, ``"square"``: Σ g²) or stop (None) accumulating ``∂loss/∂W'``."""
        if mode is not None and mode not in CAPTURE_MODES:
            raise ValueError(f"capture_gradients: mode={mode!r} is not one of {CAPTURE_MODES} or None")
        self.capture = mode

    def take_score(self) -> torch.Tensor | None:
        """The accumulated score (``|Σ g|`` for mode ``"sum"``) as a flat float32 tensor, then forget it."""
        s, mode = self.grad_score, self.capture
        self.grad_score = None
        if s is None:
            return None
        return (s.abs() if mode == "sum" else s).reshape(-1)

    @torch.no_grad()
    def _accumulate(self, g: torch.Tensor) -> None:
        g = g.detach().float()
        if self.capture == "abs":
            g = g.abs()
        elif self.capture == "square":
            g = g.square()
        if self.grad_score is None:
            self.grad_score = g.clone()
        else:
            self.grad_score += g

    # -- changing the support -----------------------------------------------------------------
    @torch.no_grad()
    def set_support(self, indices: torch.Tensor, values: torch.Tensor, source: torch.Tensor,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
        """Move to a new support of the same size: ``indices`` (any order, no duplicates) with ``values``;
        ``source[j]`` is the old slot entry ``j`` comes from, or -1 for a new entry (its optimizer state
        is zeroed). The result is stored sorted; ``values`` stays the same Parameter object."""
        order = torch.argsort(indices)
        self.indices.copy_(indices[order].to(self.indices.device))
        self.values.data.copy_(values[order].to(self.values.dtype))
        src = source.to(order.device)[order]
        remap_optimizer_state(optimizer, self.values, src.clamp_min(0), src < 0)

    # -- merging ---------------------------------------------------------------------------
    def sparse_delta(self, base: nn.Module) -> torch.Tensor:
        w = base.weight
        dense = torch.zeros(w.numel(), dtype=self.values.dtype, device=w.device)
        return dense.index_add(0, self.indices, self.values.detach()).view(w.shape)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.sparse_delta(base)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        self._add_to(base.weight, self.values)

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        self._add_to(base.weight, -self.values)

    def _add_to(self, w: torch.Tensor, v: torch.Tensor) -> None:
        if w.is_contiguous():
            flat = w.data.view(-1)
            flat[self.indices] = flat[self.indices] + v.to(w.dtype)
        else:
            flat = w.data.reshape(-1).clone()
            flat[self.indices] = flat[self.indices] + v.to(w.dtype)
            w.data.copy_(flat.view(w.shape))

    # -- loading -----------------------------------------------------------------------------
    def check_loaded_indices(self, state_dict: dict[str, Any], prefix: str) -> bool:
        """Check a file's ``indices`` (1-D integer, in range, sorted, unique); True if the file has them."""
        idx = state_dict.get(prefix + "indices")
        if not isinstance(idx, torch.Tensor):
            return False
        name = f"{self.module_name}.indices"
        if idx.is_floating_point() or idx.dtype == torch.bool or idx.dim() != 1:
            raise AdapterLoadError(f"tensor {name} must be a 1-D integer tensor, got {idx.dtype} {tuple(idx.shape)}")
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.numel:
                raise AdapterLoadError(f"tensor {name} holds position {hi if hi >= self.numel else lo} but the "
                                       f"weight has {self.numel} entries (valid: 0..{self.numel - 1})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise AdapterLoadError(f"tensor {name} must be sorted and free of duplicates")
        return True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.check_loaded_indices(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]

    def density_of(self) -> float:
        """The fraction of the weight's entries in the support."""
        return self.indices.numel() / self.numel


class SparseDeltaLayer(SparseDeltaMixin, AdapterModule):
    """An adapter that is a sparse delta and nothing else (SparseFT, SaRA, SpIEL build on it)."""

    transforms_input = False
    overrides_params = True
    adapts_output = False

    def __init__(self, config: Any, base: nn.Module, module_name: str, indices: torch.Tensor) -> None:
        AdapterModule.__init__(self, config, base)
        self.init_sparse(base, module_name, indices)

    def extra_repr(self) -> str:
        return f"method={self.config.method}, entries={self.indices.numel()}/{self.numel}"


def sampled_weight_grad(g: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """``(gᵀ x).view(-1)[indices]``: the ``k`` entries of the weight gradient that the sparse values need.

    One dense product (BLAS) and a gather. Gathering ``Σ_t g[t, i // in] · x[t, i % in]`` entry by
    entry does ``k/(out·in)`` of the arithmetic but is memory-bound: measured on 2 CPU cores
    (512 tokens, a 1536×576 weight) it is slower than the product from 1% density up, and only
    ~1.5× faster at 0.1%. The dense product is transient (freed at once), never kept for backward.
    """
    g2 = g.reshape(-1, g.shape[-1])
    x2 = x.reshape(-1, in_features)
    return g2.t().matmul(x2).view(-1).index_select(0, indices)


class SparseDeltaLinear(torch.autograd.Function):
    """``y = x (W + scatter(values at indices))ᵀ + b`` with ``W`` and ``b`` frozen; keeps only ``x`` (and the
    resident ``W``, ``values``) for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        w = weight.reshape(-1).index_add(0, indices, values.detach().to(weight.dtype)).view(weight.shape)
        ctx.save_for_backward(x, weight, indices, values)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, indices, values = ctx.saved_tensors
        gx = gv = None
        if ctx.needs_input_grad[0]:
            w = weight.reshape(-1).index_add(0, indices, values.detach().to(weight.dtype)).view(weight.shape)
            gx = g.matmul(w)
        if ctx.needs_input_grad[4]:
            gv = sampled_weight_grad(g, x, indices, weight.shape[1]).to(values.dtype)
        return gx, None, None, None, gv
