"""OFT: orthogonal fine-tuning (Qiu et al., 2023, arXiv:2306.07280), with peft's OFT v2 conventions.

For a frozen layer ``y = W x + b`` (``W ∈ R^{out×d}``; convolutions through their ``(out, in·kh·kw)``
matrix view, see :mod:`peftkit.core.layers`) OFT learns a block-diagonal orthogonal matrix

    R = diag(R_1, …, R_n),   R_i ∈ R^{b×b},   n · b = d,

and computes ``y = W Rᵀ x + b``, i.e. every block of the input row vector is rotated as
``x_i ← x_i R_i`` before the base layer runs. Merging folds it into the weight: ``W ← W Rᵀ``.
Embeddings (``d`` = embedding dimension) rotate their output the same way: ``e ← e R``.

Each block is the Cayley transform of a skew-symmetric ``Q_i = U_i − U_iᵀ``, where only the
strictly upper triangle ``U_i`` (``b(b−1)/2`` numbers) is trained; ``W``, ``b`` are frozen. Like
peft 0.21.2 (whose files peftkit reads and writes):

* exact Cayley (``use_cayley_neumann=False``): ``R_i = (I − Q_i)(I + Q_i)⁻¹`` (one batched solve);
* Cayley–Neumann (default): ``R_i ≈ I + 2Q + 2Q² + … + 2Q^{k−2} + Q^{k−1}`` with
  ``k = num_cayley_neumann_terms`` (peft's truncation; for k = 3 it equals k = 4) — the series of
  ``(I + Q)(I − Q)⁻¹``, only approximately orthogonal. (peft's two forms use opposite signs of
  ``Q``; both are reproduced as peft computes them so that peft files give the same outputs.)

Options: give exactly one of ``r`` (blocks per layer) or ``oft_block_size`` (``b``); the other
follows from ``d``. Neither given means ``oft_block_size=32`` (peft 0.21.2's default).
``block_share`` trains one block used ``n`` times. ``coft`` (constrained OFT)
projects, before each use, every ``Q_i`` onto the Frobenius ball of radius ``eps / √n_stored``
(in place, as peft does), which keeps ``R`` close to ``I``. The trainable parameter ``oft_R`` has
peft's shape ``(n or 1, b(b−1)/2)`` (the row-major upper triangle of each block); ``Q = 0`` at
init, so ``R = I`` and the model starts unchanged.

Layer support: ``nn.Linear``, transformers ``Conv1D`` (peft has no OFT for it, so such adapters
have no Hugging Face form), ``nn.Conv2d`` (groups = 1) and ``nn.Embedding``. For convolutions the
rotation acts on the flattened filter space (``in·kh·kw``), which is not a per-pixel transform of
the input, so peftkit runs the convolution with the rotated weight ``W Rᵀ`` — exactly what peft's
merge computes. (peft 0.21.2's *unmerged* Conv2d forward unfolds and folds the input with
overlapping patches and is not the identity even at ``R = I``; peftkit matches peft's merged
weights for convolutions.) peft's ``module_dropout`` builds a layer that its forward never
applies, so peftkit accepts only ``module_dropout=0``; peft files with another value load
unchanged (the value has no effect there either).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, positive_int
from ..core.errors import ConfigError
from ..core.layers import CONV2D, EMBEDDING, HF_CONV1D, LINEAR, as_matrix, from_matrix, layer_info, layer_kind
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from ..formats.codec import HFCodec


def _given(v: Any) -> bool:
    return v is not None and v != 0


DEFAULT_BLOCK_SIZE = 32  # peft 0.21.2: OFTConfig(r=0, oft_block_size=32)


@register
@dataclass
class OFT(AdapterConfig):
    """Orthogonal fine-tuning: the input of each targeted layer is rotated by a block-diagonal ``R``.

    Exactly one of ``r`` (number of blocks) and ``oft_block_size`` (block size) is given (0 or None
    means "not given", as in peft). ``adjust_to_layer=True`` moves a value that does not divide a
    layer's input size to the nearest divisor with a warning (peft's behaviour; used for peft
    files); by default such a layer is an error that lists the valid values.
    """

    method = "oft"
    family = "orthogonal"
    paper = "Qiu et al. 2023 (arXiv:2306.07280); peft's OFT v2 conventions"
    formula = "W Rᵀ x, R block-diagonal orthogonal (Cayley transform of skew-symmetric Q); Q"
    supported_layers = (LINEAR, HF_CONV1D, CONV2D, EMBEDDING)
    default_targets = ATTENTION_QV  # peft copies LoRA's mapping for OFT

    r: int | None = None
    oft_block_size: int | None = None
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    block_share: bool = False
    coft: bool = False
    eps: float = 6e-5
    module_dropout: float = 0.0
    adjust_to_layer: bool = False

    def __post_init__(self) -> None:
        if not _given(self.r) and not _given(self.oft_block_size):  # peft's default: blocks of 32
            self.oft_block_size = DEFAULT_BLOCK_SIZE

    def validate(self) -> None:
        owner = type(self).__name__
        has_r, has_b = _given(self.r), _given(self.oft_block_size)
        if has_r == has_b:
            got = "neither" if not has_r else f"both (r={self.r!r}, oft_block_size={self.oft_block_size!r})"
            raise ConfigError(f"{owner}: give exactly one of r (number of blocks) or oft_block_size (block size), got {got}; "
                              "r x oft_block_size = the layer's input size, so the other one is derived per layer")
        if has_r:
            positive_int(owner, "r", self.r)
        else:
            positive_int(owner, "oft_block_size", self.oft_block_size)
        positive_int(owner, "num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        for name in ("use_cayley_neumann", "block_share", "coft", "adjust_to_layer"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{owner}: {name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps > 0:
            raise ConfigError(f"{owner}: eps must be a positive number, got {self.eps!r}")
        if self.module_dropout != 0:
            raise ConfigError(f"{owner}: module_dropout={self.module_dropout!r} is not supported; peft 0.21.2 creates its "
                              "multiplicative dropout layer but never applies it, so only module_dropout=0 is accepted")

    # -- per-layer layout ----------------------------------------------------------------
    def layout(self, base: nn.Module) -> tuple[int, int]:
        """``(number of blocks, block size)`` for ``base``; raises ConfigError when they do not fit."""
        d = rotated_dim(base)
        given_r = _given(self.r)
        value = int(self.r if given_r else self.oft_block_size)  # type: ignore[arg-type]
        name = "r" if given_r else "oft_block_size"
        if d % value != 0 or value > d:
            if not self.adjust_to_layer:
                valid = [k for k in range(1, d + 1) if d % k == 0 and (d // k if given_r else k) >= 2]
                shown = ", ".join(map(str, valid[:12])) + (" ..." if len(valid) > 12 else "")
                raise ConfigError(f"{name}={value} does not divide the rotated size {d} ({_dim_words(base)}); "
                                  f"valid values: {shown} (or set adjust_to_layer=True to take the nearest, as peft does)")
            new = adjust_to_divisor(d, value)
            warnings.warn(f"OFT: {name}={value} does not divide {d}; adjusted to {new} (adjust_to_layer=True)", stacklevel=3)
            value = new
        nblocks, size = (value, d // value) if given_r else (d // value, value)
        if size < 2:
            raise ConfigError(f"block size {size} (r={nblocks} blocks of a size-{d} input) leaves no rotation to train; "
                              f"use a smaller r or oft_block_size >= 2")
        return nblocks, size

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        return super().check_layer(base, module_name) or rotation_problem(self, base)

    def build(self, base: nn.Module, module_name: str) -> OFTLayer:
        return OFTLayer(self, base)


def rotated_dim(base: nn.Module) -> int:
    """The size ``d`` that ``R`` acts on: input features, ``in·kh·kw`` for Conv2d, the embedding dimension."""
    kind = layer_kind(base)
    if kind == CONV2D:
        return base.weight[0].numel()
    if kind == EMBEDDING:
        return base.embedding_dim
    return layer_info(base).in_features


def _dim_words(base: nn.Module) -> str:
    kind = layer_kind(base)
    if kind == CONV2D:
        return f"in_channels x kernel = {base.in_channels} x {'x'.join(map(str, base.kernel_size))} of this Conv2d"
    if kind == EMBEDDING:
        return "embedding_dim of this Embedding"
    return f"in_features of this {type(base).__name__}"


def adjust_to_divisor(d: int, value: int) -> int:
    """The divisor of ``d`` nearest to ``value`` (ties to the lower one), ``d`` if ``value >= d`` — peft's rule."""
    if value >= d:
        return d
    higher = value
    while higher <= d and d % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and d % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


