"""Export a quantization-aware adapter (L4Q, LR-QAT) to an integer layer with no adapter branch.

:func:`export_quantized` replaces every layer carrying the adapter by a :class:`QuantizedLinear`
holding the grid integers ``q`` (int8, ``(out, in)``), the trained step sizes ``s``
(float32, ``(out, in/group)``) and the layer's bias. Its forward is

    y = x · (s ⊙ q)ᵀ + b          (s broadcast over each group of ``group`` inputs)

which is exactly the training forward of the adapter in eval mode (``Ŵ = s · clamp(round(u))``
computed from the same integers and step sizes, cast to the same dtype). The layer has no
submodule, no adapter and no trainable parameter: nothing runs at inference beyond the
dequantized product. Integers are stored one per int8 byte (2-, 3- and 4-bit grids are not
packed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import AdapterNotFoundError, ConfigError, did_you_mean
from ..core.model import adapter_names, iter_sites, replace_module
from ..core.targeting import display_name


class QuantizedLinear(nn.Module):
    """``y = x (s ⊙ q)ᵀ + b`` with int8 ``qweight`` ``(out, in)`` and float32 ``scale`` ``(out, in/group)``."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scale.dim() != 2:
            raise ValueError("QuantizedLinear needs int8 qweight (out, in) and scale (out, groups)")
        out, inp = qweight.shape
        if scale.shape[0] != out or inp % scale.shape[1]:
            raise ValueError(f"scale {tuple(scale.shape)} does not fit qweight {tuple(qweight.shape)}")
        self.in_features, self.out_features, self.bits = inp, out, bits
        self.group_size = inp // scale.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s ⊙ q`` as an ``(out, in)`` matrix (float32 unless ``dtype``)."""
        q = self.qweight.reshape(self.out_features, -1, self.group_size).to(self.scale.dtype)
        w = (self.scale.unsqueeze(-1) * q).reshape(self.out_features, self.in_features)
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized(x.dtype), b)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


@torch.no_grad()
def export_quantized(model: nn.Module, name: str | None = None) -> nn.Module:
    """Replace every layer holding QAT adapter ``name`` by a :class:`QuantizedLinear`; returns ``model``.

    ``name`` defaults to the only L4Q/LR-QAT adapter of the model. Every layer is checked before any
    is changed: the adapter must be an L4Q or LR-QAT adapter and the only adapter on each of its
    layers (delete the others first). A merged adapter is exported from its integers as well.
    """
    from ..methods.qat_lora import QATLayer

    sites = list(iter_sites(model))
    qat = sorted({n for _, s in sites for n, m in s.adapters.items() if isinstance(m, QATLayer)})
    if name is None:
        if len(qat) != 1:
            found = ", ".join(map(repr, qat)) or "none"
            raise ConfigError(f"export_quantized: pass name=, the model has {len(qat)} L4Q/LR-QAT adapters ({found})")
        name = qat[0]
    known = adapter_names(model)
    if name not in known:
        raise AdapterNotFoundError(f"no adapter named {name!r}{did_you_mean(name, known)}; attached: {', '.join(known)}")
    problems, chosen = [], []
    for path, site in sites:
        if name not in site.adapters:
            continue
        mod = site.adapters[name]
        if not isinstance(mod, QATLayer):
            problems.append(f"{display_name(path)}: adapter {name!r} is {mod.config.method}, not l4q or lrqat")
        elif len(site.adapters) > 1:
            others = [n for n in site.adapters if n != name]
            problems.append(f"{display_name(path)} also holds {', '.join(map(repr, others))} (peftkit.delete them first)")
        else:
            chosen.append((path, site, mod))
    if problems:
        raise ConfigError("cannot export to integers: " + "; ".join(problems))
    for path, site, mod in chosen:
        site.unmerge_all()
        base = site.base
        bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
        layer = QuantizedLinear(mod.integers(base), mod.scale.detach().float().clone(), bias, mod.bits)
        layer.to(base.weight.device)
        mod.on_detach()
        replace_module(model, path, layer)
    return model
