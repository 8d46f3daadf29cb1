"""What a method needs to know about the layer it adapts, independent of the layer's class.

Every weight-bearing layer is seen through one view: a dense matrix ``W`` of shape
``(out_features, in_features)`` such that the layer computes ``y = W x + b`` on a
(flattened) input. ``nn.Linear`` stores ``W`` directly, the transformers ``Conv1D`` stores
``W^T``, a convolution stores ``W`` reshaped to ``(out, in/groups, *kernel)``, and an
embedding stores ``W^T`` (the table is ``(num_embeddings, dim)``; a one-hot input selects a
column of ``W = table^T``). Methods write their math against this view and use
:func:`as_matrix` / :func:`from_matrix` to move between the two layouts, so no method
has one class per layer type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

try:  # transformers is optional; its GPT-2 style Conv1D is supported when present
    from transformers.pytorch_utils import Conv1D as HFConv1D
except Exception:  # pragma: no cover - exercised only without transformers
    HFConv1D = None  # type: ignore[assignment,misc]

LINEAR = "linear"
HF_CONV1D = "hf_conv1d"
CONV1D = "conv1d"
CONV2D = "conv2d"
EMBEDDING = "embedding"
OTHER = "other"


@dataclass(frozen=True)
class LayerInfo:
    """The shape facts of one adaptable layer."""

    kind: str
    in_features: int
    out_features: int

    @property
    def is_conv(self) -> bool:
        return self.kind in (CONV1D, CONV2D)


def layer_kind(module: nn.Module) -> str:
    if HFConv1D is not None and isinstance(module, HFConv1D):
        return HF_CONV1D
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Conv2d):
        return CONV2D
    if isinstance(module, nn.Conv1d):
        return CONV1D
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    return OTHER


def layer_info(module: nn.Module) -> LayerInfo:
    kind = layer_kind(module)
    if kind == LINEAR:
        return LayerInfo(kind, module.in_features, module.out_features)
    if kind == HF_CONV1D:
        w = module.weight
        return LayerInfo(kind, w.shape[0], w.shape[1])
    if kind in (CONV1D, CONV2D):
        return LayerInfo(kind, module.in_channels, module.out_channels)
    if kind == EMBEDDING:
        return LayerInfo(kind, module.num_embeddings, module.embedding_dim)
    return LayerInfo(kind, 0, 0)


def is_linear_like(module: nn.Module) -> bool:
    """True for the layers that ``"all-linear"`` selects: ``nn.Linear`` and transformers' ``Conv1D``."""
    return layer_kind(module) in (LINEAR, HF_CONV1D)


def as_matrix(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as the ``(out, in_flat)`` matrix of ``y = W x``; a view where the layout allows."""
    w = dense_weight(module) if weight is None else weight
    kind = layer_kind(module)
    if kind == LINEAR:
        return w
    if kind in (HF_CONV1D, EMBEDDING):
        return w.t()
    if kind in (CONV1D, CONV2D):
        return w.reshape(w.shape[0], -1)
    raise TypeError(f"{type(module).__name__} has no matrix view")


def from_matrix(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`as_matrix`: a tensor laid out like ``module.weight``."""
    kind = layer_kind(module)
    if kind == LINEAR:
        return matrix
    if kind in (HF_CONV1D, EMBEDDING):
        return matrix.t()
    if kind in (CONV1D, CONV2D):
        return matrix.reshape(module.weight.shape)
    raise TypeError(f"{type(module).__name__} has no matrix view")


def call_with_weight(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     use_bias: bool = True) -> torch.Tensor:
    """Run ``module``'s own operation on ``x`` with ``weight`` (module layout) in place of its weight."""
    kind = layer_kind(module)
    b = (module.bias if bias is None else bias) if use_bias else None
    if kind == LINEAR:
        return nn.functional.linear(x, weight, b)
    if kind == HF_CONV1D:
        out = x.reshape(-1, x.shape[-1]) @ weight
        if b is not None:
            out = out + b
        return out.reshape(*x.shape[:-1], weight.shape[-1])
    if kind == CONV2D:
        return module._conv_forward(x, weight, b)
    if kind == CONV1D:
        return module._conv_forward(x, weight, b)
    if kind == EMBEDDING:
        return nn.functional.embedding(x, weight, module.padding_idx, module.max_norm, module.norm_type,
                                       module.scale_grad_by_freq, module.sparse)
    raise TypeError(f"{type(module).__name__} cannot be called with a replacement weight")


def float_dtype_for_adapter(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters of a half-precision base are kept in float32 (stable training); otherwise the base dtype."""
    if base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if not base_dtype.is_floating_point:
        return torch.float32
    return base_dtype


def base_weight(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


# -- quantized base weights ------------------------------------------------------------------
# A quantized base (``peftkit.quant``) keeps its layer class and stores a quantized tensor
# subclass as ``weight``. Core code never imports the quantization library: the quant package
# registers each tensor type with its dequantize and re-quantize functions here.
_QUANTIZED: dict[type, tuple[Callable[[torch.Tensor], torch.Tensor],
                             Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {}


def register_quantized_type(cls: type, dequantize: Callable[[torch.Tensor], torch.Tensor],
                            requantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Declare a quantized weight type: ``dequantize(q) -> dense`` and ``requantize(q, dense) -> q'``
    (``dense`` quantized with ``q``'s scheme and block sizes)."""
    _QUANTIZED[cls] = (dequantize, requantize)


def is_quantized(weight: object) -> bool:
    """True if ``weight`` is a registered quantized tensor type (NF4, int8, ...)."""
    return isinstance(weight, torch.Tensor) and type(weight) in _QUANTIZED


def dense_tensor(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` dequantized if it is a registered quantized type, else ``weight`` itself."""
    if type(weight) in _QUANTIZED:
        return _QUANTIZED[type(weight)][0](weight)
    return weight


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense tensor (module layout): dequantized if it is quantized, else itself."""
    return dense_tensor(base_weight(module))


def requantize_weight(module: nn.Module, dense: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Quantize ``dense`` (module layout) like the module's quantized weight; returns the new quantized
    tensor and the relative re-quantization error ``‖deq(Q(W')) − W'‖_F / ‖W'‖_F``."""
    w = base_weight(module)
    dequantize, requantize = _QUANTIZED[type(w)]
    q = requantize(w, dense)
    err = torch.linalg.vector_norm((dequantize(q).float() - dense.float()).flatten())
    ref = torch.linalg.vector_norm(dense.float().flatten()).clamp_min(1e-30)
    return q, float(err / ref)
