"""Export a quantization-aware adapter (L4Q, LR-QAT) to an integer layer with no adapter branch.

:func:`export_quantized` replaces every layer carrying the adapter by a :class:`QuantizedLinear`
holding the grid integers ``q`` (int8, ``(out, in)``), the trained step sizes ``s``
(float32, ``(out, in/group)``) and the layer's bias. Its forward is

    y = x · (s ⊙ q)ᵀ + b          (s broadcast over each group of ``group`` inputs)

which is exactly the training forward of the adapter in eval mode (``Ŵ = s · clamp(round(u))``
computed from the same integers and step sizes, cast to the same dtype). The layer has no
submodule, no adapter and no trainable parameter: nothing runs at inference beyond the
dequantized product. Integers are stored one per int8 byte (2-, 3- and 4-bit grids are not
packed). :func:`save_quantized` / :func:`load_quantized` write the integer layers to a folder and
put them back into a fresh base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import AdapterNotFoundError, ConfigError, did_you_mean
from ..core.files import json_to_bytes, read_json, read_safetensors, tensors_to_bytes, write_folder
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


# -- files ---------------------------------------------------------------------------------------
QUANT_CONFIG = "quantized_layers.json"
QUANT_WEIGHTS = "quantized_layers.safetensors"
QUANT_FORMAT = "peftkit-quantized-layers"


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write every :class:`QuantizedLinear` of ``model`` to folder ``path`` (atomically, as a whole).

    ``quantized_layers.safetensors`` holds ``<layer>.qweight`` (int8), ``<layer>.scale`` (float32) and
    ``<layer>.bias``; ``quantized_layers.json`` the format, bits and shapes per layer. The rest of the
    model is not written: :func:`load_quantized` puts the layers into a fresh copy of the base model.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no QuantizedLinear layer: call "
                          "peftkit.quant.export_quantized(model) after training an l4q or lrqat adapter")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, m in layers.items():
        tensors[f"{name}.qweight"] = m.qweight
        tensors[f"{name}.scale"] = m.scale
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias
        meta[name] = {"bits": m.bits, "group_size": m.group_size, "in_features": m.in_features,
                      "out_features": m.out_features, "bias": m.bias is not None}
    root = Path(path)
    write_folder(root, {QUANT_CONFIG: json_to_bytes({"format": QUANT_FORMAT, "version": 1, "layers": meta}),
                        QUANT_WEIGHTS: tensors_to_bytes(tensors)})
    return root


def load_quantized(model: nn.Module, path: str | Path) -> nn.Module:
    """Replace the layers saved by :func:`save_quantized` in ``model`` (the base model) by their
    :class:`QuantizedLinear` form; returns ``model``.

    Every layer is checked before any is replaced: it must exist in ``model`` (the closest names are
    suggested), be a linear layer (``nn.Linear`` or transformers ``Conv1D``) of the recorded shape,
    and its tensors must be in the file with the recorded shapes and dtypes.
    """
    from ..core.errors import AdapterLoadError, closest
    from ..core.layers import HF_CONV1D, LINEAR, layer_info, layer_kind

    root = Path(path)
    config = read_json(root / QUANT_CONFIG)
    if config.get("format") != QUANT_FORMAT or not isinstance(config.get("layers"), dict):
        raise AdapterLoadError(f"{root / QUANT_CONFIG}: not a {QUANT_FORMAT} file")
    tensors = read_safetensors(root / QUANT_WEIGHTS)
    modules = dict(model.named_modules())
    problems, built = [], []
    for name, info in config["layers"].items():
        module = modules.get(name)
        if module is None:
            near = closest(name, [n for n, m in modules.items() if layer_kind(m) in (LINEAR, HF_CONV1D)])
            problems.append(f"{name} is not in {type(model).__name__}" + (f" (closest: {', '.join(near)})" if near else ""))
            continue
        if layer_kind(module) not in (LINEAR, HF_CONV1D):
            problems.append(f"{name} is a {type(module).__name__}, not a linear layer")
            continue
        shape = layer_info(module)
        try:
            out, inp, bits = int(info["out_features"]), int(info["in_features"]), int(info["bits"])
            group = int(info["group_size"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: incomplete layer record {info!r}")
            continue
        if (shape.out_features, shape.in_features) != (out, inp):
            problems.append(f"{name}: saved for ({out}, {inp}), the model's layer is "
                            f"({shape.out_features}, {shape.in_features})")
            continue
        q, s, b = (tensors.get(f"{name}.{k}") for k in ("qweight", "scale", "bias"))
        if q is None or q.dtype != torch.int8 or tuple(q.shape) != (out, inp):
            problems.append(f"{name}.qweight: expected int8 {(out, inp)}, found "
                            f"{'nothing' if q is None else f'{q.dtype} {tuple(q.shape)}'}")
            continue
        if s is None or group <= 0 or inp % group or tuple(s.shape) != (out, inp // group):
            problems.append(f"{name}.scale: expected {(out, inp // max(group, 1))}, found "
                            f"{'nothing' if s is None else tuple(s.shape)}")
            continue
        if bool(info.get("bias")) != (b is not None) or (b is not None and tuple(b.shape) != (out,)):
            problems.append(f"{name}.bias: expected {'(' + str(out) + ',)' if info.get('bias') else 'none'}")
            continue
        device = next((t.device for t in module.parameters()), torch.device("cpu"))
        built.append((name, QuantizedLinear(q, s, b, bits).to(device)))
    if problems:
        raise AdapterLoadError(f"cannot load {root}: " + "; ".join(problems))
    for name, layer in built:
        replace_module(model, name, layer)
    return model
