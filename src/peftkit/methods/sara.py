"""SaRA: train the least effective entries of each weight (Hu et al. 2024, arXiv:2409.06633).

The entries of a pre-trained weight with the smallest magnitudes contribute least to its
output; SaRA trains exactly those. For a frozen weight ``W0`` the support ``I`` is the
``k = max(1, round(quantile · numel(W0)))`` positions with the smallest ``|W0|`` (``quantile``
0.1 trains the 10% smallest entries; the paper uses a threshold between the 10% and 20%
quantiles), and the adapter trains one delta per position::

    W' = W0 + Δ,      Δ = scatter_I(values)   (values start at 0: the model starts as the base model)

Every entry outside ``I`` keeps its pre-trained value bit for bit, in training and after a merge.
Merging is exact (``W0.view(-1)[I] += values``).

**Low-rank constraint.** The paper keeps ``Δ`` low-rank with a nuclear-norm penalty; with
``nuclear_weight = λ > 0`` the training loss gets ``λ · Σ_layers ‖Δ_l‖_*`` through the
``regularization_loss`` hook (``‖Δ‖_* = Σ σ_i(Δ)``, ``Δ`` as the matrix ``(weight.shape[0], rest)``: ``(out, in)`` for
linear layers, ``(out, in·k)`` for convolutions; transposed layouts have the same norm).
Its gradient is the subgradient ``U_r V_rᵀ`` over the non-zero singular values (so it is 0 at
``Δ = 0``), gathered back at ``I``. Cost: one SVD of a dense ``(out, in)`` matrix per targeted
layer per optimizer step, ``O(out · in · min(out, in))`` time and one dense float32 copy of
``Δ``; with ``λ = 0`` (the default here: the paper gives no single value) nothing is computed.

**Re-selection** (the paper's progressive parameter adjustment; ``reselect_every = T > 0``):
after every ``T`` optimizer steps (not after the last) the support moves to the ``k`` entries
with the smallest *current* magnitude ``|W0 + Δ|``. Entries that leave it (they became
"effective") keep their learned delta, frozen, in ``fixed_indices`` / ``fixed_values``
(saved; merged with the rest); entries that stay keep their value and optimizer state; new
entries start at 0 with a zeroed optimizer state (``info.optimizer``). The model does not change
at a re-selection, ``k`` (the trained fraction) stays ``quantile``, and entries never selected
stay bitwise equal to ``W0``. The nuclear norm is taken of the whole ``Δ`` (trained + frozen).
Each re-selection can add up to ``k`` entries to the frozen part (memory and file size grow
with it: with a large learning rate most entries leave at once; measured on SmolLM2 q/v,
quantile 0.05, lr 0.05, two re-selections froze 1.0M entries next to 0.66M trained), so use few
re-selections (a large ``reselect_every``).

Not implemented: the paper's sparse backward kernel (the gradient of ``values`` is gathered from
the dense weight gradient that autograd computes for the layer, as for
:class:`~peftkit.methods.sparse.SparseFT`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig
from ..core.errors import AdapterLoadError, ConfigError
from ..core.layers import CONV1D, CONV2D, EMBEDDING, HF_CONV1D, LINEAR
from ..core.registry import register
from ..core.targets import ALL_LINEAR
from .sparse_delta import SparseDeltaLayer, count_for, select_support


@register
@dataclass
class SaRA(AdapterConfig):
    """Train the ``quantile`` smallest-magnitude entries of each targeted weight; optional nuclear-norm penalty."""

    method = "sara"
    family = "sparse"
    paper = "Hu et al. 2024, SaRA (arXiv:2409.06633)"
    formula = "W0 + scatter(values at the smallest |W0|) (+ λ‖Δ‖_* in the loss); values"
    supported_layers = (LINEAR, HF_CONV1D, CONV1D, CONV2D, EMBEDDING)
    default_targets = ALL_LINEAR

    quantile: float = 0.1
    nuclear_weight: float = 0.0
    reselect_every: int = 0

    def validate(self) -> None:
        owner = type(self).__name__
        q = self.quantile
        if not isinstance(q, (int, float)) or isinstance(q, bool) or not 0.0 < q <= 1.0:
            raise ConfigError(f"{owner}: quantile must be in (0, 1] (the fraction of entries trained, e.g. 0.1), got {q!r}")
        w = self.nuclear_weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not w >= 0.0 or w == float("inf"):
            raise ConfigError(f"{owner}: nuclear_weight must be a finite number >= 0, got {w!r}")
        r = self.reselect_every
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ConfigError(f"{owner}: reselect_every must be an integer >= 0 (0: never), got {r!r}")

    def build(self, base: nn.Module, module_name: str) -> SaRALayer:
        return SaRALayer(self, base, module_name)

    def regularization_loss(self, modules: dict[str, AdapterModule], info: Any) -> torch.Tensor | None:
        """``nuclear_weight · Σ ‖Δ_l‖_*`` over the adapter's layers (None when ``nuclear_weight`` is 0)."""
        if not self.nuclear_weight:
            return None
        terms = [m.nuclear_norm() for m in modules.values() if isinstance(m, SaRALayer)]
        return self.nuclear_weight * torch.stack(terms).sum() if terms else None

    def after_step(self, modules: dict[str, AdapterModule], info: Any) -> None:
        """Every ``reselect_every`` steps (not after the last): move each support to the smallest ``|W0 + Δ|``."""
        if not self.reselect_every or (info.step + 1) % self.reselect_every:
            return
        if info.total_steps is not None and info.step + 1 >= info.total_steps:
            return
        for path, m in modules.items():
            if isinstance(m, SaRALayer):
                m.reselect(info.model.get_submodule(path).base.weight, info.optimizer)


