"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

For a frozen layer ``y = W x + b`` (``W ∈ R^{out×in}``, the matrix view of
:mod:`peftkit.core.layers`) DoRA splits the adapted weight into a magnitude and a direction:

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖,        ‖V‖_i = ‖V_{i,:}‖₂  (one norm per output feature)

and trains the magnitude vector ``m ∈ R^{out}`` (peft's ``lora_magnitude_vector``, initialised
to ``‖W‖`` so the model is unchanged at step 0) together with LoRA's ``A ∈ R^{r×in}`` and
``B ∈ R^{out×r}`` (``s = alpha/r``, rsLoRA ``alpha/√r``). ``W`` and ``b`` are frozen. As in the
paper (§4.3) and peft, the norm is treated as a constant in backpropagation (detached).

Forward (peft 0.21.2, ``DoraLinearLayer.forward``), with ``g = m / ‖W + s·B A‖``:

    y' = base(x) + (g − 1) ⊙ (base(x) − b) + g ⊙ s·B A dropout(x)

which equals ``W' x + b`` without dropout. With dropout active in training peft replaces
``base(x) − b`` by ``W dropout(x)`` (one more product with ``W``); peftkit does the same.

The norms never form the dense ``B A``: per output row ``i``

    ‖W_i + s(BA)_i‖² = ‖W_i‖² + s Σ_k B_ik (2 (W Aᵀ)_ik + s (B (A Aᵀ))_ik)

costs one ``(out×in)·(in×r)`` product (the cost of a LoRA forward on ``out`` tokens) and
``‖W‖²`` is cached. The cache is keyed on the base weight's storage, version counter, dtype and
device and on the site's merged/attached adapters, so merging another adapter into the layer,
moving the model (``.to``) or editing the weight in place recomputes it.

