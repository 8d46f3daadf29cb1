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

Not implemented: the paper's progressive re-selection of the support during training and its
sparse backward kernel (the gradient of ``values`` is gathered from the dense weight gradient that
autograd computes for the layer, as for :class:`~peftkit.methods.sparse.SparseFT`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig
from ..core.errors import ConfigError
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

    def validate(self) -> None:
        owner = type(self).__name__
        q = self.quantile
        if not isinstance(q, (int, float)) or isinstance(q, bool) or not 0.0 < q <= 1.0:
            raise ConfigError(f"{owner}: quantile must be in (0, 1] (the fraction of entries trained, e.g. 0.1), got {q!r}")
        w = self.nuclear_weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not w >= 0.0 or w == float("inf"):
            raise ConfigError(f"{owner}: nuclear_weight must be a finite number >= 0, got {w!r}")

    def build(self, base: nn.Module, module_name: str) -> SaRALayer:
        return SaRALayer(self, base, module_name)

    def regularization_loss(self, modules: dict[str, AdapterModule], info: Any) -> torch.Tensor | None:
        """``nuclear_weight · Σ ‖Δ_l‖_*`` over the adapter's layers (None when ``nuclear_weight`` is 0)."""
        if not self.nuclear_weight:
            return None
        terms = [m.nuclear_norm() for m in modules.values() if isinstance(m, SaRALayer)]
        return self.nuclear_weight * torch.stack(terms).sum() if terms else None


class SaRALayer(SparseDeltaLayer):
    """The sparse delta at the smallest ``|W0|``; ``nuclear_norm()`` gives ``‖Δ‖_*`` with its subgradient."""

    def __init__(self, config: SaRA, base: nn.Module, module_name: str) -> None:
        w = base.weight
        idx = select_support("smallest", count_for(config.quantile, w.numel()), w, module_name)
        super().__init__(config, base, module_name, idx)
        #: the weight as a matrix: (first axis, the rest); a transposed layout has the same singular values
        self.matrix_shape = (w.shape[0], w.numel() // w.shape[0])

    def delta_matrix(self) -> torch.Tensor:
        """``Δ`` as a dense float32 matrix ``(weight.shape[0], rest)`` (differentiable in ``values``)."""
        flat = torch.zeros(self.numel, dtype=torch.float32, device=self.values.device)
        return flat.index_add(0, self.indices, self.values.float()).view(self.matrix_shape)

    def nuclear_norm(self) -> torch.Tensor:
        return NuclearNorm.apply(self.delta_matrix())

    def extra_repr(self) -> str:
        return f"method=sara, entries={self.indices.numel()}/{self.numel} (smallest |W0|)"


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
