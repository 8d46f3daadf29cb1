"""LoftQ initialisation (Li et al. 2023, arXiv:2310.08659): quantize the base so that Q + s·B A ≈ W.

Plain QLoRA starts from ``deq(Q(W))`` with ``B = 0``: the adapted layer is off by the quantization
error ``W − deq(Q(W))`` before training. LoftQ alternates, starting from ``A = B = 0``:

    Q_t = Q(W − s·B_{t−1} A_{t−1})                    quantize what the adapter does not explain
    s·B_t A_t = SVD_r(W − deq(Q_t))                     the best rank-r fit of the residual

with ``B_t = U_r √S_r / √s`` and ``A_t = √S_r V_rᵀ / √s`` (``U S Vᵀ`` the SVD of the residual, r the
adapter's rank). After the first iteration the error ``‖W − (deq(Q_t) + s·B_t A_t)‖_F`` is already
below plain QLoRA's ``‖W − deq(Q(W))‖_F`` (the rank-r part of the residual is removed), and further
iterations lower it again. The base keeps ``Q_T``, the adapter starts at ``A_T, B_T`` and trains as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.layers import LINEAR, dense_tensor, is_quantized, layer_kind
from ..core.model import iter_sites
from ..core.targeting import display_name
from .schemes import get_scheme


@torch.no_grad()
def loftq(model: nn.Module, scheme: str = "nf4", iters: int = 5, name: str = "default") -> dict[str, list[float]]:
    """Quantize the bases of LoRA adapter ``name`` with LoftQ; returns ``{layer: [error after each iteration]}``.

    The adapter must be a plain LoRA on dense ``nn.Linear`` layers (attach it before, with the default init).
    Errors are ``‖W − (deq(Q) + s·B A)‖_F / ‖W‖_F``: the first value is plain QLoRA's (``Q(W)``, ``B A = 0``),
    then one per iteration; the layer ends with the last iteration's ``Q``, ``A``, ``B``.
    """
    from ..methods.lora import LoRALayer

    sch = get_scheme(scheme)
    if iters < 1:
        raise ConfigError(f"loftq: iters must be >= 1, got {iters}")
    sites = [(display_name(p), s) for p, s in iter_sites(model) if name in s.adapters]
    if not sites:
        raise ConfigError(f"loftq: no adapter named {name!r} is attached; attach a peftkit.LoRA first")
    problems = []
    for path, site in sites:
        ad = site.adapters[name]
        if type(ad) is not LoRALayer or layer_kind(site.base) != LINEAR:
            problems.append(f"{path}: loftq needs a plain LoRA on nn.Linear, got {type(ad).__name__} on "
                            f"{type(site.base).__name__}")
        elif is_quantized(site.base.weight):
            problems.append(f"{path}: the base is already quantized")
        elif sch.check(site.base.weight):
            problems.append(f"{path}: {sch.check(site.base.weight)}")
        elif hasattr(ad, "init_A"):
            problems.append(f"{path}: the adapter uses init={ad.config.init!r}; use the default init")
    if problems:
        raise ConfigError("cannot apply loftq: " + "; ".join(problems))
    history: dict[str, list[float]] = {}
    for path, site in sites:
        ad = site.adapters[name]
        base = site.base
        w = base.weight.detach().float()
        s, r = ad.scaling, ad.r
        norm = torch.linalg.vector_norm(w).clamp_min(1e-30)
        low = torch.zeros_like(w)
        errs: list[float] = []
        for t in range(iters):
            q = sch.quantize((w - low).to(base.weight.dtype))
            residual = w - dense_tensor(q).float()
            if t == 0:
                errs.append(float(torch.linalg.vector_norm(residual) / norm))  # plain QLoRA: B A = 0
            u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
            root = torch.sqrt(sv[:r] / s)
            b_new, a_new = u[:, :r] * root, root[:, None] * vh[:r]
            low = s * (b_new @ a_new)
            errs.append(float(torch.linalg.vector_norm(residual - low) / norm))
        base.weight = nn.Parameter(q, requires_grad=False)
        ad.lora_A.copy_(a_new.to(ad.lora_A.dtype))
        ad.lora_B.copy_(b_new.to(ad.lora_B.dtype))
        history[path] = errs
    return history
