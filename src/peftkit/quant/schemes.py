"""Weight quantization schemes for a frozen base, through torchao (no hand-written kernels).

``nf4`` — 4-bit NormalFloat (Dettmers et al. 2023, QLoRA, arXiv:2305.14314): the weight is cut
into blocks of ``block_size`` (64) consecutive values; each block stores its absolute maximum
``c_b`` and every value ``w`` as the index of the closest of the 16 NF4 levels ``q_k`` (quantiles of
N(0, 1) scaled to [−1, 1]) to ``w / c_b``. The block maxima are themselves quantized to int8 in
groups of ``scaler_block_size`` ("double quantization"). Dequantized: ``ŵ = q_{k(w)} · ĉ_b``.
Storage ≈ 4 + 8/64 + 32/(64·256) bits per weight. torchao's ``NF4Tensor`` (CPU and CUDA).

``int8`` — symmetric per-output-channel int8 (weight-only): ``s_i = max_j |W_ij| / 127``,
``Q_ij = round(W_ij / s_i)``, ``Ŵ_ij = s_i Q_ij``. torchao's ``Int8Tensor`` (``PerRow``
granularity), which runs on CPU (an ``int8 → float`` cast then a float matmul) and CUDA.

Each scheme registers its tensor type with :func:`peftkit.core.layers.register_quantized_type`,
so the engine can dequantize a base weight (DoRA's norm, merging) without importing torchao.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError, did_you_mean
from ..core.layers import register_quantized_type

NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256


def _torchao():
    try:
        import torchao.quantization as tq
    except ImportError as e:  # pragma: no cover - exercised only without torchao
        raise ConfigError("quantized bases need torchao: pip install --no-deps 'torchao>=0.18,<0.19' "
                          "(with torch 2.13)") from e
    return tq


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: float
    check: Callable[[torch.Tensor], str | None]
    quantize: Callable[[torch.Tensor], torch.Tensor]


# -- nf4 ---------------------------------------------------------------------------------------
def _scaler_block(n_blocks: int) -> int:
    """The largest divisor of the number of blocks that is ≤ 256 (torchao needs an exact division)."""
    for d in range(min(NF4_SCALER_BLOCK, n_blocks), 0, -1):
        if n_blocks % d == 0:
            return d
    return 1


def _nf4_check(w: torch.Tensor) -> str | None:
    if w.numel() % NF4_BLOCK:
        return f"nf4 needs a weight whose size is a multiple of {NF4_BLOCK}, got {tuple(w.shape)}"
    return None


def _nf4_quantize(w: torch.Tensor) -> torch.Tensor:
    tq = _torchao()
    return tq.to_nf4(w.contiguous(), NF4_BLOCK, _scaler_block(w.numel() // NF4_BLOCK))


def _nf4_requantize(q: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    tq = _torchao()
    return tq.to_nf4(dense.to(q.dtype).contiguous(), q.block_size, q.scaler_block_size)


# -- int8 --------------------------------------------------------------------------------------
def _int8_check(w: torch.Tensor) -> str | None:
    if w.dim() != 2:
        return f"int8 quantizes 2-D weights, got {tuple(w.shape)}"
    return None


def _int8_quantize(w: torch.Tensor) -> torch.Tensor:
    tq = _torchao()
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    return Int8Tensor.from_hp(w.contiguous(), granularity=tq.PerRow())


def _int8_requantize(q: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return _int8_quantize(dense.to(q.dtype))


SCHEMES: dict[str, Scheme] = {
    "nf4": Scheme("nf4", 4 + 8 / NF4_BLOCK, _nf4_check, _nf4_quantize),
    "int8": Scheme("int8", 8, _int8_check, _int8_quantize),
}

_registered = False


def ensure_registered() -> None:
    """Register torchao's quantized tensor types with the engine (once)."""
    global _registered
    if _registered:
        return
    _torchao()
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    register_quantized_type(NF4Tensor, lambda q: q.get_original_weight(), _nf4_requantize)
    register_quantized_type(Int8Tensor, lambda q: q.dequantize(), _int8_requantize)
    _registered = True


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ConfigError(f"quantization scheme {name!r} is not one of {', '.join(SCHEMES)}{did_you_mean(str(name), SCHEMES)}")
    ensure_registered()
    return SCHEMES[name]


def scheme_of(weight: torch.Tensor) -> str | None:
    """``"nf4"``, ``"int8"`` or None for a dense tensor."""
    name = type(weight).__name__
    return {"NF4Tensor": "nf4", "Int8Tensor": "int8"}.get(name)


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: the inner tensors of a quantized subclass, else numel × element size."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = flatten()
    return sum(storage_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n, None), torch.Tensor))
