"""LoKr: low-rank Kronecker product adaptation (Edalati et al., KronA, 2022, arXiv:2212.10650; LyCORIS).

For a frozen layer ``y = W x + b`` with ``W ∈ R^{out×in}`` the shapes are split as
``out = a·b``, ``in = c·d`` (peft's ``factorization``: the divisor pair closest to the square
root, or one factor equal to ``decompose_factor``) and

    ΔW = s · C ⊗ M,    C ∈ R^{a×c},  M ∈ R^{b×d},   s = alpha / r

where ``C`` is a full matrix (``lokr_w1``) unless ``decompose_both`` and ``r < max(a, c)/2``
(then ``C = W1a W1b``), and ``M`` is ``W2a W2b`` of rank ``r`` when ``r < max(b, d)/2`` (else
the full ``lokr_w2``). ``rank(C ⊗ M) = rank(C)·rank(M)``. At init ``C = 0`` (``W1a = 0``), so
``ΔW = 0``; ``W``, ``b`` are frozen and the factors train. Convolutions: ``M`` carries the kernel
(``b×d×k…``; with ``use_effective_conv2d`` a CP core ``lokr_t2`` and ``W2a ∈ R^{r×b}``,
``W2b ∈ R^{r×d}``), and ``C ⊗ M`` is laid out like the kernel. (One exception kept for file
compatibility: a Conv1d with a full ``lokr_w2`` of shape ``b×d×k`` goes through ``torch.kron`` with
the 2-D ``C`` as peft 0.21.2 does, which lays the product out differently; the update is still
``s·C ⊗ M`` up to that fixed permutation of entries.)

Linear layers never build ``ΔW``: with ``x`` viewed as ``X ∈ R^{c×d}`` (row-major, so
``in = p·d + q``), ``(C ⊗ M) x = vec(C X Mᵀ)``, which costs ``c·d·b + a·c·b`` per token
instead of ``a·b·c·d`` (peft builds the dense ``ΔW``).

Matches peft 0.21.2's ``LoKrConfig`` (tensor names ``lokr_w1``, ``lokr_w1_a``, ``lokr_w1_b``,
``lokr_w2``, ``lokr_w2_a``, ``lokr_w2_b``, ``lokr_t2``; init; dropouts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import positive_int
from ..core.errors import ConfigError
from ..core.layers import CONV1D, CONV2D, LINEAR, layer_kind
from ..core.registry import register
from ..formats.codec import HFCodec
from .lycoris import (
    LYCORIS_HF_OPTIONS,
    LycorisOptions,
    conv_delta,
    lycoris_options_from_hf,
    lycoris_options_to_hf,
    rank_mask,
    skip_module,
)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = dimension`` and ``m ≤ n`` (peft's rule).

    With ``factor > 0`` dividing ``dimension``: ``(factor, dimension/factor)`` (then not sorted).
    Otherwise ``m`` grows through the divisors while ``m + n`` does not grow and ``m ≤ factor``
    (``factor = -1``: no bound), which gives the divisor pair closest to ``√dimension``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nm = m + 1
        while dimension % nm:
            nm += 1
        nn_ = dimension // nm
        if nm + nn_ > m + n or nm > bound:
            break
        m, n = nm, nn_
    return (n, m) if m > n else (m, n)


@register
@dataclass
class LoKr(LycorisOptions):
    """Kronecker product ``s·C ⊗ (W2a W2b)`` with the weight shape split by :func:`factorization`, ``s = alpha/r``.

    ``decompose_both``: ``C`` low-rank too when ``r < max(a, c)/2``. ``decompose_factor``: the wanted
    size of the first factor (-1: near the square root). ``rank_dropout`` (rows of ``ΔW``,
    rescaled by the kept fraction when ``rank_dropout_scale``) and ``module_dropout`` act in training.
    """

    method = "lokr"
    family = "low-rank"
    paper = "Edalati et al. 2022 (arXiv:2212.10650), LyCORIS"
    formula = "W x + s·(C ⊗ W2a W2b) x; C (or W1a W1b), W2a, W2b"
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        if self.decompose_factor != -1:
            try:
                positive_int(owner, "decompose_factor", self.decompose_factor)
            except ConfigError:
                raise ConfigError(f"{owner}: decompose_factor must be -1 (near the square root) or a positive "
                                  f"integer, got {self.decompose_factor!r}") from None

    def build(self, base: nn.Module, module_name: str) -> LoKrLayer:
        return LoKrLayer(self, base, module_name)


def kron_shapes(out_f: int, in_f: int, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((a, b), (c, d))`` with ``out = a·b``, ``in = c·d``: ``C`` is ``a×c`` and ``M`` is ``b×d``."""
    return factorization(out_f, factor), factorization(in_f, factor)


