"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024, arXiv:2310.11454).

One pair of frozen random matrices is shared by every adapted layer of the adapter:
``A ∈ R^{r×in_max}`` and ``B ∈ R^{out_max×r}``, sized by the largest input and output of the
targeted layers and drawn from one ``torch.Generator`` seeded with ``projection_prng_key``
(Kaiming-uniform, ``bound = √(6/fan_in)``, ``A`` first; peft 0.21.2's ``_kaiming_init``, so the
bases are bit-identical to peft's). A layer with ``W ∈ R^{out×in}`` uses the slices
``A_ℓ = A[:, :in]``, ``B_ℓ = B[:out, :]`` and trains two vectors, ``d ∈ R^r`` (init
``d_initial``) and ``b ∈ R^{out}`` (init 0):

    y = W x + bias + diag(b) B_ℓ diag(d) A_ℓ dropout(x),      ΔW = diag(b) B_ℓ diag(d) A_ℓ

so the model is unchanged at step 0 and a layer trains ``r + out`` numbers. ``W``, ``A``, ``B``
are frozen. The forward folds the vectors into the (small) slices, ``(b ⊙ B_ℓ)((d ⊙ A_ℓ) x)``,
which costs what a rank-``r`` LoRA costs.

``A`` and ``B`` are the adapter's shared state (saved once; the peft form stores them as
``base_model.vera_A`` / ``base_model.vera_B`` when ``save_projection``, else they are
regenerated from the seed). A rank larger than ``min(out, in)`` of a targeted layer is refused:
``ΔW``'s rank could not exceed that bound and the extra rows of ``A`` would only add noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, positive_int, probability
from ..core.errors import ConfigError
from ..core.layers import HF_CONV1D, LINEAR, LayerInfo, layer_info
from ..core.registry import register
from ..core.site import AdapterSite
from ..core.targets import ATTENTION_QV
from ..formats.codec import HFCodec


