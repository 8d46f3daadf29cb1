"""Learned per-tensor merge coefficients, as aTLAS does (Zhang et al. 2024, arXiv:2407.03414).

For LoRA adapters ``i = 1 … n`` and each adapted module ``m`` the merged update is

    ΔW_m(λ) = Σ_i λ_{i,m} s_i B_{i,m} A_{i,m}

with one coefficient per adapter per module (per task-vector tensor). The λ's are trained by
gradient descent on a user loss over a few validation batches; the adapters' factors and the
base model stay frozen. The λ-weighted sum is evaluated in factor space (the concatenated LoRA
of :mod:`peftkit.merging.lowrank` with each block of A's rows scaled by its λ, a
``torch.nn.utils.parametrize`` parametrisation), so no dense ``ΔW`` is ever formed. Afterwards the
temporary adapter is removed and the model is as before; the result is the concatenated LoRA
with the learned λ's folded in.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.errors import ConfigError
from .adapters import _lora_parts, _lora_result, _targets, check_states, paths_of
from .lowrank import concat, like_factors


class _RowBlockScale(nn.Module):
    """``A ↦ diag(repeat(λ, ranks)) A``: block ``i`` of A's rows scaled by ``λ_i``."""

    def __init__(self, coeffs: torch.Tensor, ranks: list[int]) -> None:
        super().__init__()
        self.coeffs = nn.Parameter(coeffs.clone())
        self.register_buffer("index", torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)),
                             persistent=False)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        scale = self.coeffs[self.index].to(a.dtype)
        return a * scale.view(-1, *([1] * (a.dim() - 1)))


def learn_coefficients(model: nn.Module, states: Sequence[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                       batches: Iterable[Any], steps: int = 20, lr: float = 0.05,
                       init: Sequence[float] | None = None, name: str = "atlas") -> tuple[Any, dict[str, list[float]]]:
    """Learn ``λ_{i,m}`` on ``batches`` (cycled for ``steps`` Adam steps of ``loss_fn(model, batch)``).

    Returns ``(merged AdapterState, {module: [λ_1 … λ_n]})`` (λ = 0 where an adapter lacks the module).
    ``init``: the starting λ per adapter (default 1/n each).
    """
    from ..core.adapter_state import install
    from ..core.api import delete, get_adapter

    states = list(states)
    check_states(states)
    if states[0].config.method != "lora":
        raise ConfigError(f"learned coefficients need LoRA adapters, got {states[0].config.method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    n = len(states)
    start = [1.0 / n] * n if init is None else [float(x) for x in init]
    if len(start) != n:
        raise ConfigError(f"{len(start)} initial coefficients for {n} adapters")
    batch_list = list(batches)
    if not batch_list:
        raise ConfigError("no validation batches to learn the coefficients on")
    paths = _targets(states)
    tensors: dict[str, torch.Tensor] = {}
    present: dict[str, list[int]] = {}
    for path in paths:
        idx = [i for i, s in enumerate(states) if path in paths_of(s)]
        parts = [_lora_parts(states[i], path) for i in idx]
        a, b = concat([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])
        A, B = like_factors(a, b, parts[0][0], parts[0][1])
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = A, B
        present[path] = idx
    probe = _lora_result(states, tensors, {p: int(tensors[f"{p}.lora_A"].shape[0]) for p in paths}, paths, name)
    frozen = {p: p_.requires_grad for p, p_ in model.named_parameters()}
    install(model, probe, name=name, trainable=False, activate=True)
    modules = get_adapter(model, name)
    scalers: dict[str, _RowBlockScale] = {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for path, mod in modules.items():
            ranks = [int(states[i].module_tensors(path)["lora_A"].shape[0]) for i in present[path]]
            sc = _RowBlockScale(torch.tensor([start[i] for i in present[path]]), ranks).to(mod.lora_A.device)
            parametrize.register_parametrization(mod, "lora_A", sc)
            scalers[path] = sc
        params = [sc.coeffs for sc in scalers.values()]
        opt = torch.optim.Adam(params, lr=lr)
        for batch in itertools.islice(itertools.cycle(batch_list), steps):
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
        learned = {path: sc.coeffs.detach().cpu().tolist() for path, sc in scalers.items()}
    finally:
        for mod in modules.values():
            if parametrize.is_parametrized(mod, "lora_A"):
                parametrize.remove_parametrizations(mod, "lora_A", leave_parametrized=False)
        delete(model, name)
        for p_name, p in model.named_parameters():
            p.requires_grad_(frozen.get(p_name, p.requires_grad))
    coeffs: dict[str, list[float]] = {}
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        full = [0.0] * n
        for j, i in enumerate(present[path]):
            full[i] = learned[path][j]
        coeffs[path] = full
        parts = [_lora_parts(states[i], path) for i in present[path]]
        coeff = [full[i] * p[2] for i, p in zip(present[path], parts, strict=True)]
        a, b = concat([p[0] for p in parts], [p[1] for p in parts], coeff)
        out[f"{path}.lora_A"], out[f"{path}.lora_B"] = like_factors(a, b, parts[0][0], parts[0][1])
    result = _lora_result(states, out, {p: int(out[f"{p}.lora_A"].shape[0]) for p in paths}, paths, name)
    return result, coeffs
