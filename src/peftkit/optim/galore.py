"""GaLore: gradient low-rank projection (Zhao et al. 2024, arXiv:2403.03507), with AdamW.

For a 2-D parameter ``W ∈ R^{m×n}`` with gradient ``G``, every ``update_gap`` steps GaLore takes
the top-``r`` singular vectors of the current gradient as a projector: ``P = U[:, :r]`` (``m×r``)
when ``m ≤ n``, else ``Q = V[:, :r]`` (``n×r``). Adam runs on the projected gradient

    R = Pᵀ G  (r×n)        or        R = G Q  (m×r)
    M ← β₁ M + (1−β₁) R,   V ← β₂ V + (1−β₂) R²,   N = M̂ / (√V̂ + ε)   (bias-corrected)

and the update is projected back: ``W ← W − lr (scale · P N + λ W)`` (or ``N Qᵀ``; ``λ`` the
decoupled weight decay). The moments live in ``r×n`` (or ``m×r``): optimizer state ``2 r n + m r``
numbers instead of ``2 m n``. Parameters that are not 2-D, or whose smaller side is ≤ ``rank``,
get plain AdamW (``torch.optim.AdamW``'s arithmetic), so ``rank ≥ min(m, n)`` is exactly AdamW.
The moments are kept when the projector is refreshed, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..core.errors import ConfigError


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose moments of large 2-D parameters live in a rank-``rank`` gradient subspace."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int = 128, update_gap: int = 200,
                 scale: float = 1.0) -> None:
        if rank < 1:
            raise ConfigError(f"GaLore rank must be >= 1, got {rank}")
        if update_gap < 1:
            raise ConfigError(f"GaLore update_gap must be >= 1, got {update_gap}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_gap": update_gap, "scale": scale}
        super().__init__(params, defaults)

    @staticmethod
    def projects(p: torch.Tensor, rank: int) -> bool:
        return p.ndim == 2 and min(p.shape) > rank

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                project = self.projects(p, group["rank"])
                if project and (state["step"] % group["update_gap"] == 0):
                    state["proj"], state["left"] = _projector(g, group["rank"])
                if project:
                    proj, left = state["proj"], state["left"]
                    r = proj.t() @ g if left else g @ proj
                else:
                    r = g
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(r)
                    state["exp_avg_sq"] = torch.zeros_like(r)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(r, 1 - b1)
                v.mul_(b2).addcmul_(r, r, value=1 - b2)
                lr = group["lr"]
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
                step_size = lr / (1 - b1 ** t)
                if project:
                    n = m / denom
                    update = proj @ n if left else n @ proj.t()
                    p.add_(update, alpha=-step_size * group["scale"])
                else:
                    p.addcdiv_(m, denom, value=-step_size)
        return loss


def _projector(g: torch.Tensor, rank: int) -> tuple[torch.Tensor, bool]:
    """Top-``rank`` left (m ≤ n) or right singular vectors of ``g``."""
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    if g.shape[0] <= g.shape[1]:
        return u[:, :rank].to(g.dtype).contiguous(), True
    return vh[:rank].t().to(g.dtype).contiguous(), False
