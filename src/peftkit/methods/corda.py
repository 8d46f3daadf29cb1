"""CorDA: context-oriented decomposition adaptation (Yang et al., NeurIPS 2024, arXiv:2406.05223).

A LoRA whose starting factors come from the weight *and* the data the layer sees. With the input
covariance ``C = XᵀX`` of a few calibration batches (:func:`corda_calibrate`) and its damped form
``C' = C + d·mean(diag C)·I`` (``d`` from ``damping``, doubled until ``C'`` inverts cleanly):

    SVD(W₀ C') = U Σ V̂ᵀ,      W₀ = U Σ (V̂ᵀ C'⁻¹)

and the adapter takes ``r`` of these triplets — the largest (``mode="ipm"``, instruction-previewed:
fastest fitting of the task the data shows) or the smallest (``mode="kpm"``, knowledge-preserving:
the directions that matter least to the data, e.g. QA samples, are the ones retrained):

    A = √(Σ_r/s) (V̂ᵀC'⁻¹)_r,   B = U_r √(Σ_r/s),   W_res = W₀ − s·B A   frozen
    y = W_res x + b + s·B A x                      (s = alpha / r, or alpha / √r with use_rslora)

so the model is unchanged at step 0; A and B train as in LoRA. With ``C = I`` the decomposition
is the plain SVD: IPA is PiSSA and KPA is MiLoRA (minor components).

This is peft's ``init_lora_weights="corda"`` (``preprocess_corda`` + ``CordaConfig``): the same
calibration statistics (each forward call's inputs ``X`` scaled by ``1/|max X|``, ``XᵀX`` averaged
over the calls), the same damping rule and the same factors. Unlike peft, the covariances are an
explicit value rather than attributes left on the model's layers::

    cov = peftkit.corda_calibrate(model, batches, target_modules=["q_proj", "v_proj"])
    peftkit.attach(model, peftkit.CorDA(r=8, alpha=16, mode="kpm", covariances=cov,
                                        target_modules=["q_proj", "v_proj"]))

Files: the covariances are not saved; the starting factors (``init_A``, ``init_B``) are, since
they cannot be recomputed without the data. The Hugging Face form is a plain LoRA of rank ``2r``
relative to the original base (``[B, −B₀][A; A₀]``, as peft writes CorDA with
``path_initial_model_for_weight_conversion``), which peft and peftkit load as LoRA.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.config import LowRankOptions, finite_number, one_of, positive_int, probability
from ..core.errors import ConfigError, did_you_mean
from ..core.layers import HF_CONV1D, LINEAR, is_quantized, layer_info
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from ..formats.codec import HFCodec
from .lora import HF_OPTIONS, HF_READ_NAMES, LoRA, LoRALayer, _hf_write_names, lora_export, lora_options_to_hf
from .svd_init import covariance_triplets

MODES = ("ipm", "kpm")


@register
@dataclass
class CorDA(LowRankOptions):
    """LoRA started from the covariance-weighted SVD of each weight (``mode``: ``"ipm"`` largest, ``"kpm"`` smallest).

    ``covariances``: ``{module name: C (in×in)}`` from :func:`corda_calibrate` (not saved: a loaded
    adapter takes its starting factors from the file). ``damping``: the first damping factor of ``C``.
    ``calibration_samples``: how many examples :meth:`calibrate` (and ``peftkit train``) runs.
    """

    method = "corda"
    family = "low-rank"
    paper = "Yang et al. 2024 (arXiv:2406.05223)"
    formula = "W_res x + s·B A x, BA from SVD(W C); A, B"
    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ATTENTION_QV

    dropout: float = 0.0
    mode: str = "ipm"
    damping: float = 0.01
    calibration_samples: int = 32
    covariances: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        #: True for a config read from a saved file: its factors come from that file, so no covariances are needed
        self._factors_from_file = False

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        probability(owner, "dropout", self.dropout)
        one_of(owner, "mode", self.mode, MODES)
        finite_number(owner, "damping", self.damping)
        if self.damping <= 0:
            raise ConfigError(f"{owner}: damping must be > 0, got {self.damping!r}")
        positive_int(owner, "calibration_samples", self.calibration_samples)
        if self.covariances is not None and not isinstance(self.covariances, dict):
            raise ConfigError(f"{owner}: covariances must be a dict {{module name: tensor}}, "
                              f"got {type(self.covariances).__name__}")

    def check_model(self, model: nn.Module, module_names: list[str]) -> str | None:
        if self.covariances is None and not self._factors_from_file:
            return ("covariances are needed; compute them with peftkit.corda_calibrate(model, batches, "
                    "target_modules=...) and pass CorDA(covariances=...), or use config.calibrate(model, batches)")
        return None

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> CorDA:
        """A copy with the covariances of this config's targets over the first ``calibration_samples`` of ``batches``
        (how ``peftkit train --method corda`` calibrates on the training data, one example per batch)."""
        from ..core.api import module_targets

        names = module_targets(model, self)
        cov = corda_calibrate(model, itertools.islice(batches, self.calibration_samples), target_modules=names)
        out = dataclasses.replace(self, covariances=cov)
        return out

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        if is_quantized(base.weight):
            return "corda rewrites the base weight, which is quantized here; dequantize the layer first"
        info = layer_info(base)
        limit = min(info.in_features, info.out_features)
        r = self.rank_for(module_name)
        if r > limit:
            return f"rank {r} is larger than the layer allows ({limit} = min(out, in) of its {tuple(base.weight.shape)} weight)"
        if self.covariances is not None:
            c = self.covariances.get(module_name)
            if c is None:
                return (f"no covariance for this module{did_you_mean(module_name, self.covariances)}; "
                        f"calibrate with the same target_modules (covariances has {len(self.covariances)} modules)")
            if not isinstance(c, torch.Tensor) or tuple(c.shape) != (info.in_features, info.in_features):
                shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                return f"its covariance is {shape} but the layer needs ({info.in_features}, {info.in_features})"
        return None

    def build(self, base: nn.Module, module_name: str) -> CorDALayer:
        return CorDALayer(self, base, module_name)

    # -- serialisation: the covariances stay out of the file ---------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("covariances", None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorDA:
        cfg = super().from_dict(data)
        assert isinstance(cfg, CorDA)
        cfg._factors_from_file = True
        return cfg

    def as_lora(self) -> LoRA:
        """The LoRA config with the same rank, scale and dropout (the factors' shapes and scale are LoRA's)."""
        return LoRA(r=self.r, alpha=self.alpha, use_rslora=self.use_rslora, rank_pattern=dict(self.rank_pattern),
                    alpha_pattern=dict(self.alpha_pattern), dropout=self.dropout, init="pissa",
                    target_modules=self.target_modules, exclude_modules=self.exclude_modules)


class CorDALayer(LoRALayer):
    """A LoRA layer whose factors start at CorDA's triplets; ``init_A``/``init_B`` (saved) hold them for the residual."""

    def __init__(self, config: CorDA, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base, module_name)  # type: ignore[arg-type]
        if config.covariances is not None:
            c = config.covariances[module_name].to(base.weight.device)
            which = "top" if config.mode == "ipm" else "bottom"
            self.set_svd_factors(*covariance_triplets(self.matrix(base), c, self.r, which, config.damping))
        else:  # a loaded adapter: the file gives the factors (filled before on_attach computes the residual)
            self.register_buffer("init_A", torch.zeros_like(self.lora_A))
            self.register_buffer("init_B", torch.zeros_like(self.lora_B))
        self.optional_state = ()  # the starting factors cannot be recomputed without the data

    @torch.no_grad()
    def _init(self, config: Any, base: nn.Module, module_name: str = "") -> None:
        """No LoRA initialisation: the factors are set from the covariance SVD (or a file) right after."""
        nn.init.zeros_(self.lora_A)


