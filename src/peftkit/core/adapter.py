"""The protocol every method implements against the layer it adapts.

A method is a config (see :mod:`peftkit.core.config`) that builds one
:class:`AdapterModule` per targeted layer. The :class:`~peftkit.core.site.AdapterSite`
that wraps the layer calls the hooks below; a method overrides only those it needs:

* ``transform_input(x, site)`` — rewrite the layer input before the base layer runs
  (OFT's rotation, IA3's feed-forward scaling). Set ``transforms_input = True``.
* ``override_params(params, site)`` — replace base parameters (``{"weight": ...}``) for
  this call (sparse deltas, norm tuning); the base runs through ``functional_call``.
  Set ``overrides_params = True``.
* ``adapt_output(x, y, base_out, site)`` — the adapted output from the original input
  ``x``, the running output ``y`` (the base output plus earlier adapters' changes) and the
  pure ``base_out``. Additive methods return ``y + Δ(x)``.
* ``merge_into(base)`` / ``unmerge_from(base)`` — fold the adapter into the base weights
  and back. The default uses ``delta_weight(base)`` (``W ← W + ΔW``); multiplicative
  methods override both. ``mergeable = False`` marks methods that cannot be folded
  (``unmergeable_reason`` says why); ``supports_mixed_batch = False`` those whose rows
  cannot share a batch with other adapters' rows.
* ``on_attach(model, site)`` / ``on_detach()`` — model-level hooks (prompt tuning).
* ``fused_forward(x, site)`` — optional: the adapted output in one fused step when the adapter
  runs alone on the site (LoRA on linear layers: one autograd node for base + low-rank path).
  ``fused_call(args, kwargs, site)`` is the same for a call with any arguments (MEFT's layers).
* ``gathered_output(site, names_per_row, x, base_out)`` — optional classmethod: a mixed batch in
  which every running adapter of the site is of this class, computed for all rows at once (LoRA:
  two batched products), or None to fall back to one call per group of rows.
* ``layer_facts()`` — facts about the adapted layer that file writers need beyond its kind and
  shape (recorded in :class:`~peftkit.core.adapter_state.AdapterState` ``layers``).

State: ``state_dict()`` is what is saved. ``optional_state`` names tensors that a file may omit
(they keep the values the module was built with: PiSSA's starting factors, which the SVD at
build time recomputes; ``"shared.<name>"`` for a shared tensor, e.g. VeRA's bases regenerated
from the seed). ``resizable_state`` names tensors whose length depends on training (SaRA's
frozen part after re-selections): load accepts the file's shape, and the module resizes them
in ``_load_from_state_dict``. ``self.shared`` (set when the config defines ``build_shared``) is one
module holding tensors shared by every layer of the adapter; it is saved once, not per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layers import as_matrix, from_matrix

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .site import AdapterSite


class AdapterModule(nn.Module):
    """One adapter on one layer. Its parameters are the trainable ones; its persistent state is what is saved."""

    transforms_input: bool = False
    overrides_params: bool = False
    adapts_output: bool = True
    mergeable: bool = True
    #: why ``merge`` refuses this method (shown in the error) when ``mergeable`` is False
    unmergeable_reason: str = "the method has no weight form"
    #: False for methods whose rows cannot be mixed in one batch (they change the sequence length, ...)
    supports_mixed_batch: bool = True
    #: state tensors a file may omit (they keep their built values)
    optional_state: tuple[str, ...] = ()
    #: state tensors whose length depends on training (SaRA's frozen part): a file's shape is accepted as long
    #: as it has the same number of axes, and the module's ``_load_from_state_dict`` resizes them first
    resizable_state: tuple[str, ...] = ()

    def __init__(self, config: AdapterConfig, base: nn.Module) -> None:
        super().__init__()
        self.config = config

    # -- forward hooks -------------------------------------------------------------
    def transform_input(self, x: torch.Tensor, site: AdapterSite) -> torch.Tensor:
        return x

    def override_params(self, params: dict[str, torch.Tensor], site: AdapterSite) -> dict[str, torch.Tensor]:
        return params

    def adapt_output(self, x: torch.Tensor, y: Any, base_out: Any, site: AdapterSite) -> Any:
        return y

    def fused_forward(self, x: torch.Tensor, site: AdapterSite) -> torch.Tensor | None:
        """Optional fast path when this adapter is the only one running on the site: the whole adapted
        output from ``x`` in one step (base included), or None to use the general pipeline."""
        return None

    def fused_call(self, args: tuple, kwargs: dict, site: AdapterSite) -> Any:
        """Optional: the site's whole output for this call (any arguments) when this adapter runs alone on
        it, or None to use the general pipeline. The default is :meth:`fused_forward` for a call with one
        positional input; a method that replaces how a module called with keywords runs (MEFT runs the
        whole layer stack from the first layer's call) overrides this."""
        if len(args) == 1 and not kwargs:
            return self.fused_forward(args[0], site)
        return None

    def layer_facts(self) -> dict[str, Any]:
        """Facts about the adapted layer for file writers (beyond its kind and weight shape)."""
        return {}

    # -- merging ---------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """ΔW laid out like ``base.weight``, such that the merged weight is ``W + ΔW``."""
        raise NotImplementedError(f"{type(self).__name__} defines no delta_weight")

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        w = base.weight
        w.data += self.delta_weight(base).to(w.dtype)

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        w = base.weight
        w.data -= self.delta_weight(base).to(w.dtype)

    # -- model-level hooks -----------------------------------------------------------
    def on_attach(self, model: nn.Module, site: AdapterSite) -> None:
        """Called once the adapter sits in ``site`` inside ``model``."""

    def on_detach(self) -> None:
        """Called before the adapter is removed: undo whatever ``on_attach`` or init did outside it."""

    def restore_base(self, base: nn.Module) -> None:
        """Undo any change the adapter's initialisation made to the base weights (PiSSA's residual)."""

    # -- helpers for subclasses ------------------------------------------------------
    @staticmethod
    def matrix(base: nn.Module) -> torch.Tensor:
        return as_matrix(base)

    @staticmethod
    def unmatrix(base: nn.Module, m: torch.Tensor) -> torch.Tensor:
        return from_matrix(base, m)

    def extra_repr(self) -> str:
        return f"method={self.config.method}"


class SharedTensors(nn.Module):
    """Tensors shared by every layer of one adapter (frozen buffers), e.g. VeRA's seeded bases."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for k, v in tensors.items():
            if not k.isidentifier():
                raise ValueError(f"shared tensor name {k!r} must be a Python identifier")
            self.register_buffer(k, v)
