"""LoRA extraction from a full fine-tune: a truncated SVD of ``W_ft − W_0`` per layer.

For each targeted layer (matrix view ``(out, in_flat)``, :mod:`peftkit.core.layers`)

    ΔW = W_ft − W_0 = U Σ Vᵀ,    B = U_k Σ_k,   A = V_kᵀ,   scale 1 (alpha = r),

with ``k = rank`` or the smallest ``k`` keeping ``energy`` of ``Σ σ_j²``. ``B A`` is the best rank-``k``
approximation of ``ΔW`` (Eckart–Young); the reported error per layer is
``‖ΔW − B A‖_F / ‖ΔW‖_F = √(Σ_{j≥k} σ_j²) / √(Σ_j σ_j²)``. Layers whose weight did not change get
rank 1 and zero factors. Biases and untargeted tensors are not extracted (say so: the report
lists them). The result is a LoRA ``AdapterState`` whose ranks may differ per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.layers import as_matrix, layer_kind
from .lowrank import energy_rank


@dataclass
class LayerReport:
    module: str
    rank: int
    relative_error: float
    delta_norm: float


def _finetuned_tensors(finetuned: Any) -> Any:
    if isinstance(finetuned, nn.Module):
        return finetuned.state_dict()
    if isinstance(finetuned, (str, Path)):
        from .checkpoint import Checkpoint

        return Checkpoint(finetuned)
    if isinstance(finetuned, dict):
        return finetuned
    raise ConfigError(f"finetuned must be a model, a state dict or a safetensors path, got {type(finetuned).__name__}")


def _get(source: Any, key: str) -> torch.Tensor | None:
    if isinstance(source, dict):
        return source.get(key)
    return source.get(key) if key in source.where else None


def extract_lora(model: nn.Module, finetuned: Any, rank: int | None = None, energy: float | None = None,
                 target_modules: Any = "all-linear", exclude_modules: Any = None, name: str = "extracted",
                 key_prefix: str = "") -> tuple[Any, list[LayerReport]]:
    """``(AdapterState, per-layer report)``: the LoRA that best reproduces ``finetuned`` on top of ``model``.

    ``model`` is the base model (its weights are ``W_0``; it is not modified). ``finetuned`` is the
    fine-tuned model, its state dict, or a safetensors file / directory with the same tensor names
    (``key_prefix`` is prepended to the module path to find them). Exactly one of ``rank`` and
    ``energy`` (a fraction in (0, 1]).
    """
    from ..core.adapter_state import AdapterState, base_facts
    from ..core.targeting import display_name, resolve_targets
    from ..methods.lora import LoRA

    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of rank (an integer) or energy (a fraction of Σσ² to keep)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")
    source = _finetuned_tensors(finetuned)
    names = resolve_targets(model, target_modules, exclude_modules, None)
    plan = []
    for mname in names:
        mod = model.get_submodule(mname)
        path = display_name(mname)
        if layer_kind(mod) == "other" or getattr(mod, "weight", None) is None:
            raise ConfigError(f"module {path} ({type(mod).__name__}) has no weight matrix to extract from")
        key = f"{key_prefix}{path}.weight"
        w_ft = _get(source, key)
        if w_ft is None:
            raise ConfigError(f"the fine-tuned weights have no tensor {key!r} (set key_prefix if the names differ)")
        if tuple(w_ft.shape) != tuple(mod.weight.shape):
            raise ConfigError(f"{key}: fine-tuned shape {tuple(w_ft.shape)} but the base has {tuple(mod.weight.shape)}")
        plan.append((path, mod, key))
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    report: list[LayerReport] = []
    ranks: dict[str, int] = {}
    for path, mod, key in plan:
        w0 = as_matrix(mod).detach().float()
        w1 = as_matrix(mod, _get(source, key)).detach().float()
        delta = w1 - w0
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel()) if rank is not None else energy_rank(s, float(energy))
        total = float((s.double() ** 2).sum())
        err = (float((s[k:].double() ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0
        a, b = vh[:k], u[:, :k] * s[:k]
        dtype = mod.weight.dtype
        w = mod.weight
        if w.dim() > 2:  # convolutions: A (k, in, *kernel), B (out, k, 1, ...)
            a = a.reshape(k, *w.shape[1:])
            b = b.reshape(w.shape[0], k, *([1] * (w.dim() - 2)))
        tensors[f"{path}.lora_A"] = a.to(dtype).contiguous()
        tensors[f"{path}.lora_B"] = b.to(dtype).contiguous()
        layers[path] = {"kind": layer_kind(mod), "shape": list(w.shape)}
        ranks[path] = k
        report.append(LayerReport(path, k, err, total ** 0.5))
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(counts, key=lambda r: (counts[r], r)) if counts else 1
    import re

    pattern = {re.escape(p): r for p, r in ranks.items() if r != r0}
    config = LoRA(r=r0, alpha=float(r0), rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in pattern.items()},
                  target_modules=[p for p, _, _ in plan])
    state = AdapterState(name=name, config=config, targets=[p for p, _, _ in plan], tensors=tensors, shared={},
                         layers=layers, base=base_facts(model))
    return state, report