Merging writes ``W ← g ⊙ (W + s·B A)`` row by row; the norm used is kept (a non-persistent
buffer) so that unmerging restores ``W = W'/g − s·B A`` (up to rounding; a row whose ``m`` is 0
cannot be restored, as in peft). DoRA is applied to ``nn.Linear`` and
transformers ``Conv1D`` layers; convolutions and embeddings are refused (use LoRA there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import HF_CONV1D, LINEAR, is_quantized, layer_kind
from ..core.registry import register
from ..formats.codec import HFCodec
from .lora import HF_OPTIONS, LoRA, LoRALayer, lora_export, lora_options_from_hf, lora_options_to_hf

MAGNITUDE = "lora_magnitude_vector"


@register
@dataclass
class DoRA(LoRA):
    """Weight-decomposed LoRA ``m ⊙ (W + s·B A) / ‖W + s·B A‖``: LoRA's options, plus a trained magnitude per output.

    ``r``, ``alpha``, ``dropout``, ``use_rslora``, ``init``, ``rank_pattern``, ``alpha_pattern`` and
    ``target_modules`` mean what they mean for :class:`~peftkit.methods.lora.LoRA`.
    """

    method = "dora"
    family = "low-rank"
    paper = "Liu et al. 2024 (arXiv:2402.09353)"
    formula = "m ⊙ (W + s·B A) / ‖W + s·B A‖ x, norm per output row; A, B, m"
    supported_layers = (LINEAR, HF_CONV1D)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        if layer_kind(base) not in self.supported_layers:
            return (f"dora supports only nn.Linear and transformers Conv1D layers, not {type(base).__name__} "
                    "(use LoRA for convolutions and embeddings)")
        return super().check_layer(base, module_name)

    def build(self, base: nn.Module, module_name: str) -> DoRALayer:
        return DoRALayer(self, base, module_name)


class DoRALayer(LoRALayer):
    """LoRA's ``lora_A``, ``lora_B`` plus ``lora_magnitude_vector`` ``(out,)``; see the module docstring for the math."""

    #: LoRA's batched mixed-batch product does not apply: the site calls adapt_output per group of rows
    gathered_output = None

    def fused_forward(self, x: torch.Tensor, site: Any) -> torch.Tensor | None:
        return None  # the magnitude rescaling needs the base output on its own

    def __init__(self, config: DoRA, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base, module_name)
        with torch.no_grad():
            # ‖W + s·B A‖ of the layer as it will run: B = 0 (default, gaussian) or, for PiSSA/MiLoRA,
            # W_res + s·B₀A₀ = W (the residual is written in on_attach) — either way ‖W‖.
            w = self.matrix(base).detach().to(self.lora_A.dtype)
            self.lora_magnitude_vector = nn.Parameter(torch.linalg.vector_norm(w, dim=1))
        self.register_buffer("_w_sq", None, persistent=False)  # cached ‖W_i‖², see _base_sq_norm
        self.register_buffer("_merge_norm", None, persistent=False)  # ‖W + s·B A‖ used by merge_into
        self._w_key: tuple | None = None

    # -- the norm ------------------------------------------------------------------------
    def _base_sq_norm(self, base: nn.Module, wf: torch.Tensor, site: Any) -> torch.Tensor:
        """``‖W_i‖²`` per row, cached while the base weight and the site's adapters stay the same."""
        if site is None or torch.compiler.is_compiling():
            return wf.pow(2).sum(1)
        w = base.weight
        a = self.lora_A
        ptr = id(w) if is_quantized(w) else w.data_ptr()  # a quantized wrapper tensor has no storage of its own
        key = (ptr, w._version, w.dtype, w.device, a.dtype, a.device, tuple(site.merged), tuple(site.adapters))
        if self._w_sq is None or key != self._w_key:
            self._w_sq = wf.pow(2).sum(1)
            self._w_key = key
        return self._w_sq

    def invalidate_cache(self) -> None:
        """Forget the cached ``‖W‖²`` (call after changing the base weight through ``.data``)."""
        self._w_sq = None
        self._w_key = None

    @torch.no_grad()
    def _norm_sq(self, base: nn.Module, site: Any) -> torch.Tensor:
        """``‖W + s·B A‖²`` per output row, without forming ``B A`` (detached, adapter dtype, clamped at 0)."""
        A, B, s = self.lora_A, self.lora_B, self.scaling
        w = self.matrix(base)
        wf = w if w.dtype == A.dtype else w.to(A.dtype)
        w_sq = self._base_sq_norm(base, wf, site)
        p = torch.addmm(torch.mm(wf, A.t()), B, torch.mm(A, A.t()), beta=2.0, alpha=s)  # 2 W Aᵀ + s B A Aᵀ
        sq = torch.add(w_sq, torch.linalg.vecdot(B, p), alpha=s)
        return sq.clamp_min_(0.0)  # cancellation can leave tiny negatives

    def weight_norm(self, base: nn.Module, site: Any = None) -> torch.Tensor:
        """``‖W + s·B A‖`` per output row (detached); ``site`` enables the cached ``‖W‖²``."""
        return self._norm_sq(base, site).sqrt_()

    def dense_weight_norm(self, base: nn.Module) -> torch.Tensor:
        """The same norm from the dense ``W + s·B A`` (reference for tests; peft's formula)."""
        with torch.no_grad():
            w = self.matrix(base).to(self.lora_A.dtype)
            return torch.linalg.vector_norm(w + self.delta_matrix(), dim=1)

    # -- forward ---------------------------------------------------------------------------
    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        A, B = self.lora_A, self.lora_B
        base = site.base
        g = self.lora_magnitude_vector * self._norm_sq(base, site).rsqrt_()  # m / ‖W + sBA‖, gradient to m only
        n_out = B.shape[0]
        xa = x.reshape(-1, x.shape[-1])
        if xa.dtype != A.dtype:
            xa = xa.to(A.dtype)
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        if dropped:  # peft: the whole change (g − 1) W + g s B A sees the dropped-out input
            xa = self.dropout(xa)
            part, bias = F.linear(xa, self.matrix(base).to(A.dtype)), None
        else:
            part, bias = base_out.reshape(-1, n_out), base.bias
        h = F.linear(xa, A)
        bg = B * (g * self.scaling).unsqueeze(1)  # g ⊙ s·B, so the low-rank term is one fused addmm
        # out = y + (g − 1) ⊙ (part − b) + h (g s B)ᵀ, with as few passes over (tokens × out) as possible
        if y is base_out and not dropped:
            out = torch.mul(part, g)  # y + (g − 1) y = g y
        else:
            out = torch.mul(part, g - 1.0).add_(y.reshape(-1, n_out))
        if bias is not None:
            out = out.add_((1.0 - g) * bias.to(g.dtype))
        out = out.addmm_(h, bg.t())
        out = out.view(*y.shape[:-1], n_out)
        return out if out.dtype == y.dtype else out.to(y.dtype)

    # -- merging ---------------------------------------------------------------------------
    def _merged_matrix(self, base: nn.Module, norm: torch.Tensor) -> torch.Tensor:
        w = self.matrix(base).to(self.lora_A.dtype)
        g = (self.lora_magnitude_vector / norm).unsqueeze(1)
        return g * (w + self.delta_matrix())

    @torch.no_grad()
    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``W' − W`` for the base weight as it is now."""
        w = self.matrix(base).to(self.lora_A.dtype)
        return self.unmatrix(base, self._merged_matrix(base, self.weight_norm(base)) - w)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        norm = self.weight_norm(base)
        if is_quantized(base.weight):  # re-quantize W'; unmerge restores the saved quantized weight
            from ..core.requant import merge_dense

            merge_dense(self, base, self.unmatrix(base, self._merged_matrix(base, norm)).to(base.weight.dtype))
            self.invalidate_cache()
            return
        w = base.weight
        w.data.copy_(self.unmatrix(base, self._merged_matrix(base, norm)).to(w.dtype))
        self._merge_norm = norm
        self.invalidate_cache()

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        from ..core.requant import unmerge

        if unmerge(self, base):
            self.invalidate_cache()
            return
        if self._merge_norm is None:
            raise RuntimeError("unmerge_from called on a DoRA adapter that is not merged")
        w = base.weight
        g = (self.lora_magnitude_vector / self._merge_norm).unsqueeze(1)
        original = self.matrix(base).to(self.lora_A.dtype) / g - self.delta_matrix()
        w.data.copy_(self.unmatrix(base, original).to(w.dtype))
        self._merge_norm = None
        self.invalidate_cache()

    @torch.no_grad()
    def on_attach(self, model: nn.Module, site: Any) -> None:
        super().on_attach(model, site)
        self.invalidate_cache()

    @torch.no_grad()
    def restore_base(self, base: nn.Module) -> None:
        super().restore_base(base)
        self.invalidate_cache()

    def _apply(self, fn: Any, recurse: bool = True) -> DoRALayer:  # .to()/.cuda()/.half(): drop the cached ‖W‖²
        self.invalidate_cache()
        return super()._apply(fn, recurse)


# -- Hugging Face PEFT format: peft_type "LORA" with use_dora=True ---------------------------------
def _dora_export(state: dict[str, torch.Tensor], layer: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = lora_export(state, layer)  # PiSSA/MiLoRA: factors relative to the original W, whose DoRA norm is the same
    out[MAGNITUDE] = state[MAGNITUDE]
    return out


def _config_to_hf(config: AdapterConfig, targets: list[str]) -> dict[str, Any]:
    out = lora_options_to_hf(config)  # type: ignore[arg-type]
    out["use_dora"] = True
    return out


def _config_from_hf(d: dict[str, Any]) -> DoRA:
    return DoRA(**lora_options_from_hf(d, "DoRA"))


DoRA.hf_codec = HFCodec(
    peft_type="LORA",
    accepts=lambda d: bool(d.get("use_dora")),
    config_to_hf=_config_to_hf,
    config_from_hf=_config_from_hf,
    # older peft files name the magnitude "<...>.lora_magnitude_vector.weight"
    read_names={"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", MAGNITUDE: MAGNITUDE, f"{MAGNITUDE}.weight": MAGNITUDE},
    write_names={"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", MAGNITUDE: MAGNITUDE},
    options=HF_OPTIONS,
    export=_dora_export,
)