def kron_first_two(c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``C ⊗ M`` over the first two axes (``M``'s further kernel axes carried along): entry
    ``[i·b + j, p·d + q, …] = C[i, p] · M[j, q, …]``, by broadcasting (``torch.kron`` views its inputs,
    which fails on the strides einsum can return)."""
    a, c_ = c.shape
    b, d, *rest = m.shape
    ones = [1] * len(rest)
    prod = c.reshape(a, 1, c_, 1, *ones) * m.reshape(1, b, 1, d, *rest)
    return prod.reshape(a * b, c_ * d, *rest)


class LoKrLayer(AdapterModule):
    """``ΔW = s · C ⊗ M`` on one layer; see the module docstring for the factor names and shapes."""

    def __init__(self, config: LoKr, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        self.kind = kind = layer_kind(base)
        self.r = r = config.rank_for(module_name)
        self.scaling = config.scale_for(module_name)
        self.rank_dropout = float(config.rank_dropout)
        self.module_dropout = float(config.module_dropout)
        self.rank_dropout_scale = bool(config.rank_dropout_scale)
        shape = tuple(base.weight.shape)
        kernel = shape[2:]
        (a, b), (c, d) = kron_shapes(shape[0], shape[1], config.decompose_factor)
        self.factors = (a, b, c, d)
        use_w1 = not (config.decompose_both and r < max(a, c) / 2)
        use_w2 = r >= max(b, d) / 2
        self.cp = (bool(config.use_effective_conv2d) and kind in (CONV1D, CONV2D) and math.prod(kernel) > 1
                   and not use_w2)
        if use_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
        if use_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
        elif self.cp:
            k = (*kernel, 1) if kind == CONV1D else kernel
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *k))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, b))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(kernel)))
        with torch.no_grad():
            if use_w1:
                nn.init.zeros_(self.lokr_w1)
            else:
                nn.init.zeros_(self.lokr_w1_a)
                nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
            for n in ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
                if hasattr(self, n):
                    nn.init.kaiming_uniform_(getattr(self, n), a=math.sqrt(5))
        self._weight_shape = shape

    # -- factors ---------------------------------------------------------------------------
    def first_factor(self) -> torch.Tensor:
        """``C`` (``a×c``)."""
        return self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b

    def second_factor(self) -> torch.Tensor:
        """``M``: ``b×d`` for linear layers, ``b×d×k…`` (or the flat ``b×(d·k)``) for convolutions."""
        if hasattr(self, "lokr_w2"):
            return self.lokr_w2
        if self.cp:  # b×d×k_h×k_w (Conv1d: b×d×k×1)
            return torch.einsum("ijkl,ip,jr->prkl", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return self.lokr_w2_a @ self.lokr_w2_b

    def delta_weight_tensor(self) -> torch.Tensor:
        """``s · C ⊗ M`` laid out like the base weight (with autograd)."""
        c, m = self.first_factor(), self.second_factor()
        if m.dim() == 3:  # a full lokr_w2 of a Conv1d goes through torch.kron as is, as peft does, so files agree
            return (torch.kron(c, m) * self.scaling).reshape(self._weight_shape)
        return (kron_first_two(c, m) * self.scaling).reshape(self._weight_shape)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.delta_weight_tensor()

    # -- forward ---------------------------------------------------------------------------
    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        if skip_module(self, self.module_dropout):
            return y
        c = self.first_factor()
        xa = x if x.dtype == c.dtype else x.to(c.dtype)
        if self.kind == LINEAR:
            a, b, cc, d = self.factors
            m = self.second_factor()
            xs = xa.reshape(-1, cc, d)
            # (C ⊗ M) x = vec(C X Mᵀ): first X Mᵀ (tokens×c×b), then C on the c axis
            h = torch.matmul(xs, m.t())
            delta = torch.matmul(c, h).reshape(*x.shape[:-1], a * b)
            delta = delta * self.scaling
        else:
            delta = conv_delta(site.base, xa, self.delta_weight_tensor())
        if self.training and self.rank_dropout > 0:
            mask = rank_mask(self._weight_shape[0], self.rank_dropout, self.rank_dropout_scale, delta)
            delta = delta * (mask if self.kind == LINEAR else mask.view(-1, *([1] * (delta.dim() - 2))))
        return y + delta if delta.dtype == y.dtype else y + delta.to(y.dtype)


# -- Hugging Face PEFT format: peft_type "LOKR", tensors named as ours ----------------------------
def _lokr_to_hf(config: LoKr) -> dict[str, Any]:
    out = lycoris_options_to_hf(config, "LoKr")
    out.update(decompose_both=config.decompose_both, decompose_factor=config.decompose_factor,
               rank_dropout_scale=config.rank_dropout_scale)
    return out


def _lokr_from_hf(d: dict[str, Any]) -> LoKr:
    return LoKr(**lycoris_options_from_hf(d), decompose_both=d.get("decompose_both", False),
                decompose_factor=d.get("decompose_factor", -1), rank_dropout_scale=d.get("rank_dropout_scale", False))


LoKr.hf_codec = HFCodec(
    peft_type="LOKR",
    config_to_hf=lambda c, targets: _lokr_to_hf(c),
    config_from_hf=_lokr_from_hf,
    read_names={n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
    options=LYCORIS_HF_OPTIONS | {"decompose_both", "decompose_factor", "rank_dropout_scale"},
)
