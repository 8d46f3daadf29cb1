"""The plumbing of methods that act on the whole model (prompt tuning, prefix tuning, MAM).

Such an adapter's module sits on one site (the input embedding), which holds its parameters,
so save/load, activation and deletion work as for any adapter. ``on_attach`` registers a
forward pre-hook on the model; the hook calls :meth:`ModelHookAdapter.rewrite` with the call's
arguments as keywords, while the adapter runs (active, not disabled, not in a mixed batch).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..core.adapter import AdapterModule
from ..core.errors import PeftkitError


class ModelHookAdapter(AdapterModule):
    """An adapter module that rewrites the model's forward call through a pre-hook."""

    adapts_output = False  # the model-level hook does the work; the embedding's own output is unchanged
    mergeable = False
    supports_mixed_batch = False  # the sequence seen by attention changes length
    #: the method's name in error messages
    label = "this method"

    def __init__(self, config: Any, base: nn.Module) -> None:
        super().__init__(config, base)
        self.__dict__["_site"] = None  # plain attributes: not submodules (the site holds this module)
        self.__dict__["_hook"] = None
        self.__dict__["_forward_params"] = []

    def on_attach(self, model: nn.Module, site: Any) -> None:
        self.__dict__["_site"] = site
        self.__dict__["_forward_params"] = [
            p for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        self.__dict__["_hook"] = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def on_detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self.__dict__["_hook"] = None
        self.__dict__["_site"] = None

    def running(self) -> bool:
        site = self._site
        if site is None or site.disabled or site.row_groups is not None:
            return False
        return any(site.adapters[n] is self for n in site.running())

    def _pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.running():
            return None
        kwargs = dict(kwargs)
        if args:
            params = self._forward_params
            if len(args) > len(params):
                raise PeftkitError(f"{self.label} cannot read {len(args)} positional arguments of "
                                   f"{type(model).__name__}.forward; pass them by keyword")
            for p, a in zip(params, args, strict=False):
                kwargs[p.name] = a
        return self.rewrite(model, kwargs)

    def rewrite(self, model: nn.Module, kwargs: dict) -> tuple[tuple, dict] | None:
        """The model call's new ``(args, kwargs)`` (all arguments are in ``kwargs``), or None to leave it."""
        raise NotImplementedError
