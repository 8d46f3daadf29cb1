"""RoSA: robust adaptation, a low-rank plus a sparse delta (Nikdan et al. 2024, arXiv:2401.04679).

On a frozen weight ``W0`` the adapter trains a LoRA part and a sparse part side by side::

    W' = W0 + s·B A + S,      S = scatter_I(values),   |I| = k = max(1, round(density · numel(W0)))

so ``y = f(x; W0 + S) + s·B A x``. Trained: ``A``, ``B`` (LoRA's initialisation: ``B = 0``) and
``values`` (initialised to 0), so the model is the base model at step 0. Frozen: ``W0``. The
trainable budget per layer is ``r·(in + out) + k``. Merging is exact: ``W0 ← W0 + s·B A + S``.

The support ``I`` (``support``):

* ``"gradient"`` (the paper's protocol) — chosen from the gradients of the dense weight
  accumulated over a warm-up: for optimizer steps ``0 .. mask_warmup_steps − 1`` the training hooks
  accumulate ``Σ (∂loss/∂W)²`` (``grad_score="square"``, the empirical Fisher) or ``Σ |∂loss/∂W|``
  (``"abs"``) while only the LoRA part trains (the sparse values get no update); after step
  ``mask_warmup_steps − 1`` the support is fixed to the ``k`` largest scores and stays fixed. Until then
  ``indices`` hold a seeded random placeholder whose values stay 0 (they do not change the
  model). The accumulator is one dense float32 tensor per targeted weight during the warm-up
  only. The schedule needs the training hooks (``peftkit.train``, the Trainer callback, or
  ``peftkit.before_step / after_backward / after_step`` in your own loop);
* ``"scores"`` — the ``k`` largest of supplied scores (``scores={module name: tensor}``, e.g.
  from :func:`peftkit.methods.sparse.fish_scores`), fixed from the start;
* ``"magnitude"`` / ``"random"`` — the largest ``|W0|`` / seeded uniform, fixed from the start.

``support_fixed`` (a saved 0/1 buffer) records whether the warm-up has chosen the support, so a
loaded adapter keeps its support. RoSA has no Hugging Face PEFT form (its reference code is a
peft fork).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import one_of, positive_int
from ..core.errors import ConfigError
from ..core.layers import HF_CONV1D, LINEAR
from ..core.registry import register
from ..core.targets import ALL_LINEAR
from .lora import LoRA, LoRALayer
from .sparse_delta import SparseDeltaMixin, count_for, select_support

SUPPORTS = ("gradient", "scores", "magnitude", "random")
GRAD_SCORES = ("square", "abs")


@register
@dataclass
class RoSA(LoRA):
    """LoRA plus a sparse delta at ``density`` whose support comes from warm-up gradients (or scores).

    ``scores`` (for ``support="scores"``): ``{module name: tensor shaped like its weight}``; not saved.
    """

    method = "rosa"
    family = "sparse"
    paper = "Nikdan et al. 2024, RoSA (arXiv:2401.04679)"
    formula = "W0 + s·B A + scatter(values at I), I from warm-up |grad|; A, B, values"
    supported_layers = (LINEAR, HF_CONV1D)
    default_targets = ALL_LINEAR
    supports_quantized_base = False
    hf_codec = None

    density: float = 0.01
    support: str = "gradient"
    mask_warmup_steps: int = 16
    grad_score: str = "square"
    seed: int = 0
    scores: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._indices_from_file = False

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        d = self.density
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0.0 < d <= 1.0:
            raise ConfigError(f"{owner}: density must be in (0, 1], got {d!r}")
        one_of(owner, "support", self.support, SUPPORTS)
        one_of(owner, "grad_score", self.grad_score, GRAD_SCORES)
        positive_int(owner, "mask_warmup_steps", self.mask_warmup_steps)
        if self.init not in ("default", "gaussian"):
            raise ConfigError(f"{owner}: init={self.init!r} is not supported with a sparse part; use 'default' or 'gaussian'")
        if self.support == "scores" and self.scores is None and not self._indices_from_file:
            raise ConfigError(f"{owner}: support='scores' needs scores={{module name: tensor}} "
                              "(e.g. peftkit.methods.sparse.fish_scores(model, batches)); or use support='gradient'")
        if self.scores is not None and not isinstance(self.scores, dict):
            raise ConfigError(f"{owner}: scores must be a dict {{module name: tensor}}, got {type(self.scores).__name__}")

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason or self.support != "scores" or self.scores is None:
            return reason
        s = self.scores.get(module_name)
        if s is None:
            return f"no score for this module (scores has {len(self.scores)} modules: use the same target_modules)"
        if s.numel() != base.weight.numel():
            return f"its scores have {s.numel()} entries but the weight has {base.weight.numel()}"
        return None

    def build(self, base: nn.Module, module_name: str) -> RoSALayer:
        return RoSALayer(self, base, module_name)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("scores", None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoSA:
        cfg = super().from_dict(data)
        assert isinstance(cfg, RoSA)
        cfg._indices_from_file = True
        return cfg

    # -- training hooks (support="gradient") --------------------------------------------------
    def _pending(self, modules: dict[str, AdapterModule]) -> list[RoSALayer]:
        return [m for m in modules.values() if isinstance(m, RoSALayer) and not m.is_fixed()]

    def before_step(self, modules: dict[str, AdapterModule], info: Any) -> None:
        for m in self._pending(modules):
            m.capture_gradients(self.grad_score if info.step < self.mask_warmup_steps else None)

    def after_backward(self, modules: dict[str, AdapterModule], info: Any) -> None:
        for m in self._pending(modules):  # the sparse values wait for their support
            m.values.grad = None

    def after_step(self, modules: dict[str, AdapterModule], info: Any) -> None:
        if info.step < self.mask_warmup_steps - 1:
            return
        for m in self._pending(modules):
            m.fix_support(info.optimizer)


class RoSALayer(SparseDeltaMixin, LoRALayer):
    """LoRA's ``lora_A``, ``lora_B`` (output path) plus the sparse ``indices`` / ``values`` (weight override)."""

    overrides_params = True
    adapts_output = True

    def __init__(self, config: RoSA, base: nn.Module, module_name: str) -> None:
        LoRALayer.__init__(self, config, base, module_name)
        w = base.weight
        k = count_for(config.density, w.numel())
        fixed = config.support != "gradient"
        if config.support == "scores" and config.scores is None:  # read from a file: the file has the indices
            idx = select_support("random", k, w, module_name, config.seed)
        elif fixed:
            scores = config.scores[module_name] if config.support == "scores" and config.scores else None
            idx = select_support(config.support, k, w, module_name, config.seed, scores)
        else:
            idx = select_support("random", k, w, module_name, config.seed)  # a placeholder until the warm-up ends
        self.init_sparse(base, module_name, idx)
        self.register_buffer("support_fixed", torch.tensor(1 if fixed else 0, dtype=torch.uint8, device=w.device))

    def is_fixed(self) -> bool:
        return bool(self.support_fixed)

    @torch.no_grad()
    def fix_support(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Choose the support from the accumulated gradient score (the ``k`` largest) and stop capturing.

        The values are 0 (they did not train during the warm-up), so the model does not change.
        Without any accumulated gradient the seeded random placeholder becomes the support (a warning).
        """
        score = self.take_score()
        self.capture_gradients(None)
        if score is None:  # no gradient reached this layer in the warm-up (unused layer, resumed run)
            warnings.warn(f"RoSA: no gradient reached {self.module_name} during the warm-up; its sparse support "
                          "stays the seeded random one", stacklevel=2)
            self.support_fixed.fill_(1)
            return
        k = self.indices.numel()
        idx = torch.topk(score, k, sorted=False).indices.to(self.indices.device)
        self.set_support(idx, torch.zeros(k, device=self.values.device), torch.full((k,), -1, dtype=torch.long), optimizer)
        self.support_fixed.fill_(1)

    def fused_forward(self, x: torch.Tensor, site: Any) -> torch.Tensor | None:
        """Base + sparse part as one node (:class:`~peftkit.methods.sparse_delta.SparseDeltaLinear`), then the
        LoRA path on the output; None (the general path) where that node does not apply."""
        y = SparseDeltaMixin.fused_forward(self, x, site)
        return None if y is None else self.adapt_output(x, y, y, site)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return LoRALayer.delta_weight(self, base) + self.sparse_delta(base)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        AdapterModule.merge_into(self, base)

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        AdapterModule.unmerge_from(self, base)

    def extra_repr(self) -> str:
        state = "fixed" if self.is_fixed() else "warm-up"
        return f"method=rosa, r={self.r}, entries={self.indices.numel()}/{self.numel} ({state})"