def kaiming_bases(r: int, in_max: int, out_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``: ``A ∈ R^{r×in_max}`` then ``B ∈ R^{out_max×r}`` from one CPU generator seeded with ``seed``.

    Each is ``U(−√(6/fan_in), √(6/fan_in))`` with ``fan_in`` its second dimension (peft's ``_kaiming_init``).
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    out = []
    for shape in ((r, in_max), (out_max, r)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=g))
    return out[0], out[1]


def target_infos(model: nn.Module, module_names: list[str]) -> list[LayerInfo]:
    """The layer facts of the named modules (the base layer where a module already holds adapters)."""
    out = []
    for n in module_names:
        m = model.get_submodule(n)
        out.append(layer_info(m.base if isinstance(m, AdapterSite) else m))
    return out


@register
@dataclass
class VeRA(AdapterConfig):
    """Shared frozen random ``A``, ``B`` (seed ``projection_prng_key``), trained per-layer vectors ``d``, ``b``.

    ``r``: rows of ``A`` (default 256, as peft). ``d_initial``: the starting value of ``d``.
    ``dropout``: on the adapter's input. ``save_projection``: write ``A``, ``B`` in the Hugging
    Face form (peftkit's own format always stores them once).
    """

    method = "vera"
    family = "low-rank"
    paper = "Kopiczko et al. 2024 (arXiv:2310.11454)"
    formula = "W x + b ⊙ B (d ⊙ A x), A, B frozen random shared; d, b"
    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ATTENTION_QV  # peft's VeRA mapping is LoRA's

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1

    def validate(self) -> None:
        owner = type(self).__name__
        positive_int(owner, "r", self.r)
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"{owner}: projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        probability(owner, "dropout", self.dropout)
        if not isinstance(self.d_initial, (int, float)) or isinstance(self.d_initial, bool):
            raise ConfigError(f"{owner}: d_initial must be a number, got {self.d_initial!r}")

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        info = layer_info(base)
        limit = min(info.in_features, info.out_features)
        if self.r > limit:
            return (f"VeRA rank r={self.r} is larger than the layer allows ({limit} = min(out, in) of "
                    f"{info.out_features}×{info.in_features}); use r <= {limit} or leave this layer out")
        return None

    def build_shared(self, model: nn.Module, module_names: list[str]) -> dict[str, torch.Tensor]:
        """The frozen ``vera_A``, ``vera_B`` sized by the largest targeted input / output."""
        infos = target_infos(model, module_names)
        in_max = max(i.in_features for i in infos)
        out_max = max(i.out_features for i in infos)
        a, b = kaiming_bases(self.r, in_max, out_max, self.projection_prng_key)
        return {"vera_A": a, "vera_B": b}

    def build(self, base: nn.Module, module_name: str) -> VeRALayer:
        return VeRALayer(self, base, module_name)


class VeRALayer(AdapterModule):
    """``vera_lambda_d`` ``(r,)`` and ``vera_lambda_b`` ``(out,)``; the bases come from ``self.shared``."""

    shared: nn.Module  # set by the engine: buffers vera_A (r×in_max), vera_B (out_max×r)
    #: a file may leave the bases out (peft's save_projection=False): they are regenerated from the seed
    optional_state = ("shared.vera_A", "shared.vera_B")

    def __init__(self, config: VeRA, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        info = layer_info(base)
        self.in_features, self.out_features = info.in_features, info.out_features
        self.r = config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(info.out_features))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d ⊙ A_ℓ, b ⊙ B_ℓ)``: ``r×in`` and ``out×r``, with autograd to ``d`` and ``b``."""
        d, b = self.vera_lambda_d, self.vera_lambda_b
        a = self.shared.vera_A[:, : self.in_features].to(d.dtype)
        bb = self.shared.vera_B[: self.out_features, :].to(b.dtype)
        return a * d.unsqueeze(1), bb * b.unsqueeze(1)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        # the vectors scale activations, never the bases: backward then needs no r×in / out×r weight gradient,
        # only the token-wise sums that give d and b their gradients
        d, b = self.vera_lambda_d, self.vera_lambda_b
        a = self.shared.vera_A[:, : self.in_features].to(d.dtype)
        bb = self.shared.vera_B[: self.out_features, :].to(b.dtype)
        x = self.dropout(x)
        if x.dtype != d.dtype:
            x = x.to(d.dtype)
        delta = F.linear(F.linear(x, a) * d, bb) * b
        return y + (delta if delta.dtype == y.dtype else delta.to(y.dtype))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        da, bb = self.factors()
        return self.unmatrix(base, bb @ da)


# -- Hugging Face PEFT format: peft_type "VERA" ------------------------------------------------------
def _vera_to_hf(config: VeRA) -> dict[str, Any]:
    return {
        "r": config.r,
        "projection_prng_key": config.projection_prng_key,
        "save_projection": config.save_projection,
        "vera_dropout": config.dropout,
        "d_initial": config.d_initial,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
    }


def _vera_from_hf(d: dict[str, Any]) -> VeRA:
    return VeRA(r=d.get("r", 256), projection_prng_key=d.get("projection_prng_key", 0),
                save_projection=d.get("save_projection", True), dropout=d.get("vera_dropout") or 0.0,
                d_initial=d.get("d_initial", 0.1), target_modules=d.get("target_modules"),
                exclude_modules=d.get("exclude_modules"))


VeRA.hf_codec = HFCodec(
    peft_type="VERA",
    config_to_hf=lambda c, targets: _vera_to_hf(c),
    config_from_hf=_vera_from_hf,
    read_names={"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"},
    # fan_in_fan_out only says the layer is a transformers Conv1D (peft sets it itself); init_weights: how
    # peft initialised the vectors, which the file overrides
    options=frozenset({"r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out",
                       "init_weights"}),
    shared_names={"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"},
    write_shared=lambda config: bool(config.save_projection),
)
