"""BOFT: butterfly orthogonal fine-tuning (Liu et al., 2024, arXiv:2311.06243), with peft 0.21.2's conventions.

For a frozen layer ``y = W x + b`` (``W ∈ R^{out×d}``; a Conv2d through its ``(out, in·kh·kw)``
matrix view, see :mod:`peftkit.core.layers`) BOFT learns an orthogonal ``M ∈ R^{d×d}`` that is a
product of ``m`` sparse butterfly factors, and a per-output scale ``s``:

    y = s ⊙ (W Mᵀ x) + b,      M = B_{m−1} ⋯ B_1 B_0,      B_i = P_i diag(R_{i,1}, …, R_{i,n}) P_iᵀ

Every factor is block diagonal with ``n`` orthogonal ``b×b`` blocks (``n · b = d``), conjugated by a
fixed butterfly permutation ``P_i`` (Cooley–Tukey pattern, ``P_0 = I``): within each group of
``b·2^i`` consecutive features, the chunks of ``b/2`` features are reordered evens-then-odds, so
factor ``i`` mixes features ``b·2^{i−1}`` apart and ``m`` factors reach blocks of ``b·2^{m−1}``
features with ``m·n·b²`` numbers. ``m = 1`` is block-diagonal OFT (Qiu et al., 2023).

Each block is the Cayley transform of the skew part of a trained ``b×b`` matrix ``A``:
``Q = (A − Aᵀ)/2``, ``R = (I − Q)(I + Q)⁻¹`` (exactly orthogonal; OFT's batched solve,
:func:`peftkit.methods.oft.cayley`). Trained: ``boft_R`` ``(m, n, b, b)`` (zeros at init, so ``M = I``)
and ``boft_s`` (ones at init), so the model starts unchanged; ``W`` and ``b`` are frozen.
Merging folds both into the weight, ``W ← diag(s) W Mᵀ``; unmerging applies the exact inverse
``diag(1/s) W M``.

Options (peft's ``BOFTConfig``): give one of ``boft_block_size`` (``b``) or ``boft_block_num``
(``n``) — with neither, ``b = 4`` (peft's default); ``boft_n_butterfly_factor`` is ``m``;
``boft_dropout`` is peft's multiplicative dropout: in training, ``⌊p·n⌋`` random blocks of one
random factor are replaced by the identity. For ``m > 1`` the layer must split as
``d = n · b`` with ``b`` even and ``2^{m−1}`` dividing ``n``; a layer that does not is refused,
naming the valid sizes.

Layer support: ``nn.Linear`` and ``nn.Conv2d`` (groups = 1), as peft, plus transformers'
``Conv1D`` (no Hugging Face form: peft has no BOFT for it). Linear layers rotate the input
``x ← x M`` with the structured factors (``O(d·b)`` per token, no dense ``d×d`` matrix) and scale the
output; a Conv2d runs with the rotated and scaled weight ``diag(s) W Mᵀ``, which is peft's forward.
(peft's Conv2d forward uses ``padding[0]``/``stride[0]`` and no dilation, so only square kernels
with equal paddings/strides and dilation 1 have a Hugging Face form.) On CPU peft 0.21.2 silently
uses ``m = 1`` (its butterfly path needs a CUDA extension); peftkit computes the configured ``m``
everywhere, which is what peft computes on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, positive_int, probability
from ..core.errors import ConfigError
from ..core.layers import CONV2D, HF_CONV1D, LINEAR, as_matrix, from_matrix, layer_kind
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from ..formats.codec import HFCodec
from .oft import _dim_words, cayley, rotated_dim, rotation_problem

DEFAULT_BLOCK_SIZE = 4  # peft's default boft_block_size


def _given(v: Any) -> bool:
    return v is not None and v != 0


@register
@dataclass
class BOFT(AdapterConfig):
    """Butterfly orthogonal fine-tuning: ``y = s ⊙ (W Mᵀ x) + b`` with ``M`` a product of butterfly factors.

    Give at most one of ``boft_block_size`` and ``boft_block_num`` (0 or None: not given; with
    neither, ``boft_block_size=4``). ``boft_n_butterfly_factor`` = number of factors ``m``.
    """

    method = "boft"
    family = "orthogonal"
    paper = "Liu et al. 2024 (arXiv:2311.06243); peft's BOFT conventions"
    formula = "s ⊙ (W Mᵀ x), M = Π_i P_i diag(R_i) P_iᵀ butterfly-orthogonal (Cayley); R, s"
    supported_layers = (LINEAR, HF_CONV1D, CONV2D)
    default_targets = ATTENTION_QV  # peft's BOFT targets LoRA's defaults

    boft_block_size: int | None = None
    boft_block_num: int | None = None
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0

    def validate(self) -> None:
        owner = type(self).__name__
        if _given(self.boft_block_size) and _given(self.boft_block_num):
            raise ConfigError(f"{owner}: give boft_block_size or boft_block_num, not both (got boft_block_size="
                              f"{self.boft_block_size!r}, boft_block_num={self.boft_block_num!r}); "
                              "boft_block_size x boft_block_num = the layer's input size, so the other one is derived")
        if _given(self.boft_block_num):
            positive_int(owner, "boft_block_num", self.boft_block_num)
        elif _given(self.boft_block_size):
            positive_int(owner, "boft_block_size", self.boft_block_size)
        positive_int(owner, "boft_n_butterfly_factor", self.boft_n_butterfly_factor)
        probability(owner, "boft_dropout", self.boft_dropout)

    # -- per-layer layout ----------------------------------------------------------------
    def layout(self, base: nn.Module) -> tuple[int, int, int]:
        """``(factors m, blocks n, block size b)`` for ``base``; ConfigError listing the valid values if none fit."""
        d = rotated_dim(base)
        m = self.boft_n_butterfly_factor
        by_num = _given(self.boft_block_num)
        name = "boft_block_num" if by_num else "boft_block_size"
        value = int(self.boft_block_num if by_num else (self.boft_block_size or DEFAULT_BLOCK_SIZE))
        n, b = (value, d // value) if by_num else (d // value, value)
        if d % value or not _fits(d, n, b, m):
            valid = [k for k in range(1, d + 1) if d % k == 0 and _fits(d, *((k, d // k) if by_num else (d // k, k)), m)]
            shown = ", ".join(map(str, valid[:12])) + (" ..." if len(valid) > 12 else "")
            rule = (f" with boft_n_butterfly_factor={m} (the block size must be even and the number of blocks a "
                    f"multiple of {2 ** (m - 1)})" if m > 1 else "")
            raise ConfigError(f"{name}={value} does not split the rotated size {d} ({_dim_words(base)}) into "
                              f"blocks of size >= 2{rule}; valid {name} values: {shown or 'none'}")
        return m, n, b

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        return super().check_layer(base, module_name) or rotation_problem(self, base)

    def build(self, base: nn.Module, module_name: str) -> BOFTLayer:
        return BOFTLayer(self, base)


def _fits(d: int, n: int, b: int, m: int) -> bool:
    """Whether ``n`` blocks of size ``b`` (``n·b = d``) carry ``m`` butterfly factors."""
    if n * b != d or b < 2:
        return False
    return m == 1 or (b % 2 == 0 and n % (2 ** (m - 1)) == 0)


def butterfly_permutation(d: int, block_size: int, level: int) -> torch.Tensor:
    """Indices ``p`` of factor ``level``'s permutation, ``(P v)[j] = v[p[j]]``.

    Level 0 is the identity. Level ``i > 0``: within each group of ``block_size · 2^i`` consecutive
    indices, the chunks of ``block_size / 2`` indices are taken evens first, then odds.
    """
    if level == 0:
        return torch.arange(d)
    half = block_size // 2
    group = block_size * 2 ** level
    chunks = group // half
    order = torch.cat([torch.arange(0, chunks, 2), torch.arange(1, chunks, 2)])
    within = (order[:, None] * half + torch.arange(half)).reshape(-1)
    return (torch.arange(0, d, group)[:, None] + within).reshape(-1)


class BOFTLayer(AdapterModule):
    """The butterfly rotation and output scale of one layer: ``boft_R`` ``(m, n, b, b)``, ``boft_s``."""

    transforms_input = True
    adapts_output = True

    def __init__(self, config: BOFT, base: nn.Module) -> None:
        super().__init__(config, base)
        self.kind = layer_kind(base)
        self.factors, self.nblocks, self.block_size = config.layout(base)
        m, n, b = self.factors, self.nblocks, self.block_size
        out = base.weight.shape[0] if self.kind != HF_CONV1D else base.weight.shape[1]
        self.boft_R = nn.Parameter(torch.zeros(m, n, b, b))
        # peft's shapes: (out, 1) for linear layers, (1, out) for Conv2d
        self.boft_s = nn.Parameter(torch.ones(1, out) if self.kind == CONV2D else torch.ones(out, 1))
        d = n * b
        for i in range(m):
            p = butterfly_permutation(d, b, i) if m > 1 else torch.arange(d)
            self.register_buffer(f"perm{i}", p, persistent=False)
            self.register_buffer(f"inv{i}", torch.argsort(p), persistent=False)
        self.dropout = float(config.boft_dropout)
        #: why peft cannot hold this adapter (None: it can)
        self.no_hf_reason = _no_hf_reason(base)
        if self.kind == CONV2D:  # the convolution runs with the rotated and scaled weight
            self.transforms_input, self.adapts_output, self.overrides_params = False, False, True

    def on_attach(self, model: nn.Module, site: Any) -> None:
        self.train(model.training)  # multiplicative dropout follows the model's mode

    # -- M -------------------------------------------------------------------------------
    def blocks(self) -> torch.Tensor:
        """The orthogonal blocks ``(m, n, b, b)``: Cayley transforms of the skew parts of ``boft_R``."""
        a = self.boft_R
        m, n, b, _ = a.shape
        q = 0.5 * (a - a.transpose(-2, -1))
        r = cayley(q.reshape(m * n, b, b), neumann=False, terms=0).reshape(m, n, b, b)
        if self.training and self.dropout > 0:
            r = self._drop_blocks(r)
        return r

    def _drop_blocks(self, r: torch.Tensor) -> torch.Tensor:
        """peft's multiplicative dropout: ``⌊p·n⌋`` random blocks of one random factor become the identity."""
        m, n, b, _ = r.shape
        k = int(self.dropout * n)
        if k == 0:
            return r
        keep = torch.ones(m, n, 1, 1, device=r.device, dtype=r.dtype)
        factor = int(torch.randint(0, m, (1,)))
        keep[factor, torch.randperm(n, device=r.device)[:k]] = 0
        eye = torch.eye(b, device=r.device, dtype=r.dtype)
        return keep * r + (1 - keep) * eye

    def rotate(self, v: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """``v M`` on the last dimension, one butterfly factor at a time (``M = B_{m−1} ⋯ B_0``)."""
        r = self.blocks() if blocks is None else blocks
        n, b = self.nblocks, self.block_size
        shape = v.shape
        for i in reversed(range(self.factors)):
            if self.factors > 1:
                v = v.index_select(-1, getattr(self, f"inv{i}"))  # v P_i
            v = torch.einsum("...nk,nkc->...nc", v.reshape(*shape[:-1], n, b), r[i]).reshape(shape)  # · diag(R_i)
            if self.factors > 1:
                v = v.index_select(-1, getattr(self, f"perm{i}"))  # · P_iᵀ
        return v

    def dense(self, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """The dense ``M`` ``(d, d)`` — for merging, Conv2d and tests; linear forwards never build it."""
        r = self.blocks() if blocks is None else blocks
        d = self.nblocks * self.block_size
        return self.rotate(torch.eye(d, device=r.device, dtype=r.dtype), r)

    def scale(self) -> torch.Tensor:
        """``s`` as a vector of length ``out``."""
        return self.boft_s.reshape(-1)

    # -- forward hooks -------------------------------------------------------------------
    def transform_input(self, x: torch.Tensor, site: Any) -> torch.Tensor:
        r = self.blocks()
        return self.rotate(x.to(r.dtype), r).to(x.dtype)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        s = self.scale().to(y.dtype)
        bias = getattr(site.base, "bias", None)
        if bias is None:
            return y * s
        return (y - bias.to(y.dtype)) * s + bias.to(y.dtype)  # the bias is not scaled (peft)

    def override_params(self, params: dict[str, torch.Tensor], site: Any) -> dict[str, torch.Tensor]:
        w = params.get("weight", site.base.weight)
        return {**params, "weight": self._folded(site.base, w, self.dense(), self.scale()).to(w.dtype)}

    def _folded(self, base: nn.Module, w: torch.Tensor, dense_m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``diag(s) W Mᵀ`` in ``w``'s layout (computed in ``dense_m``'s dtype)."""
        mat = as_matrix(base, w).to(dense_m.dtype)
        return from_matrix(base, (mat @ dense_m.t()) * s.to(dense_m.dtype)[:, None])

    # -- merging -------------------------------------------------------------------------
    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        w = base.weight
        m = self.dense(self.blocks().double())
        w.data.copy_(self._folded(base, w.detach(), m, self.scale().double()).to(w.dtype))

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        w = base.weight
        m_inv = torch.linalg.inv(self.dense(self.blocks().double()))  # diag(1/s) W' M^{-T} undoes diag(s) W Mᵀ
        w.data.copy_(self._folded(base, w.detach(), m_inv, 1.0 / self.scale().double()).to(w.dtype))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``diag(s) W Mᵀ − W`` laid out like ``base.weight``."""
        w = base.weight.detach()
        folded = self._folded(base, w, self.dense(self.blocks().detach().double()), self.scale().detach().double())
        return (folded - w.double()).to(w.dtype)

    def layer_facts(self) -> dict[str, Any]:
        return {"no_hf_reason": self.no_hf_reason} if self.no_hf_reason else {}

    def extra_repr(self) -> str:
        drop = f", dropout={self.dropout}" if self.dropout else ""
        return f"method=boft, factors={self.factors}, blocks={self.nblocks}x{self.block_size}{drop}"


def _no_hf_reason(base: nn.Module) -> str | None:
    kind = layer_kind(base)
    if kind == HF_CONV1D:
        return "peft's BOFT does not support transformers Conv1D layers (GPT-2 style)"
    if kind == CONV2D and (base.dilation != (1, 1) or base.kernel_size[0] != base.kernel_size[1]
                           or len(set(base.stride)) != 1 or not isinstance(base.padding, tuple)
                           or len(set(base.padding)) != 1):
        return ("peft's BOFT computes Conv2d layers with a square kernel, dilation 1 and equal paddings/strides only "
                "(it uses kernel_size[0], padding[0] and stride[0])")
    return None


# -- Hugging Face PEFT format ------------------------------------------------------------------
_UNSUPPORTED_HF = ("layers_to_transform", "layers_pattern")


def boft_from_hf(d: dict[str, Any]) -> BOFT:
    """A peft ``BOFTConfig`` dict as a :class:`BOFT` config."""
    for key in _UNSUPPORTED_HF:
        if d.get(key) not in (None, [], {}):
            raise ConfigError(f"peft option {key}={d[key]!r} is not supported by peftkit's BOFT")
    if d.get("bias", "none") != "none":
        raise ConfigError(f"peft option bias={d['bias']!r} is not supported by peftkit's BOFT; use 'none'")
    if d.get("fan_in_fan_out"):
        raise ConfigError("peft option fan_in_fan_out=True (BOFT on transformers Conv1D) has no peft implementation; "
                          "refusing to load it")
    return BOFT(
        boft_block_size=d.get("boft_block_size") or None,
        boft_block_num=d.get("boft_block_num") or None,
        boft_n_butterfly_factor=d.get("boft_n_butterfly_factor", 1),
        boft_dropout=d.get("boft_dropout", 0.0),
        target_modules=d.get("target_modules"),
    )


def boft_to_hf(config: BOFT) -> dict[str, Any]:
    by_num = _given(config.boft_block_num)
    return {
        "boft_block_size": 0 if by_num else int(config.boft_block_size or DEFAULT_BLOCK_SIZE),
        "boft_block_num": int(config.boft_block_num) if by_num else 0,
        "boft_n_butterfly_factor": config.boft_n_butterfly_factor,
        "boft_dropout": config.boft_dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
    }


def _boft_export(state: dict[str, torch.Tensor], layer: dict[str, Any]) -> dict[str, torch.Tensor]:
    if layer.get("no_hf_reason"):
        raise ConfigError(f"{layer['no_hf_reason']}, so this BOFT adapter has no Hugging Face PEFT form; "
                          "save it with format='peftkit'")
    return {"boft_R": state["boft_R"], "boft_s": state["boft_s"]}


BOFT.hf_codec = HFCodec(
    peft_type="BOFT",
    config_to_hf=lambda c, targets: boft_to_hf(c),
    config_from_hf=boft_from_hf,
    read_names={"boft_R": "boft_R", "boft_s": "boft_s"},
    options=frozenset({"boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout", "bias",
                       "fan_in_fan_out", "init_weights", "layers_to_transform", "layers_pattern", "modules_to_save"}),
    export=_boft_export,
)