class SaRALayer(SparseDeltaLayer):
    """The trained sparse delta (``indices``, ``values``) plus the frozen one left by re-selections
    (``fixed_indices``, ``fixed_values``; empty until then); ``nuclear_norm()`` gives ``‖Δ‖_*``."""

    resizable_state = ("fixed_indices", "fixed_values")

    def __init__(self, config: SaRA, base: nn.Module, module_name: str) -> None:
        w = base.weight
        idx = select_support("smallest", count_for(config.quantile, w.numel()), w, module_name)
        super().__init__(config, base, module_name, idx)
        #: the weight as a matrix: (first axis, the rest); a transposed layout has the same singular values
        self.matrix_shape = (w.shape[0], w.numel() // w.shape[0])
        self.register_buffer("fixed_indices", torch.zeros(0, dtype=torch.long, device=w.device))
        self.register_buffer("fixed_values", torch.zeros(0, dtype=self.values.dtype, device=w.device))

    # -- the frozen part ------------------------------------------------------------------------
    def sparse_weight(self, weight: torch.Tensor) -> torch.Tensor:
        w = super().sparse_weight(weight)
        if not self.fixed_indices.numel():
            return w
        flat = w.reshape(-1)
        return flat.index_add(0, self.fixed_indices, self.fixed_values.to(flat.dtype)).view(w.shape)

    def fused_support(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fixed_indices.numel():
            return self.indices, self.values
        return torch.cat([self.indices, self.fixed_indices]), torch.cat([self.values, self.fixed_values.to(self.values.dtype)])

    def sparse_delta(self, base: nn.Module) -> torch.Tensor:
        d = super().sparse_delta(base)
        return d.reshape(-1).index_add(0, self.fixed_indices, self.fixed_values.to(d.dtype)).view(d.shape)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        base.weight.data += self.sparse_delta(base).to(base.weight.dtype)

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        base.weight.data -= self.sparse_delta(base).to(base.weight.dtype)

    @torch.no_grad()
    def reselect(self, weight: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Move the support to the ``k`` smallest ``|W0 + Δ|``; the leaving entries' deltas join the frozen
        part. Returns how many entries changed. The model's function is unchanged."""
        k = self.indices.numel()
        current = weight.detach().float().reshape(-1) + self.sparse_delta_flat()
        new = torch.topk(-current.abs(), k, sorted=False).indices.sort().values
        old = self.indices
        stays = torch.isin(old, new)
        leaving = ~stays
        if not bool(leaving.any()):
            return 0
        vals = self.values.detach()
        fixed_i = torch.cat([self.fixed_indices, old[leaving]])
        fixed_v = torch.cat([self.fixed_values, vals[leaving].to(self.fixed_values.dtype)])
        uniq, inverse = torch.unique(fixed_i, sorted=True, return_inverse=True)
        self.fixed_indices = uniq
        self.fixed_values = torch.zeros(uniq.numel(), dtype=fixed_v.dtype, device=fixed_v.device).index_add(0, inverse, fixed_v)
        pos = torch.searchsorted(old, new).clamp_max(k - 1)  # old is sorted: the slot an entry that stays comes from
        source = torch.where(old[pos] == new, pos, torch.full_like(pos, -1))
        new_vals = torch.where(source >= 0, vals[source.clamp_min(0)], torch.zeros_like(vals))
        self.set_support(new, new_vals, source, optimizer)
        return int(leaving.sum())

    def sparse_delta_flat(self) -> torch.Tensor:
        """The whole ``Δ`` (trained + frozen) as a flat float32 tensor (no gradient)."""
        flat = torch.zeros(self.numel, dtype=torch.float32, device=self.values.device)
        flat.index_add_(0, self.indices, self.values.detach().float())
        return flat.index_add_(0, self.fixed_indices, self.fixed_values.float())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        fi, fv = state_dict.get(prefix + "fixed_indices"), state_dict.get(prefix + "fixed_values")
        if isinstance(fi, torch.Tensor) and isinstance(fv, torch.Tensor):
            name = f"{self.module_name}.fixed_indices"
            if fi.dim() != 1 or fi.shape != fv.shape or fi.is_floating_point():
                raise AdapterLoadError(f"tensor {name} must be 1-D integer with one value per index in fixed_values, "
                                       f"got {fi.dtype} {tuple(fi.shape)} and {tuple(fv.shape)}")
            if fi.numel() and (int(fi.min()) < 0 or int(fi.max()) >= self.numel):
                raise AdapterLoadError(f"tensor {name} holds positions outside the weight's {self.numel} entries")
            # the frozen part's size depends on the training run: take the file's
            self.fixed_indices = torch.zeros(fi.shape, dtype=torch.long, device=self.fixed_indices.device)
            self.fixed_values = torch.zeros(fv.shape, dtype=self.fixed_values.dtype, device=self.fixed_values.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- the penalty ----------------------------------------------------------------------------
    def delta_matrix(self) -> torch.Tensor:
        """``Δ`` (trained + frozen) as a dense float32 matrix ``(weight.shape[0], rest)``, differentiable in ``values``."""
        flat = torch.zeros(self.numel, dtype=torch.float32, device=self.values.device)
        flat = flat.index_add(0, self.fixed_indices, self.fixed_values.float())
        return flat.index_add(0, self.indices, self.values.float()).view(self.matrix_shape)

    def nuclear_norm(self) -> torch.Tensor:
        return NuclearNorm.apply(self.delta_matrix())

    def extra_repr(self) -> str:
        return (f"method=sara, entries={self.indices.numel()}/{self.numel} (smallest |W0|), "
                f"frozen={self.fixed_indices.numel()}")


class NuclearNorm(torch.autograd.Function):
    """``‖D‖_* = Σ σ_i(D)``; backward ``grad · U_r V_rᵀ`` over singular values above ``max(m, n) · eps · σ_max``.

    torch's SVD backward divides by ``σ_i² − σ_j²`` and is NaN for repeated singular values (all of
    them are 0 at ``D = 0``); the subgradient here is finite everywhere and 0 at ``D = 0``.
    """

    @staticmethod
    def forward(ctx: Any, d: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(d.detach(), full_matrices=False)
        tol = max(d.shape) * torch.finfo(s.dtype).eps * (s.max() if s.numel() else 0.0)
        r = int((s > tol).sum()) if s.numel() else 0
        ctx.save_for_backward(u[:, :r] @ vh[:r])
        return s.sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (sub,) = ctx.saved_tensors
        return grad * sub