# -- the rotation ------------------------------------------------------------------------------
def skew(vec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int) -> torch.Tensor:
    """``Q = U − Uᵀ`` for each row of ``vec`` (the strict upper triangle of ``U``, row-major)."""
    q = vec.new_zeros(vec.shape[0], b, b)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """Batched orthogonal blocks from skew-symmetric ``q`` ``(n, b, b)``, computed as peft does."""
    n, b, _ = q.shape
    eye = torch.eye(b, device=q.device, dtype=q.dtype).expand(n, b, b)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)  # (I − Q)(I + Q)⁻¹
    r = eye.clone()
    if terms > 1:
        r = r + 2.0 * q
    if terms > 2:
        power = torch.bmm(q, q)
        r = r + 2.0 * power
        for _ in range(3, terms - 1):
            power = torch.bmm(power, q)
            r = r + 2.0 * power
        r = r + torch.bmm(power, q)
    return r


class OFTLayer(AdapterModule):
    """The rotation of one layer. Parameter ``oft_R`` ``(n or 1, b(b−1)/2)``; see the module docstring."""

    transforms_input = True
    adapts_output = False

    def __init__(self, config: OFT, base: nn.Module) -> None:
        super().__init__(config, base)
        self.kind = layer_kind(base)
        self.nblocks, self.block_size = config.layout(base)
        b = self.block_size
        self.oft_R = nn.Parameter(torch.zeros(1 if config.block_share else self.nblocks, b * (b - 1) // 2))
        rows, cols = torch.triu_indices(b, b, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        #: why peft cannot hold this adapter (None: it can)
        self.no_hf_reason = _no_hf_reason(base)
        if self.kind == EMBEDDING:  # the embedding's output is rotated
            self.transforms_input, self.adapts_output = False, True
        elif self.kind == CONV2D:  # the convolution runs with the rotated weight
            self.transforms_input, self.overrides_params = False, True

    # -- R -----------------------------------------------------------------------------
    @torch.no_grad()
    def project(self) -> None:
        """COFT: rescale each ``Q_i`` with ``‖Q_i‖_F > eps/√n_stored`` onto that radius (in place, as peft)."""
        q = skew(self.oft_R, self.rows, self.cols, self.block_size)
        radius = self.config.eps / (q.shape[0] ** 0.5)
        norm = torch.linalg.matrix_norm(q, keepdim=True)
        q = torch.where(norm <= radius, q, q * (radius / norm.clamp_min(1e-30)))
        self.oft_R.copy_(q[:, self.rows, self.cols])

    def blocks(self) -> torch.Tensor:
        """The orthogonal blocks ``(n, b, b)`` (one block expanded ``n`` times with ``block_share``)."""
        if self.config.coft:
            self.project()
        q = skew(self.oft_R, self.rows, self.cols, self.block_size)
        r = cayley(q, self.config.use_cayley_neumann, self.config.num_cayley_neumann_terms)
        return r.expand(self.nblocks, -1, -1) if r.shape[0] != self.nblocks else r

    def rotation(self) -> torch.Tensor:
        """The dense block-diagonal ``R`` ``(d, d)`` — for inspection and tests, never used in forward."""
        return torch.block_diag(*self.blocks().unbind(0))

    def rotate(self, v: torch.Tensor) -> torch.Tensor:
        """``v R`` on the last dimension: each block of ``b`` entries times its ``R_i``."""
        r = self.blocks()
        out_dtype = v.dtype
        v = v.to(r.dtype)
        shape = v.shape
        v = v.reshape(*shape[:-1], self.nblocks, self.block_size)
        return torch.einsum("...nk,nkc->...nc", v, r).reshape(shape).to(out_dtype)

    # -- forward hooks -------------------------------------------------------------------
    def transform_input(self, x: torch.Tensor, site: Any) -> torch.Tensor:
        return self.rotate(x)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        return self.rotate(y)

    def override_params(self, params: dict[str, torch.Tensor], site: Any) -> dict[str, torch.Tensor]:
        w = params.get("weight", site.base.weight)
        return {**params, "weight": self._rotate_weight(w, self.blocks())}

    def _rotate_weight(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``W Rᵀ`` per block of the ``(out, d)`` matrix view of a Conv2d weight."""
        m = w.reshape(w.shape[0], self.nblocks, self.block_size).to(r.dtype)
        return torch.einsum("onk,nck->onc", m, r).reshape(w.shape).to(w.dtype)

    # -- merging -------------------------------------------------------------------------
    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        w = base.weight
        w.data.copy_(self._merged(base, self.blocks().double()).to(w.dtype))

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        # the exact inverse (Cayley–Neumann blocks are only approximately orthogonal)
        w = base.weight
        w.data.copy_(self._merged(base, torch.linalg.inv(self.blocks().double())).to(w.dtype))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``W Rᵀ − W`` (``table R − table`` for embeddings), laid out like ``base.weight``."""
        w = base.weight.detach()
        return (self._merged(base, self.blocks().detach().double()) - w.double()).to(w.dtype)

    def _merged(self, base: nn.Module, r: torch.Tensor) -> torch.Tensor:
        """The base weight (float64, its own layout) with blocks ``r`` folded in: ``W rᵀ``, or ``table r``."""
        w = base.weight.detach()
        if self.kind == EMBEDDING:
            t = w.double().reshape(w.shape[0], self.nblocks, self.block_size)
            return torch.einsum("vnk,nkc->vnc", t, r).reshape(w.shape)
        m = as_matrix(base, w).double()
        m3 = m.reshape(m.shape[0], self.nblocks, self.block_size)
        return from_matrix(base, torch.einsum("onk,nck->onc", m3, r).reshape(m.shape))

    def layer_facts(self) -> dict[str, Any]:
        return {"no_hf_reason": self.no_hf_reason} if self.no_hf_reason else {}

    def extra_repr(self) -> str:
        c = self.config
        form = f"cayley_neumann({c.num_cayley_neumann_terms})" if c.use_cayley_neumann else "cayley"
        return (f"method=oft, blocks={self.nblocks}x{self.block_size}, {form}"
                f"{', block_share' if c.block_share else ''}{f', coft(eps={c.eps})' if c.coft else ''}")


# -- Hugging Face PEFT format ------------------------------------------------------------------
def _hf_write_names(layer: dict[str, Any]) -> dict[str, str]:
    if layer.get("kind") == EMBEDDING:
        return {"oft_R": "oft_embedding_R.weight"}
    return {"oft_R": "oft_R.weight"}


_UNSUPPORTED_HF = {"layers_to_transform": None, "layers_pattern": None}


def oft_from_hf(d: dict[str, Any]) -> OFT:
    """A peft ``OFTConfig`` dict as an :class:`OFT` config (peft's adjust-to-divisor rule kept)."""
    if "oft_block_size" not in d:
        raise ConfigError("the file is an OFT adapter from peft < 0.14 (no oft_block_size), whose parametrisation "
                          "peft no longer reads either; retrain it with a newer peft")
    for key in _UNSUPPORTED_HF:
        if d.get(key) not in (None, [], {}):
            raise ConfigError(f"peft option {key}={d[key]!r} is not supported by peftkit's OFT")
    if d.get("bias", "none") != "none":
        raise ConfigError(f"peft option bias={d['bias']!r} is not supported by peftkit's OFT; use 'none'")
    if d.get("module_dropout", 0.0):
        warnings.warn(f"OFT: module_dropout={d['module_dropout']} is ignored (peft 0.21.2 never applies it either)",
                      stacklevel=2)
    return OFT(
        r=d.get("r") or None,
        oft_block_size=d.get("oft_block_size") or None,
        use_cayley_neumann=d.get("use_cayley_neumann", True),
        num_cayley_neumann_terms=d.get("num_cayley_neumann_terms", 5),
        block_share=d.get("block_share", False),
        coft=d.get("coft", False),
        eps=d.get("eps", 6e-5),
        adjust_to_layer=True,
        target_modules=d.get("target_modules"),
    )


def oft_to_hf(config: OFT) -> dict[str, Any]:
    return {
        "r": int(config.r or 0),
        "oft_block_size": int(config.oft_block_size or 0),
        "use_cayley_neumann": config.use_cayley_neumann,
        "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
        "block_share": config.block_share,
        "coft": config.coft,
        "eps": config.eps,
        "module_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
    }


def rotation_problem(config: Any, base: nn.Module) -> str | None:
    """Why ``base`` cannot be rotated by ``config`` (OFT, BOFT): grouped convolutions, or a block layout
    (``config.layout(base)``) that does not fit the layer; None when it can."""
    if layer_kind(base) == CONV2D and base.groups != 1:
        return f"grouped convolutions (groups={base.groups}) are not supported by {config.method}"
    try:
        config.layout(base)
    except ConfigError as e:
        return str(e)
    return None


def _no_hf_reason(base: nn.Module) -> str | None:
    kind = layer_kind(base)
    if kind == HF_CONV1D:
        return "peft's OFT does not support transformers Conv1D layers (GPT-2 style)"
    if kind == CONV2D and (base.dilation != (1, 1) or base.kernel_size[0] != base.kernel_size[1]):
        return "peft's OFT supports only Conv2d layers with square kernels and dilation 1"
    return None


def _oft_export(state: dict[str, torch.Tensor], layer: dict[str, Any]) -> dict[str, torch.Tensor]:
    if layer.get("no_hf_reason"):
        raise ConfigError(f"{layer['no_hf_reason']}, so this OFT adapter has no Hugging Face PEFT form; "
                          "save it with format='peftkit'")
    return {"oft_R": state["oft_R"]}


OFT.hf_codec = HFCodec(
    peft_type="OFT",
    config_to_hf=lambda c, targets: oft_to_hf(c),
    config_from_hf=oft_from_hf,
    read_names={"oft_R.weight": "oft_R", "oft_embedding_R.weight": "oft_R"},
    write_names=_hf_write_names,
    options=frozenset({"r", "oft_block_size", "module_dropout", "fan_in_fan_out", "bias", "init_weights",
                       "layers_to_transform", "layers_pattern", "modules_to_save", "coft", "eps", "block_share",
                       "use_cayley_neumann", "num_cayley_neumann_terms"}),
    export=_oft_export,
)
