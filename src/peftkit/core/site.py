"""The one wrapper that replaces a targeted module.

An :class:`AdapterSite` holds the original module (``base``), an ordered dict of named
adapters, and which of them are active and which are merged. Its forward is

    x' = T_k(...T_1(x))                      input transforms (OFT, IA3 feed-forward)
    base_out = base(x'; params overridden)   parameter overrides (sparse, norm tuning)
    y = A_k(...A_1(base_out))                output adaptations (LoRA, DoRA, IA3, adapters)

over the active, unmerged adapters in activation order. With a mixed batch, rows are grouped
by adapter: methods that only adapt the output share one base call and are applied to each
group's rows (or, for LoRA, in one gathered batched product); other methods run per group.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .adapter import AdapterModule
from .layers import is_quantized


@dataclass(frozen=True)
class RowGroups:
    """The adapter of each row of a mixed batch, and which sites it applies to (ids)."""

    names_per_row: list[str | None]
    groups: dict[str | None, torch.Tensor]
    sites: frozenset[int]
    #: a packed batch ``[1, tokens, ...]``: the names are per token (a serving engine's packed step)
    tokens: bool = False
    #: per-block values that every site would otherwise recompute (e.g. LoRA's row slots)
    memo: dict = field(default_factory=dict, compare=False)


#: set by ``peftkit.mixed_batch`` for the block's duration (per thread / async task)
ROW_GROUPS: contextvars.ContextVar[RowGroups | None] = contextvars.ContextVar("peftkit_row_groups", default=None)


class AdapterSite(nn.Module):
    """Wraps one module of the user's model; adapters live in ``self.adapters``."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        #: the base module's own tensors as they were before the first merge (restored by unmerge)
        self._premerge: dict[str, torch.Tensor] | None = None

    # The base module's attributes (weight, in_features, ...) stay reachable through the site,
    # so code that reads ``model.q_proj.weight`` keeps working.
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "adapters"):
                raise
            return getattr(self._modules["base"], name)

    def running(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active if n in self.adapters and n not in self.merged]

    # -- merging --------------------------------------------------------------------------
    @torch.no_grad()
    def merge_adapter(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights; the first merge keeps a copy of them."""
        if not self.merged:  # quantized weights: the method's merge keeps the replaced tensor itself
            self._premerge = {k: t.detach().clone() for k, t in self.base.named_parameters(recurse=False)
                              if not is_quantized(t)}
        self.adapters[name].merge_into(self.base)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge_all(self) -> None:
        """Undo every merge: the pre-merge weights are restored exactly (no rounding drift)."""
        if not self.merged:
            return
        for n in reversed(self.merged):
            self.adapters[n].unmerge_from(self.base)  # methods' own bookkeeping (caches, flags)
        if self._premerge is not None:
            own = dict(self.base.named_parameters(recurse=False))
            for k, t in self._premerge.items():
                if k in own and own[k].shape == t.shape:
                    own[k].data.copy_(t)
        self.merged.clear()
        self._premerge = None

    def forget_premerge(self) -> None:
        self._premerge = None

    @property
    def row_groups(self) -> tuple[list[str | None], dict[str | None, torch.Tensor]] | None:
        """The mixed-batch assignment in force for this site (None outside ``peftkit.mixed_batch``)."""
        rg = ROW_GROUPS.get()
        if rg is None or id(self) not in rg.sites:
            return None
        return rg.names_per_row, rg.groups

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.disabled and self.row_groups is not None:
            return self._mixed_forward(args, kwargs)
        names = self.running()
        if not names:
            return self.base(*args, **kwargs)
        if len(names) == 1:
            out = self.adapters[names[0]].fused_call(args, kwargs, self)
            if out is not None:
                return out
        return self.run_adapters(names, args, kwargs)

    def run_adapters(self, names: Sequence[str], args: tuple, kwargs: dict) -> Any:
        mods: list[AdapterModule] = [self.adapters[n] for n in names]
        if not args:  # a module called with keywords only (``self_attn(hidden_states=...)``)
            args, kwargs = _first_input_positional(self.base, kwargs)
        x0, rest = args[0], args[1:]
        x = x0
        for m in mods:
            if m.transforms_input:
                x = m.transform_input(x, self)
        params: dict[str, torch.Tensor] = {}
        for m in mods:
            if m.overrides_params:
                params = m.override_params(params, self)
        if params:
            base_out = functional_call(self.base, params, (x, *rest), kwargs, strict=False)
        else:
            base_out = self.base(x, *rest, **kwargs)
        y = base_out
        for m in mods:
            if m.adapts_output:
                y = m.adapt_output(x0, y, base_out, self)
        return y

    # -- mixed batches -------------------------------------------------------------------
    def _mixed_forward(self, args: tuple, kwargs: dict) -> Any:
        rg = ROW_GROUPS.get()
        assert rg is not None
        names_per_row, groups = rg.names_per_row, rg.groups
        if not args:
            args, kwargs = _first_input_positional(self.base, kwargs)
        x = args[0]
        packed = rg.tokens
        if (x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != len(names_per_row)) if packed \
                else x.shape[0] != len(names_per_row):
            from .errors import PeftkitError

            what = f"{x.shape[1] if x.dim() > 1 else 0} tokens in a packed batch of shape {tuple(x.shape)}" \
                if packed else f"{x.shape[0]} rows"
            raise PeftkitError(f"mixed_batch was given {len(names_per_row)} adapter names but the batch has {what}")
        own, merged = self._modules["adapters"]._modules, self.merged
        present = {n: own[n] for n in groups if n is not None and n in own and n not in merged}
        if not present:
            return self.base(*args, **kwargs)
        mods = list(present.values())
        output_only = all(not (m.transforms_input or m.overrides_params) for m in mods)
        if output_only and not kwargs and len(args) == 1:
            base_out = self.base(x)
            if not packed:
                return self._adapt_rows(names_per_row, groups, present, x, base_out)
            if not isinstance(base_out, torch.Tensor) or base_out.shape[:2] != x.shape[:2]:
                raise self._not_token_wise(mods[0])
            # token n of the packed batch is row n: [1, N, ...] -> [N, 1, ...] and back
            return self._adapt_rows(names_per_row, groups, present, x.transpose(0, 1),
                                    base_out.transpose(0, 1)).transpose(0, 1)
        if packed:
            if kwargs or len(args) != 1 or not all(self.packable(m) for m in mods):
                raise self._not_token_wise(mods[0])
            return self._group_rows(groups, present, (x.transpose(0, 1),), {}, len(names_per_row)).transpose(0, 1)
        return self._group_rows(groups, present, args, kwargs, x.shape[0])

    def _adapt_rows(self, names_per_row: list[str | None], groups: dict, present: dict, x: torch.Tensor,
                    base_out: Any) -> Any:
        """Output-only adapters on a shared base output: one gathered product, else each group's rows."""
        mods = list(present.values())
        kind = type(mods[0])
        gathered = getattr(kind, "gathered_output", None)
        if gathered is not None and all(type(m) is kind for m in mods):
            out = gathered(self, names_per_row, x, base_out)
            if out is not None:
                return out
        out = base_out.clone()
        for name, idx in groups.items():
            if name not in present:
                continue
            yb = base_out.index_select(0, idx)
            out.index_copy_(0, idx, present[name].adapt_output(x.index_select(0, idx), yb, yb, self))
        return out

    def _group_rows(self, groups: dict, present: dict, args: tuple, kwargs: dict, n: int) -> Any:
        """The general path: each group of rows through its own adapter (or the base)."""
        outs: list[tuple[torch.Tensor, Any]] = []
        for name, idx in groups.items():
            sub_args = tuple(_rows(a, idx, n) for a in args)
            sub_kwargs = {k: _rows(v, idx, n) for k, v in kwargs.items()}
            if name in present:
                outs.append((idx, self.run_adapters([name], sub_args, sub_kwargs)))
            else:
                outs.append((idx, self.base(*sub_args, **sub_kwargs)))
        return _scatter_rows(outs, n)

    def packable(self, mod: AdapterModule) -> bool:
        """Whether ``mod`` (an adapter of this site) can run on a packed batch: output-only methods at any module
        (they act after it, token by token); methods that change the module's input or parameters only around a
        token-wise module (token ``n`` of a packed batch is its own row only there)."""
        return not (mod.transforms_input or mod.overrides_params) or token_wise(self.base)

    def _not_token_wise(self, mod: AdapterModule) -> Exception:
        from .errors import PeftkitError

        return PeftkitError(
            f"{mod.config.method} on a {type(self.base).__name__} cannot run in a packed batch (tokens of several "
            "requests in one sequence): the module mixes tokens or the method changes its input; "
            "serve it with the padded engine (peftkit serve --engine padded)")

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"


def token_wise(module: nn.Module) -> bool:
    """Whether ``module`` maps every token on its own (a linear layer, an embedding, a norm), so that the tokens
    of a packed batch may be regrouped as rows around it."""
    if isinstance(module, nn.Linear | nn.Embedding | nn.LayerNorm):
        return True
    name = type(module).__name__
    return name == "Conv1D" or name.endswith(("RMSNorm", "LayerNorm"))


def _first_input_positional(base: nn.Module, kwargs: dict) -> tuple[tuple, dict]:
    """Move the base module's first forward argument from the keywords to the first position
    (``self_attn(hidden_states=...)``), so adapters see it as ``x``."""
    import inspect

    from .errors import PeftkitError

    try:
        params = list(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        params = []
    key = params[0] if params and params[0] in kwargs else None
    if key is None:
        raise PeftkitError(f"{type(base).__name__} was called without its first input "
                           f"({params[0] if params else 'unknown'!r}); adapters need it")
    rest = dict(kwargs)
    return (rest.pop(key),), rest


def _rows(v: Any, idx: torch.Tensor, n: int) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
        return v.index_select(0, idx)
    return v


def _scatter_rows(parts: list[tuple[torch.Tensor, Any]], n: int) -> Any:
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        out = first.new_empty((n, *first.shape[1:]))
        for idx, part in parts:
            out.index_copy_(0, idx, part)
        return out
    if isinstance(first, tuple):
        return tuple(_scatter_rows([(i, p[k]) for i, p in parts], n) for k in range(len(first)))
    return first
