"""The SVD pieces shared by every SVD-initialised method: PiSSA / MiLoRA (LoRA's ``init``), SVFit,
SORSA and CorDA.

For a weight ``W ∈ R^{out×in}`` (the layer's matrix view) with ``W = U diag(σ) Vᵀ`` and
``σ_1 ≥ σ_2 ≥ ...``:

* :func:`svd_triplets` — the ``r`` principal (``which="top"``: PiSSA, SVFit, SORSA, CorDA-IPA)
  or minor (``which="bottom"``: MiLoRA, CorDA-KPA) triplets ``(U_r, σ_r, V_rᵀ)``, optionally by a
  randomised SVD with ``niter`` power iterations (top only);
* :func:`energy_rank` — the smallest ``r`` with ``Σ_{i≤r} σ_i² ≥ fraction · Σ_i σ_i²`` (SVFit's
  "information" kept, read as the Frobenius energy);
* :func:`split_root` — LoRA factors from triplets, ``A = diag(√(σ/s)) Vᵀ``, ``B = U diag(√(σ/s))``
  so that ``s·B A = U diag(σ) Vᵀ`` (PiSSA, MiLoRA, CorDA);
* :func:`covariance_triplets` — CorDA's context-oriented decomposition: ``SVD(W C) = U Σ V̂ᵀ``
  with a damped input covariance ``C``, and ``W = U Σ (V̂ᵀ C⁻¹)``, so the right factor is
  ``V̂ᵀ C⁻¹`` (not orthonormal). With ``C = I`` it is the plain SVD.

Every function works in float32 and returns float32 tensors on the weight's device.
"""

from __future__ import annotations

import torch

from ..core.errors import ConfigError

WHICH = ("top", "bottom")


@torch.no_grad()
def svd_triplets(w: torch.Tensor, r: int, which: str = "top",
                 niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r (out×r), σ_r (r,), V_rᵀ (r×in))``: the ``r`` largest (``"top"``) or smallest (``"bottom"``) triplets."""
    if which not in WHICH:
        raise ConfigError(f"svd_triplets: which={which!r} is not one of {WHICH}")
    w = w.detach().float()
    if niter is not None:
        if which != "top":
            raise ConfigError("svd_triplets: a randomised SVD (niter) finds only the top triplets")
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        return u, s, v.t()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    sl = slice(0, r) if which == "top" else slice(s.numel() - r, s.numel())
    return u[:, sl].contiguous(), s[sl].contiguous(), vh[sl].contiguous()


def energy_rank(s: torch.Tensor, fraction: float) -> int:
    """The smallest ``r ≥ 1`` whose top-``r`` singular values hold ``fraction`` of ``Σ σ_i²``."""
    e = s.detach().double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    # a tolerance of one part in 10^12 so that fraction=1.0 picks the full rank despite rounding
    return min(int((cum < fraction - 1e-12).sum()) + 1, s.numel())


def split_root(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(A, B)`` with ``scaling · B A = U diag(s) Vᵀ``: ``A = √(s/scaling) Vᵀ``, ``B = U √(s/scaling)``."""
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


@torch.no_grad()
def damped_covariance(c: torch.Tensor, damping: float = 0.01,
                      tol: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C', C'⁻¹)`` with ``C' = C + d · mean(diag C) · I``: ``d`` starts at ``damping`` and doubles until
    ``‖C' C'⁻¹ − I‖_F < tol`` (peft's rule for CorDA)."""
    c = c.detach().float()
    eye = torch.eye(c.shape[0], device=c.device, dtype=c.dtype)
    mean_diag = torch.mean(torch.diag(c))
    d = damping
    for _ in range(64):
        fixed = c + eye * (mean_diag * d)
        inv = torch.linalg.inv(fixed)
        if float(torch.dist(fixed @ inv, eye)) < tol:
            return fixed, inv
        d *= 2
    raise ConfigError("CorDA: the covariance stays singular after damping; calibrate on more (or more varied) data")


@torch.no_grad()
def covariance_triplets(w: torch.Tensor, c: torch.Tensor, r: int, which: str = "top",
                        damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CorDA: ``(U_r, σ_r, (V̂ᵀ C'⁻¹)_r)`` from ``SVD(W C') = U diag(σ) V̂ᵀ`` with the damped covariance ``C'``.

    ``U diag(σ) (V̂ᵀ C'⁻¹)`` over all triplets is ``W`` again; ``which`` picks the ``r`` largest
    (IPA, instruction-previewed) or smallest (KPA, knowledge-preserving) triplets.
    """
    fixed, inv = damped_covariance(c, damping)
    u, s, vh = svd_triplets(w.detach().float() @ fixed, r, which)
    return u, s, vh @ inv
