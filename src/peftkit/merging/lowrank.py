"""Low-rank factor algebra for merging LoRA-like adapters without forming dense ΔW.

A LoRA layer holds ``ΔW = s B A`` with ``B ∈ R^{out×r}``, ``A ∈ R^{r×in}`` (convolution factors are
seen through their matrix view, ``A`` reshaped to ``(r, in·k)``). For a linear combination

    ΔW = Σ_i c_i s_i B_i A_i = [B_1 … B_n] · [c_1 s_1 A_1; … ; c_n s_n A_n] = B_cat A_cat,

so concatenation is exact, with rank ``Σ r_i`` and scale 1 (the coefficient sits on the A side, as in
peft's ``combination_type="cat"``). :func:`truncate` re-factorises ``B A`` to a smaller rank ``k``
with the optimal (Eckart–Young) rank-``k`` approximation, computed from the factors only:

    B = Q_b R_b,  Aᵀ = Q_a R_a  (thin QR),   R_b R_aᵀ = U Σ Vᵀ  (an R×R SVD, R = Σ r_i),
    B' = Q_b U_k Σ_k,   A' = V_kᵀ Q_aᵀ          (so B' A' = U' Σ_k V'ᵀ, the truncated SVD of B A)

in ``O((out + in) R²)`` time and memory instead of ``O(out · in)``. The split (singular values on B)
is peft's ``svd`` convention. :func:`svd_factors` does the same from a dense ΔW (the only way after
element-wise operations such as TIES or DARE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def as_matrices(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix views ``(r, in_flat)`` and ``(out, r)`` of LoRA factors of any layer kind."""
    r = A.shape[0]
    return A.reshape(r, -1), B.reshape(B.shape[0], r)


def like_factors(a: torch.Tensor, b: torch.Tensor, A_ref: torch.Tensor, B_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix-view factors ``a (k, in_flat)``, ``b (out, k)`` reshaped to the layout of ``A_ref``/``B_ref`` at rank ``k``."""
    k = a.shape[0]
    return (a.reshape(k, *A_ref.shape[1:]).to(A_ref.dtype).contiguous(),
            b.reshape(B_ref.shape[0], k, *B_ref.shape[2:]).to(B_ref.dtype).contiguous())


def concat(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], coeffs: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_cat, B_cat)`` with ``B_cat A_cat = Σ c_i B_i A_i`` exactly (matrix views; ``coeffs`` include the scales)."""
    mats = [as_matrices(a, b) for a, b in zip(As, Bs, strict=True)]
    a_cat = torch.cat([c * a for (a, _), c in zip(mats, coeffs, strict=True)], dim=0)
    b_cat = torch.cat([b for _, b in mats], dim=1)
    return a_cat, b_cat


def truncate(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors ``(A', B')`` of ``B A`` (matrix views), from the factors' QR (no dense product)."""
    dtype = A.dtype
    a, b = A.double(), B.double()
    qb, rb = torch.linalg.qr(b)          # (out, R), (R, R)
    qa, ra = torch.linalg.qr(a.t())      # (in, R), (R, R)
    u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
    k = min(rank, s.numel())
    b_new = qb @ (u[:, :k] * s[:k])
    a_new = vh[:k] @ qa.t()
    return a_new.to(dtype), b_new.to(dtype)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B = U_k Σ_k``, ``A = V_kᵀ``: the truncated SVD of a dense ``(out, in)`` matrix (peft's ``svd``)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, s.numel())
    return vh[:k].to(delta.dtype), (u[:, :k] * s[:k]).to(delta.dtype)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest ``k`` with ``Σ_{j<k} σ_j² ≥ energy · Σ_j σ_j²`` (at least 1)."""
    sq = singular_values.double() ** 2
    total = float(sq.sum())
    if total == 0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    return max(1, int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1)