@torch.no_grad()
def corda_calibrate(model: nn.Module, batches: Iterable[Any], target_modules: Any = "all-linear",
                    exclude_modules: Any = None,
                    forward: Callable[[nn.Module, Any], Any] | None = None) -> dict[str, torch.Tensor]:
    """The input covariance of each targeted linear layer over ``batches``: ``{module name: C (in×in, float32)}``.

    Each forward call of a layer adds ``XᵀX`` with ``X`` its input flattened to ``(tokens, in)`` and
    scaled by ``1/|max X|``; the sum is divided by the number of calls (peft's ``preprocess_corda``
    statistics; peft requires batches of one sequence, here any batch size is flattened). A batch is
    passed as ``model(**batch)`` when it is a dict, else ``model(batch)``; ``forward(model, batch)``
    overrides that. The model runs in eval mode without gradients; its mode is restored after.
    """
    from ..core.targeting import display_name, resolve_targets

    names = resolve_targets(model, target_modules, exclude_modules)
    modules: dict[str, nn.Module] = {}
    for n in names:
        m = model.get_submodule(n)
        if layer_info(m).kind not in (LINEAR, HF_CONV1D):
            raise ConfigError(f"corda_calibrate: {display_name(n)} is a {type(m).__name__}; "
                              "CorDA adapts linear layers (nn.Linear, transformers Conv1D)")
        modules[display_name(n)] = m
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0)

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            x = x / torch.max(x).abs()
            if not bool(torch.isfinite(x).all()):
                raise ConfigError(f"corda_calibrate: {name} received a non-finite (or all-zero) input")
            cov = x.t() @ x
            sums[name] = sums[name] + cov if name in sums else cov
            counts[name] += 1
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            elif isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unseen = [n for n, k in counts.items() if k == 0]
    if unseen:
        raise ConfigError(f"corda_calibrate: no calibration input reached {', '.join(unseen[:5])}"
                          f"{' ...' if len(unseen) > 5 else ''}; pass at least one batch that runs through them")
    return {n: sums[n] / counts[n] for n in modules}


CorDA.hf_codec = HFCodec(
    peft_type="LORA",
    accepts=lambda d: False,  # peft's files are LoRA files (relative to the original base): LoRA reads them
    config_to_hf=lambda c, targets: lora_options_to_hf(c.as_lora()),
    config_from_hf=lambda d: None,
    read_names=HF_READ_NAMES,
    write_names=_hf_write_names,
    options=HF_OPTIONS,
    export=lora_export,
)
