"""Sparse fine-tuning: train a fixed subset of each targeted weight's entries.

For a frozen weight ``W`` (any layout: linear, transformers ``Conv1D``, convolution, embedding)
a fixed set ``I`` of ``k = max(1, round(density · numel(W)))`` flat positions is chosen once,
and the adapter trains one delta per position::

    W' = W + scatter_I(values)           i.e.  W'.flat[i_j] = W.flat[i_j] + values[j],  other entries = W

The layer then runs its own operation with ``W'`` (bias and everything else unchanged). Only
``values`` (initialised to 0, so the model is unchanged at step 0) is trained; ``W`` is frozen
and never modified in forward. The adapter keeps exactly two tensors, both saved: ``indices``
(int64, sorted, positions into ``W.view(-1)``) and ``values``. Merging is exact:
``W.view(-1)[indices] += values``; unmerging subtracts.

Selections (``selection``):

* ``"magnitude"`` — the ``k`` entries with the largest ``|W|`` (the top-magnitude baseline
  of Sung et al., 2021);
* ``"random"`` — ``k`` entries uniformly at random; reproducible from ``seed`` (each layer
  draws from a generator seeded with ``seed`` and the CRC-32 of its module name, so layers
  of the same shape get different subsets);
* ``"fish"`` — the FISH mask (Sung et al., 2021, "Training Neural Networks with Fixed Sparse
  Masks", arXiv:2111.09839): the ``k`` entries with the largest empirical Fisher information,
  estimated as the sum of squared gradients of the loss over calibration batches. Compute
  the scores with :func:`fish_scores` and pass them as ``SparseFT(selection="fish",
  scores=...)``. The scores are not saved: a saved adapter carries its indices.

The per-batch gradient is squared (a batch-level estimate); the paper squares per-example
gradients, which :func:`fish_scores` gives with batches of one example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, one_of
from ..core.errors import ConfigError, PeftkitError
from ..core.layers import CONV1D, CONV2D, EMBEDDING, HF_CONV1D, LINEAR
from ..core.registry import register
from ..core.targets import ALL_LINEAR
from .sparse_delta import SparseDeltaLayer, count_for, select_support

SELECTIONS = ("magnitude", "random", "fish")


@register
@dataclass
class SparseFT(AdapterConfig):
    """Train ``density`` of each targeted weight's entries, chosen by ``selection``.

    ``scores`` (for ``selection="fish"``): ``{module name: tensor shaped like its weight}``, as
    returned by :func:`fish_scores`; not saved (loading takes the indices from the file).
    """

    method = "sparse"
    family = "sparse"
    paper = "Sung et al. 2021, FISH mask (arXiv:2111.09839); magnitude and random masks"
    formula = "W + scatter(values at indices); values"
    supported_layers = (LINEAR, HF_CONV1D, CONV1D, CONV2D, EMBEDDING)
    default_targets = ALL_LINEAR

    density: float = 0.01
    selection: str = "magnitude"
    seed: int = 0
    scores: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        #: True for a config read from a saved file: its indices come from that file, so FISH needs no scores
        self._indices_from_file = False

    def validate(self) -> None:
        owner = type(self).__name__
        d = self.density
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0.0 < d <= 1.0:
            raise ConfigError(f"{owner}: density must be in (0, 1], got {d!r}")
        one_of(owner, "selection", self.selection, SELECTIONS)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"{owner}: seed must be an integer, got {self.seed!r}")
        if self.selection == "fish" and self.scores is None and not self._indices_from_file:
            raise ConfigError(f"{owner}: selection='fish' needs scores; compute them with "
                              "peftkit.methods.sparse.fish_scores(model, batches) and pass scores=...")
        if self.scores is not None and not isinstance(self.scores, dict):
            raise ConfigError(f"{owner}: scores must be a dict {{module name: tensor}}, got {type(self.scores).__name__}")

    def count_for(self, numel: int) -> int:
        """The number of trainable entries of a weight with ``numel`` entries: ``max(1, round(density · numel))``."""
        return count_for(self.density, numel)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        if self.selection == "fish" and self.scores is not None:
            s = self.scores.get(module_name)
            if s is None:
                return ("no FISH score for this module; compute fish_scores with the same target_modules "
                        f"(scores has {len(self.scores)} modules)")
            if s.numel() != base.weight.numel():
                return f"its FISH scores have {s.numel()} entries but the weight has {base.weight.numel()}"
        return None

    def build(self, base: nn.Module, module_name: str) -> SparseLayer:
        return SparseLayer(self, base, module_name)

    # -- serialisation: the scores stay out of the file --------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("scores", None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseFT:
        cfg = super().from_dict(data)
        assert isinstance(cfg, SparseFT)
        cfg._indices_from_file = True
        return cfg


def select_indices(config: SparseFT, weight: torch.Tensor, module_name: str) -> torch.Tensor | None:
    """The sorted flat positions (int64) that ``config`` makes trainable in ``weight``; None when they come from a file."""
    k = config.count_for(weight.numel())
    if config.selection == "fish":
        if config.scores is None:
            return None
        return select_support("scores", k, weight, module_name, scores=config.scores[module_name])
    return select_support(config.selection, k, weight, module_name, seed=config.seed)


class SparseLayer(SparseDeltaLayer):
    """``W' = W + scatter(values at indices)``: buffer ``indices`` (k,) int64, parameter ``values`` (k,)."""

    def __init__(self, config: SparseFT, base: nn.Module, module_name: str) -> None:
        k = config.count_for(base.weight.numel())
        idx = select_indices(config, base.weight, module_name)
        #: a FISH adapter read from a file: placeholder indices (-1) until the file's are loaded
        awaiting = idx is None
        if idx is None:
            idx = torch.full((k,), -1, dtype=torch.long)
        super().__init__(config, base, module_name, idx)
        self.awaiting_indices = awaiting

    def on_attach(self, model: nn.Module, site: Any) -> None:
        if self.awaiting_indices:
            raise PeftkitError(
                f"{self.module_name}: this selection='fish' SparseFT config was read from a file but its indices "
                "were not loaded; use peftkit.load, or compute scores with fish_scores and pass scores=..."
            )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if self.check_loaded_indices(state_dict, prefix):
            self.awaiting_indices = False
        AdapterModule._load_from_state_dict(self, state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"method=sparse, entries={self.indices.numel()}/{self.numel}, selection={self.config.selection}"


# -- FISH scores ----------------------------------------------------------------------------------
def fish_scores(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                target_modules: Any = None, exclude_modules: Any = None) -> dict[str, torch.Tensor]:
    """Empirical Fisher information of each targeted weight: ``Σ_batches (∂loss/∂W)²`` (Sung et al., 2021).

    ``batches``: an iterable of model inputs; ``loss_fn(model, batch)`` returns the scalar loss
    (default: ``model(**batch).loss``, so batches need labels). ``target_modules`` /
    ``exclude_modules`` select the layers as in :class:`SparseFT` (default: the model family's
    default targets); use the same ones in the config. Returns ``{module name: scores}`` with
    scores shaped like the weight, in float32. Weights are not changed, and neither are the
    parameters' ``requires_grad`` flags or ``.grad`` fields.
    """
    from ..core.api import model_type as _model_type
    from ..core.targeting import display_name, resolve_targets

    default = ALL_LINEAR.get(_model_type(model) or "", None)
    names = resolve_targets(model, target_modules, exclude_modules, default)
    weights: dict[str, torch.Tensor] = {}
    for n in names:
        w = getattr(model.get_submodule(n), "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ConfigError(f"fish_scores: module {display_name(n)} has no weight")
        weights[display_name(n)] = w
    if loss_fn is None:
        def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
            out = m(**batch)
            loss = getattr(out, "loss", None)
            if loss is None:
                raise ConfigError("fish_scores: the model returned no .loss; give batches with labels or pass loss_fn")
            return loss

    flags = {n: w.requires_grad for n, w in weights.items()}
    scores = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
    seen = 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
        params = list(weights.values())
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for (n, _), g in zip(weights.items(), grads, strict=True):
                if g is not None:
                    scores[n] += g.detach().float().pow(2)
            seen += 1
    finally:
        for n, w in weights.items():
            w.requires_grad_(flags[n])
    if not seen:
        raise ConfigError("fish_scores: batches is empty; give at least one calibration batch")
    return scores
