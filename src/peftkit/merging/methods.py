"""The merge methods on one tensor's task vectors ``τ_1 … τ_n`` with weights ``w_1 … w_n``.

Notation: ``T`` stacks the task vectors (``T[i] = τ_i``), ``k = ⌊density · numel⌋``.

* ``task_arithmetic`` (Ilharco et al. 2023, arXiv:2212.04089): ``τ = Σ w_i τ_i`` (``normalize``: divided by ``Σ w_i``).
* ``magnitude_prune``: keep the ``k`` largest ``|τ_i|`` of each task, then ``Σ w_i τ̃_i``.
* ``ties`` (Yadav et al. 2023, arXiv:2306.01708): trim (top-k by magnitude per task), elect the sign
  per entry (``sign Σ_i τ̃_i``, or of ``Σ_i sign τ̃_i`` for ``majority_sign_method="frequency"``), disjoint
  mean ``Σ_i w_i τ̃_i [sign τ̃_i = s] / max(1, #{i: sign τ̃_i = s})``. peft's ``ties`` exactly.
* ``dare_linear`` / ``dare_ties`` (Yu et al. 2024, arXiv:2311.03099): drop each entry with probability
  ``1 − density``, rescale the survivors by ``1/density``, then task arithmetic / TIES' elect + disjoint mean.
* ``breadcrumbs`` (Davari & Belilovsky 2023, arXiv:2312.06795): per task, drop the ``gamma`` fraction of
  largest-magnitude entries (outliers) and every entry below the next ``density`` fraction, then ``Σ w_i τ̃_i``.
* ``della`` (Deep et al. 2024, arXiv:2406.11617): MagPrune — within each row, entries ranked by magnitude
  get keep probabilities spread linearly over ``[density − ε, density + ε]`` (largest kept most often),
  survivors rescaled by ``1/p``; then TIES' sign election and disjoint mean, times ``lambda_``.
* ``pcb`` (Du et al. 2024, arXiv:2410.02396): intra-balancing ``β_intra,i = softmax(n · norm(τ_i²))``,
  inter-balancing ``β_inter,i = Σ_j softmax(norm(τ_i ⊙ τ_j))`` (softmax over the entries of the tensor,
  ``norm`` the z-score), ``β_i = β_intra,i ⊙ β_inter,i``; keep the top ``density`` fraction of each ``β_i``;
  ``τ = Σ_i β̂_i τ_i / Σ_i β̂_i`` (entries where every β̂ is 0 get 0).
* ``model_stock`` (Jang et al. 2024, arXiv:2403.19522): with ``cos θ`` the mean pairwise cosine of the
  task vectors, ``t = n cos θ / (1 + (n − 1) cos θ)`` and ``τ = t · mean_i τ_i`` (i.e. ``θ = t θ̄ + (1 − t) θ_0``).
* ``slerp`` (Shoemake 1985; mergekit): ``τ = sin((1−t)Ω)/sin Ω · τ_1 + sin(tΩ)/sin Ω · τ_2``, ``cos Ω`` the
  cosine of the two inputs; linear interpolation when they are (anti)parallel within ``eps``.

Weights are applied as in peft: for TIES-like methods after trimming and sign election (the election
sees the unweighted trimmed vectors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError
from .registry import MaskSource, MergeOptions, merge_method, probability_option

SIGN_METHODS = ("total", "frequency")


def _w(t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` shaped to broadcast against the stacked tensor ``t`` ``(n, ...)``."""
    return weights.to(t.dtype).view(weights.shape + (1,) * (t.dim() - 1))


def top_k_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """0/1 mask of the ``⌊density · numel⌋`` largest ``|t|`` (peft's ``magnitude_based_pruning`` rule)."""
    if density >= 1:
        return torch.ones_like(t)
    flat = t.abs().reshape(-1)
    mask = torch.zeros_like(flat)
    k = int(density * flat.numel())
    mask[torch.topk(flat, k=k, largest=True).indices] = 1
    return mask.view_as(t)


