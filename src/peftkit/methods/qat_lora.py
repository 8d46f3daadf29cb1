"""Quantization-aware LoRA: L4Q and LR-QAT. The layer trains through its own quantized weight.

Both methods replace a frozen layer's weight ``W0 ∈ R^{out×in}`` (``nn.Linear``, transformers
``Conv1D`` through its matrix view) by a weight that lies on a signed ``b``-bit grid with one
step size per output channel or per group of ``group_size`` inputs (see
:mod:`peftkit.methods.fakequant`: ``qmin = −2^(b−1)``, ``qmax = 2^(b−1) − 1``, STE for ``round``), and
train LoRA factors ``A ∈ R^{r×in}`` (Kaiming), ``B ∈ R^{out×r}`` (zeros) and the step sizes ``s``
(``c = alpha/r``, rsLoRA ``alpha/√r``). ``W0`` is frozen.

* **L4Q** (Jeon et al. 2024, arXiv:2402.04902): quantize after adding the LoRA update,

      Ŵ = s · clamp(round((W0 + c·B A) / s), qmin, qmax)

  with ``s`` learned as in LSQ (its gradient ``round(v/s) − v/s`` inside the grid, ``qmin``/``qmax``
  where clipped, scaled by ``1/√(N·qmax)``; ``N`` weights per step size).
* **LR-QAT** (Bondarenko et al. 2024, arXiv:2406.06385): the frozen weight is kept in the integer
  domain, ``Φ0 = φ(W0 / s0)`` with ``s0`` the starting step sizes and ``φ`` a down-cast
  (``phi_format``: ``"fixed"`` an int8 fixed-point number with ``8 − b`` fraction bits, one of the
  paper's down-casts; ``"int"`` the integers ``round(W0/s0)``, one per byte (the paper packs two
  4-bit integers per byte); ``"bf16"``), and the low-rank update
  is added *inside* the rounding, in grid units:

      Ŵ = s · clamp(round(Φ0 + c·B A), qmin, qmax)

  so ``∂Ŵ/∂s = clamp(round(·))`` (``Φ0`` does not move with ``s``).

``Ŵ`` is one autograd node (:class:`~peftkit.methods.fakequant.QuantizedWeight`) that keeps no
weight-sized tensor for backward (it recomputes ``u``; L4Q's memory-optimised backward); the layer's
product keeps ``Ŵ`` for the input's gradient. ``checkpoint=True`` (LR-QAT's checkpointing) drops that
too when the adapter runs alone on its layer: only the input is kept, ``Ŵ`` is formed again in backward.

At initialisation (``B = 0``) the layer is **not** the base layer: it computes the fake-quantized
base (round-to-nearest with the starting step sizes; for LR-QAT with ``Φ0``'s down-cast). That is
the defining property tested (``identity_at_init`` is False in the contract cases).

After training the layer holds integers and step sizes only:

* :func:`peftkit.quant.export_quantized` replaces each adapted layer by a
  :class:`peftkit.quant.QuantizedLinear` (int8 integers + float32 step sizes + bias, no adapter
  branch, no extra module) that reproduces the training forward in eval mode exactly;
* ``peftkit.merge`` / ``unload(merge=True)`` write ``Ŵ`` into the dense base weight (every value
  on the grid, stored in the base's float dtype): the same outputs, but no integer storage.
  ``unmerge`` puts ``W0`` back exactly.

Two weight-replacing adapters cannot run stacked on one layer (quantizing an already quantized
weight has no meaning): activating two at once raises an error naming both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..core.adapter import AdapterModule
from ..core.config import LowRankOptions, one_of
from ..core.errors import ConfigError, PeftkitError
from ..core.layers import HF_CONV1D, LINEAR, call_with_weight, layer_info
from ..core.registry import register
from ..core.targets import ALL_LINEAR
from .fakequant import (
    BITS,
    SCALE_INITS,
    QuantizedWeight,
    grid,
    grouped,
    init_scale,
    lsq_grad_factor,
    valid_group_sizes,
)

PHI_FORMATS = ("fixed", "int", "bf16")


@dataclass
class QATOptions(LowRankOptions):
    """Options shared by L4Q and LR-QAT.

    ``bits`` (2, 3, 4 or 8) the signed integer grid; ``group_size`` the inputs sharing one step
    size (0: one per output channel); ``scale_init`` ``"absmax"`` (round-to-nearest at step 0) or
    ``"lsq"``; ``lsq_grad_scale`` scales the step-size gradient by ``1/√(N·qmax)``;
    ``checkpoint`` recomputes the quantized weight in backward; ``scale_lr`` the step sizes' learning
    rate in ``peftkit.train`` / ``peftkit train --scale-lr`` (through the :meth:`param_groups` hook;
    None: the run's rate, like ``A`` and ``B``).
    """

    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ALL_LINEAR  # QAT quantizes every linear layer of the blocks
    family = "quantization-aware"
    mergeable = True

    alpha: float = 16.0
    bits: int = 4
    group_size: int = 0
    scale_init: str = "absmax"
    lsq_grad_scale: bool = True
    checkpoint: bool = False
    scale_lr: float | None = None

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        v = self.scale_lr
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise ConfigError(f"{owner}: scale_lr must be a positive number (the step sizes' learning rate; "
                              f"benchmarks/qat_lora.py found the run's lr / 100 best) or None (the run's lr), got {v!r}")
        if self.bits not in BITS:
            raise ConfigError(f"{owner}: bits={self.bits!r} is not supported; choose one of "
                              f"{', '.join(map(str, BITS))} (closest: {min(BITS, key=lambda b: abs(b - self.bits))})")
        if self.group_size < 0:
            raise ConfigError(f"{owner}: group_size must be 0 (one step size per output channel) or positive, "
                              f"got {self.group_size}")
        one_of(owner, "scale_init", self.scale_init, SCALE_INITS)

    def param_groups(self, modules: dict[str, Any], lr: float) -> list[dict[str, Any]]:
        """The training loop's optimizer groups (:func:`peftkit.core.hooks.param_groups`): ``A`` and ``B``
        at the run's ``lr``, the step sizes ``scale`` at ``scale_lr``; none apart when ``scale_lr`` is None."""
        if self.scale_lr is None:
            return []
        scales = [m.scale for m in modules.values()]
        rest = [p for m in modules.values() for n, p in m.named_parameters() if n != "scale"]
        return [{"params": rest, "lr": lr}, {"params": scales, "lr": float(self.scale_lr)}]

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        info = layer_info(base)
        g = self.group_size
        if g and info.in_features % g:
            sizes = valid_group_sizes(info.in_features)
            near = sorted(sizes, key=lambda d: (abs(d - g), d))[:2]
            return (f"group_size {g} does not divide the layer's {info.in_features} inputs; "
                    f"closest valid: {', '.join(map(str, sorted(near)))} (or 0: one step size per output channel)")
        r = self.rank_for(module_name)
        limit = min(info.in_features, info.out_features)
        if r > limit:
            return f"rank {r} is larger than the layer allows ({limit} = min(out, in))"
        return None


class QATLayer(AdapterModule):
    """The shared layer: ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``, ``scale`` ``(out, in/group)``.

    Subclasses define :meth:`frozen` and :meth:`integer_domain` (``u`` grouped ``(out, G, g)``, the
    value rounded) and whether ``u`` divides by the step size (L4Q) or not (LR-QAT); the layer is the
    :class:`~peftkit.methods.fakequant.QATSpec` of :class:`~peftkit.methods.fakequant.QuantizedWeight`.
    """

    overrides_params = True
    adapts_output = False

    def __init__(self, config: QATOptions, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        info = layer_info(base)
        self.kind_out, self.kind_in = info.out_features, info.in_features
        self.r = r = config.rank_for(module_name)
        self.scaling = config.scale_for(module_name)
        self.bits = config.bits
        self.qmin, self.qmax = grid(config.bits)
        self.group = config.group_size or info.in_features
        self.grad_factor = lsq_grad_factor(self.group, self.qmax) if config.lsq_grad_scale else 1.0
        self.lora_A = nn.Parameter(torch.empty(r, info.in_features))
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        w0 = self.matrix(base).detach().float()
        self.scale = nn.Parameter(init_scale(w0, self.group, config.bits, config.scale_init))

    # -- the quantized weight ------------------------------------------------------------
    #: True for L4Q (``u = (W0 + c·B A)/s``), False for LR-QAT (``u = Φ0 + c·B A``)
    divides_by_scale: bool = True

    def frozen(self, base: nn.Module) -> torch.Tensor:
        """The frozen tensor ``u`` is formed from (``W0``'s matrix view, or LR-QAT's ``Φ0`` codes)."""
        raise NotImplementedError

    def integer_domain(self, frozen: torch.Tensor, low_rank: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``u`` grouped ``(out, G, g)`` (float32) from :meth:`frozen`, ``c·B A`` grouped and ``s``."""
        raise NotImplementedError

    def quantized_matrix(self, base: nn.Module) -> torch.Tensor:
        """``Ŵ`` as the float32 ``(out, in)`` matrix (differentiable in ``A``, ``B``, ``s``; one autograd node)."""
        return QuantizedWeight.apply(self.frozen(base), self.lora_A, self.lora_B, self.scale, self)

    def quantized_weight(self, base: nn.Module) -> torch.Tensor:
        """``Ŵ`` laid out like ``base.weight``, in the base's dtype (what the layer computes with)."""
        return self.unmatrix(base, self.quantized_matrix(base)).to(base.weight.dtype)

    @torch.no_grad()
    def integers(self, base: nn.Module) -> torch.Tensor:
        """The grid integers ``q`` ``(out, in)`` (int8) such that ``Ŵ = s · q``."""
        low_rank = grouped((self.lora_B @ self.lora_A) * self.scaling, self.group)
        u = self.integer_domain(self.frozen(base), low_rank, self.scale)
        q = torch.clamp(torch.round(u), self.qmin, self.qmax)
        return q.reshape(self.kind_out, self.kind_in).to(torch.int8)

    # -- forward --------------------------------------------------------------------------
    def override_params(self, params: dict[str, torch.Tensor], site: Any) -> dict[str, torch.Tensor]:
        if "weight" in params:
            others = [n for n in site.running() if site.adapters[n] is not self]
            raise PeftkitError(f"{self.config.method} replaces the layer's weight by a quantized one and cannot run "
                               f"stacked on another weight-replacing adapter (active together: {', '.join(others)}); "
                               "activate one of them")
        return {**params, "weight": self.quantized_weight(site.base)}

    def fused_forward(self, x: torch.Tensor, site: Any) -> torch.Tensor | None:
        base = site.base
        if not self.config.checkpoint or not torch.is_grad_enabled():
            return call_with_weight(base, x, self.quantized_weight(base))
        return _checkpoint(lambda inp: call_with_weight(base, inp, self.quantized_weight(base)), x,
                           use_reentrant=False)

    # -- merging: the dense base weight becomes Ŵ (on the grid); unmerge restores W0 -----------
    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        base.weight.data.copy_(self.quantized_weight(base))

    def unmerge_from(self, base: nn.Module) -> None:
        """Nothing to undo here: the site puts back the exact pre-merge weight."""

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``Ŵ − W0`` (module layout): what a merge adds to the weight."""
        with torch.no_grad():
            return self.quantized_weight(base).float() - base.weight.float()

    def extra_repr(self) -> str:
        return f"method={self.config.method}, bits={self.bits}, group={self.group}, r={self.r}"


# -- L4Q -------------------------------------------------------------------------------------------
@register
@dataclass
class L4Q(QATOptions):
    """L4Q: ``s · clamp(round((W0 + c·B A)/s))`` with LSQ-learned step sizes ``s``; trains A, B, s."""

    method = "l4q"
    paper = "Jeon et al. 2024 (arXiv:2402.04902)"
    formula = "s·clamp(round((W + s_r·B A)/s)) x, STE, LSQ step s; A, B, s"

    def build(self, base: nn.Module, module_name: str) -> L4QLayer:
        return L4QLayer(self, base, module_name)


class L4QLayer(QATLayer):
    """``u = (W0 + c·B A) / s``: the step size enters the rounded value, so ``s`` gets LSQ's gradient."""

    divides_by_scale = True

    def frozen(self, base: nn.Module) -> torch.Tensor:
        return self.matrix(base)

    def integer_domain(self, frozen: torch.Tensor, low_rank: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (grouped(frozen.to(low_rank.dtype), self.group) + low_rank) / scale.unsqueeze(-1)


# -- LR-QAT ----------------------------------------------------------------------------------------
@register
@dataclass
class LRQAT(QATOptions):
    """LR-QAT: ``s · clamp(round(Φ0 + c·B A))`` with ``Φ0 = φ(W0/s0)`` stored low-bit; trains A, B, s.

    ``phi_format``: ``"fixed"`` (int8 fixed point with ``8 − bits`` fraction bits), ``"int"``
    (integers ``round(W0/s0)`` in int8) or ``"bf16"``.
    """

    method = "lrqat"
    paper = "Bondarenko et al. 2024 (arXiv:2406.06385)"
    formula = "s·clamp(round(Φ0 + s_r·B A)) x, Φ0 = W/s0 in int8 fixed point, STE; A, B, s"

    phi_format: str = "fixed"

    def validate(self) -> None:
        super().validate()
        one_of(type(self).__name__, "phi_format", self.phi_format, PHI_FORMATS)

    def build(self, base: nn.Module, module_name: str) -> LRQATLayer:
        return LRQATLayer(self, base, module_name)


def phi_frac_bits(bits: int, phi_format: str) -> int:
    """Fraction bits of the int8 form of ``Φ0``: ``8 − bits`` for fixed point, 0 for integers."""
    return 8 - bits if phi_format == "fixed" else 0


class LRQATLayer(QATLayer):
    """``u = Φ0 + c·B A`` in grid units; ``Φ0`` is a frozen low-bit buffer ``phi0`` (int8 codes, or the
    int16 bit pattern of bf16 values), not saved: it is recomputed exactly from the base weight
    when the adapter is built or loaded."""

    def __init__(self, config: LRQAT, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base, module_name)
        self.phi_format = config.phi_format
        with torch.no_grad():
            u0 = grouped(self.matrix(base).detach().float(), self.group) / self.scale.detach().unsqueeze(-1)
            if config.phi_format == "bf16":  # kept as its int16 bit pattern, so .to(dtype) leaves it bf16
                phi = u0.to(torch.bfloat16).view(torch.int16)
            else:
                f = phi_frac_bits(config.bits, config.phi_format)
                lo, hi = (-128, 127) if f else (self.qmin, self.qmax)
                phi = torch.clamp(torch.round(u0 * 2 ** f), lo, hi).to(torch.int8)
        self.frac_bits = 0 if config.phi_format == "bf16" else phi_frac_bits(config.bits, config.phi_format)
        self.register_buffer("phi0", phi, persistent=False)

    divides_by_scale = False

    def frozen(self, base: nn.Module) -> torch.Tensor:
        return self.phi0

    def phi(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        """``Φ0`` as float32 ``(out, G, g)`` (the int8 codes divided by ``2^frac_bits``, or the bf16 bits)."""
        codes = self.phi0 if codes is None else codes
        if self.phi_format == "bf16":
            return codes.view(torch.bfloat16).float()
        p = codes.float()
        return p / 2 ** self.frac_bits if self.frac_bits else p

    def integer_domain(self, frozen: torch.Tensor, low_rank: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.phi(frozen).to(low_rank.dtype) + low_rank


def qat_param_groups(model: nn.Module, lr: float, scale_lr: float | None = None,
                     name: str | None = None) -> list[dict[str, Any]]:
    """Optimizer groups for L4Q / LR-QAT: the step sizes ``scale`` at ``scale_lr`` (default: the adapter
    config's ``scale_lr`` when set, else ``lr / 100``), every other trainable adapter parameter at ``lr``.
    One group of step sizes per distinct rate, after the group of the other parameters.

    Adam-type optimizers move each parameter by about ``lr`` per step whatever its gradient's size;
    step sizes are of the order of ``max|W| / qmax`` (about 0.01 for SmolLM2 at 4 bits), so sharing
    LoRA's learning rate changes them by a large fraction at every step. ``benchmarks/qat_lora.py``
    measured LR-QAT at 2.98 (shared lr 1e-3) vs 2.71 (step sizes at 1e-5) held-out loss after 10 steps.
    """
    from ..core.api import adapter_parameters
    from ..core.model import iter_sites

    if not lr > 0 or (scale_lr is not None and not scale_lr > 0):
        raise ConfigError(f"qat_param_groups: learning rates must be positive, got lr={lr}, scale_lr={scale_lr}")
    params = [p for p in adapter_parameters(model, name).values() if p.requires_grad]
    trainable = {id(p) for p in params}
    by_rate: dict[float, list[nn.Parameter]] = {}
    for _path, site in iter_sites(model):
        for adapter, mod in site.adapters.items():
            if (name is None or adapter == name) and isinstance(mod, QATLayer) and id(mod.scale) in trainable:
                rate = scale_lr if scale_lr is not None else mod.config.scale_lr
                by_rate.setdefault(lr / 100 if rate is None else float(rate), []).append(mod.scale)
    if not by_rate:
        raise ConfigError("qat_param_groups: no trainable L4Q/LR-QAT step sizes in the model "
                          f"{'for adapter ' + repr(name) if name else ''}; attach peftkit.L4Q or peftkit.LRQAT first")
    taken = {id(p) for ps in by_rate.values() for p in ps}
    rest = [p for p in params if id(p) not in taken]
    return [{"params": rest, "lr": lr}] + [{"params": ps, "lr": rate} for rate, ps in by_rate.items()]