def elect_and_merge(trimmed: torch.Tensor, weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES' sign election on ``trimmed`` ``(n, ...)`` and the weighted disjoint mean of the agreeing entries."""
    signs = trimmed.sign()
    total = trimmed.sum(0) if sign_method == "total" else signs.sum(0)
    elected = torch.where(total >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = signs == elected
    mixed = (trimmed * _w(trimmed, weights) * agree).sum(0)
    return mixed / agree.sum(0).clamp(min=1).to(trimmed.dtype)


# ---------------------------------------------------------------------------------------------
@dataclass
class TaskArithmeticOptions(MergeOptions):
    normalize: bool = False

    def validate(self, n_inputs: int) -> None:
        return None


@merge_method("task_arithmetic", TaskArithmeticOptions, linear=True, needs_base=False)
def task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor, o: TaskArithmeticOptions,
                    masks: MaskSource) -> torch.Tensor:
    """Weighted sum Σ w_i τ_i (normalize: divided by Σ w_i)."""
    t = torch.stack(tensors)
    out = (t * _w(t, weights)).sum(0)
    if o.normalize:
        total = float(weights.sum())
        if total == 0:
            raise ConfigError("task_arithmetic with normalize=True needs weights whose sum is not 0")
        out = out / total
    return out


@dataclass
class DensityOptions(MergeOptions):
    density: float = 0.5

    def validate(self, n_inputs: int) -> None:
        probability_option(type(self).__name__, "density", self.density)


@merge_method("magnitude_prune", DensityOptions)
def magnitude_prune(tensors: list[torch.Tensor], weights: torch.Tensor, o: DensityOptions,
                    masks: MaskSource) -> torch.Tensor:
    """Keep the largest-magnitude density fraction of each τ_i, then Σ w_i τ̃_i."""
    t = torch.stack([x * top_k_mask(x, o.density) for x in tensors])
    return (t * _w(t, weights)).sum(0)


@dataclass
class TiesOptions(MergeOptions):
    density: float = 0.5
    majority_sign_method: str = "total"

    def validate(self, n_inputs: int) -> None:
        probability_option("ties", "density", self.density)
        _sign_method(self.majority_sign_method)


def _sign_method(value: str) -> None:
    if value not in SIGN_METHODS:
        from ..core.errors import did_you_mean

        raise ConfigError(f"majority_sign_method={value!r} is not one of {', '.join(SIGN_METHODS)}"
                          f"{did_you_mean(value, SIGN_METHODS)}")


@merge_method("ties", TiesOptions)
def ties(tensors: list[torch.Tensor], weights: torch.Tensor, o: TiesOptions, masks: MaskSource) -> torch.Tensor:
    """TIES: trim to the top density fraction, elect signs, weighted disjoint mean."""
    t = torch.stack([x * top_k_mask(x, o.density) for x in tensors])
    return elect_and_merge(t, weights, o.majority_sign_method)


@dataclass
class DareOptions(MergeOptions):
    density: float = 0.5
    rescale: bool = True
    seed: int | None = None

    def validate(self, n_inputs: int) -> None:
        probability_option("dare", "density", self.density)


@dataclass
class DareTiesOptions(DareOptions):
    majority_sign_method: str = "total"

    def validate(self, n_inputs: int) -> None:
        super().validate(n_inputs)
        _sign_method(self.majority_sign_method)


def _dare_drop(tensors: list[torch.Tensor], o: DareOptions, masks: MaskSource) -> torch.Tensor:
    out = []
    for x in tensors:
        if o.density >= 1:
            out.append(x)
            continue
        kept = x * masks.keep(x, o.density)
        out.append(kept / o.density if o.rescale else kept)
    return torch.stack(out)


@merge_method("dare_linear", DareOptions, random=True)
def dare_linear(tensors: list[torch.Tensor], weights: torch.Tensor, o: DareOptions, masks: MaskSource) -> torch.Tensor:
    """DARE: random drop with keep probability density, rescale by 1/density, weighted sum."""
    t = _dare_drop(tensors, o, masks)
    return (t * _w(t, weights)).sum(0)


@merge_method("dare_ties", DareTiesOptions, random=True)
def dare_ties(tensors: list[torch.Tensor], weights: torch.Tensor, o: DareTiesOptions, masks: MaskSource) -> torch.Tensor:
    """DARE-TIES: DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    return elect_and_merge(_dare_drop(tensors, o, masks), weights, o.majority_sign_method)


@dataclass
class BreadcrumbsOptions(MergeOptions):
    density: float = 0.9
    gamma: float = 0.01

    def validate(self, n_inputs: int) -> None:
        probability_option("breadcrumbs", "density", self.density)
        probability_option("breadcrumbs", "gamma", self.gamma, allow_zero=True)
        if self.density + self.gamma > 1:
            raise ConfigError(f"breadcrumbs: density + gamma must be at most 1, got {self.density} + {self.gamma}")


@merge_method("breadcrumbs", BreadcrumbsOptions)
def breadcrumbs(tensors: list[torch.Tensor], weights: torch.Tensor, o: BreadcrumbsOptions,
                masks: MaskSource) -> torch.Tensor:
    """Model Breadcrumbs: drop the top gamma (outliers) and the bottom 1 − density − gamma by magnitude, then Σ w_i τ̃_i."""
    out = []
    for x in tensors:
        n = x.numel()
        top = int(o.gamma * n)
        keep = int((o.density + o.gamma) * n) - top
        order = torch.argsort(x.abs().reshape(-1), descending=True, stable=True)
        mask = torch.zeros(n, dtype=x.dtype, device=x.device)
        mask[order[top: top + keep]] = 1
        out.append(x * mask.view_as(x))
    t = torch.stack(out)
    return (t * _w(t, weights)).sum(0)


@dataclass
class DellaOptions(MergeOptions):
    density: float = 0.5
    epsilon: float = 0.1
    lambda_: float = 1.0
    majority_sign_method: str = "total"
    seed: int | None = None

    def validate(self, n_inputs: int) -> None:
        probability_option("della", "density", self.density)
        if not (0 <= self.epsilon and self.density - self.epsilon > 0 and self.density + self.epsilon <= 1):
            raise ConfigError(f"della: keep probabilities density ± epsilon must lie in (0, 1], got "
                              f"{self.density} ± {self.epsilon}")
        _sign_method(self.majority_sign_method)


def della_keep_probabilities(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's keep probabilities: per row (the whole tensor if 1-D), the entry of magnitude rank ``r``
    (0 = smallest) of ``m`` gets ``density − ε + 2ε · r / (m − 1)``."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    m = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(x.dtype)
    spread = ranks / (m - 1) if m > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon + 2 * epsilon * spread).view_as(x)


@merge_method("della", DellaOptions, random=True)
def della(tensors: list[torch.Tensor], weights: torch.Tensor, o: DellaOptions, masks: MaskSource) -> torch.Tensor:
    """DELLA: magnitude-ranked random drop (MagPrune) with 1/p rescaling, sign election, disjoint mean, × lambda."""
    dropped = []
    for x in tensors:
        p = della_keep_probabilities(x, o.density, o.epsilon)
        dropped.append(x * masks.keep(x, p) / p)
    return o.lambda_ * elect_and_merge(torch.stack(dropped), weights, o.majority_sign_method)


@dataclass
class PCBOptions(MergeOptions):
    density: float = 0.2

    def validate(self, n_inputs: int) -> None:
        probability_option("pcb", "density", self.density)


def _znorm(x: torch.Tensor) -> torch.Tensor:
    std = x.std() if x.numel() > 1 else torch.ones((), dtype=x.dtype)
    return (x - x.mean()) / (std if float(std) > 0 else 1.0)


@merge_method("pcb", PCBOptions, uses_weights=False)
def pcb(tensors: list[torch.Tensor], weights: torch.Tensor, o: PCBOptions, masks: MaskSource) -> torch.Tensor:
    """PCB-merging: intra × inter balancing scores, keep the top density of each, score-weighted mean."""
    n = len(tensors)
    flat = torch.stack([x.reshape(-1) for x in tensors]).float()
    betas = []
    for i in range(n):
        intra = torch.softmax(n * _znorm(flat[i] * flat[i]), dim=0)
        inter = sum(torch.softmax(_znorm(flat[i] * flat[j]), dim=0) for j in range(n))
        beta = intra * inter
        betas.append(beta * top_k_mask(beta, o.density))
    b = torch.stack(betas)
    total = b.sum(0)
    out = (b * flat).sum(0) / torch.where(total > 0, total, torch.ones_like(total))
    return out.view_as(tensors[0]).to(tensors[0].dtype)


@dataclass
class ModelStockOptions(MergeOptions):
    eps: float = 1e-8

    def validate(self, n_inputs: int) -> None:
        if self.eps <= 0:
            raise ConfigError(f"model_stock: eps must be > 0, got {self.eps}")


def model_stock_t(tensors: list[torch.Tensor], eps: float = 1e-8) -> float:
    """``t = n cos θ / (1 + (n − 1) cos θ)`` with ``cos θ`` the mean pairwise cosine of the task vectors."""
    n = len(tensors)
    flat = [x.reshape(-1).float() for x in tensors]
    cosines = [float(torch.dot(flat[i], flat[j]) / (flat[i].norm() * flat[j].norm()).clamp(min=eps))
               for i in range(n) for j in range(i + 1, n)]
    cos = sum(cosines) / len(cosines)
    return n * cos / (1 + (n - 1) * cos)


@merge_method("model_stock", ModelStockOptions, uses_weights=False, inputs=(2, None))
def model_stock(tensors: list[torch.Tensor], weights: torch.Tensor, o: ModelStockOptions,
                masks: MaskSource) -> torch.Tensor:
    """Model Stock: t · mean τ_i, t from the mean pairwise cosine of the task vectors."""
    return model_stock_t(tensors, o.eps) * torch.stack(tensors).mean(0)


@dataclass
class SlerpOptions(MergeOptions):
    t: float = 0.5
    eps: float = 1e-6

    def validate(self, n_inputs: int) -> None:
        probability_option("slerp", "t", self.t, allow_zero=True)


@merge_method("slerp", SlerpOptions, uses_weights=False, needs_base=False, inputs=(2, 2))
def slerp(tensors: list[torch.Tensor], weights: torch.Tensor, o: SlerpOptions, masks: MaskSource) -> torch.Tensor:
    """Spherical interpolation from the first input (t = 0) to the second (t = 1)."""
    a, b = tensors
    af, bf = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = af.norm(), bf.norm()
    if na < o.eps or nb < o.eps:
        return torch.lerp(a.double(), b.double(), o.t).to(a.dtype)
    cos = float(torch.dot(af / na, bf / nb).clamp(-1, 1))
    if abs(cos) > 1 - o.eps:
        return torch.lerp(a.double(), b.double(), o.t).to(a.dtype)
    omega = math.acos(cos)
    s = math.sin(omega)
    return (math.sin((1 - o.t) * omega) / s * a.double() + math.sin(o.t * omega) / s * b.double()).to(a.dtype)
