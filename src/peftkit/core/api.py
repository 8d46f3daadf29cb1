"""The public operations on a model: attach, activate, disable, mixed batches, merge, unload.

Each operation validates everything it needs first and only then edits the model, so a bad
call leaves the model as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .adapter import AdapterModule
from .config import AdapterConfig
from .errors import ConfigError, NotMergeableError, PeftkitError, TargetError
from .layers import float_dtype_for_adapter, is_quantized
from .model import (
    active_names,
    adapter_modules,
    adapter_names,
    check_names,
    iter_sites,
    replace_module,
    unknown_adapter,
    validate_adapter_name,
)
from .site import AdapterSite
from .targeting import display_name, resolve_targets

Plan = list[tuple[str, nn.Module, AdapterModule]]


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def prepare(model: nn.Module, config: AdapterConfig, name: str, targets: Sequence[str] | None = None) -> Plan:
    """Validate ``config`` against ``model`` and build (but do not insert) the adapter modules.

    ``targets`` (user-facing module names) bypasses pattern matching; loading uses it so an
    adapter goes exactly where it was saved from.
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"attach expects a method config such as peftkit.LoRA(...), got {type(config).__name__}")
    validate_adapter_name(name)
    if name in adapter_names(model):
        raise ConfigError(f"an adapter named {name!r} is already attached; pick another name or delete it first")
    config.validate()
    module_names = _module_names(model, config, targets)
    problems: list[str] = []
    bases: list[tuple[str, nn.Module]] = []
    for mname in module_names:
        base = model.get_submodule(mname)
        reason = config.check_layer(base, display_name(mname))
        if not reason and not config.supports_quantized_base and is_quantized(base._parameters.get("weight")):
            reason = (f"{config.method} cannot adapt a layer with a quantized weight; use lora or dora, "
                      "or peftkit.quant.dequantize(model) first")
        if reason:
            problems.append(f"{display_name(mname)}: {reason}")
        bases.append((mname, base))
    if problems:
        raise TargetError("cannot attach " + config.method + ": " + "; ".join(problems))
    shown = [display_name(n) for n in module_names]
    reason = config.check_model(model, shown)
    if reason:
        raise TargetError(f"cannot attach {config.method}: {reason}")
    config = config.resolve(model, shown)
    plan: Plan = []
    for mname, base in bases:
        module = config.build(base, display_name(mname))
        _place_like(module, base)
        plan.append((mname, base, module))
    return plan


def _module_names(model: nn.Module, config: AdapterConfig, targets: Sequence[str] | None) -> list[str]:
    if targets is None:
        default = config.default_targets.get(_model_type(model) or "", None)
        return resolve_targets(model, config.target_modules, config.exclude_modules, default)
    by_display: dict[str, str] = {}
    for n, m in model.named_modules():
        if isinstance(m, (AdapterSite, AdapterModule)) or ".adapters." in f".{n}.":
            continue
        by_display.setdefault(display_name(n), n)
    missing = [t for t in targets if t not in by_display]
    if missing:
        from .errors import closest

        near = closest(missing[0], list(by_display))
        hint = f"; closest: {', '.join(near)}" if near else ""
        raise TargetError(
            f"{len(missing)} module(s) the adapter was made for are not in {type(model).__name__}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}{hint}"
        )
    return [by_display[t] for t in targets]


def _place_like(module: AdapterModule, base: nn.Module) -> None:
    ref = next((t for t in list(base.parameters()) + list(base.buffers()) if t.is_floating_point()), None)
    if ref is None:
        return
    dtype = float_dtype_for_adapter(ref.dtype)
    for p in module.parameters(recurse=True):
        p.data = p.data.to(device=ref.device, dtype=dtype if p.is_floating_point() else p.dtype)
    for bname, b in list(module.named_buffers(recurse=True)):
        owner = module.get_submodule(bname.rsplit(".", 1)[0]) if "." in bname else module
        leaf = bname.rsplit(".", 1)[-1]
        owner._buffers[leaf] = b.to(device=ref.device, dtype=dtype if b.is_floating_point() else b.dtype)


def install(model: nn.Module, plan: Plan, name: str, trainable: bool = True) -> None:
    """Insert the prepared adapter modules into sites, freeze everything else, activate ``name``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for mname, base, module in plan:
        parent_name, _, child = mname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, AdapterSite) and child == "base":
            site = parent
        else:
            site = AdapterSite(base)
            replace_module(model, mname, site)
        site.adapters[name] = module
        module.train(model.training)  # dropout follows the model's train/eval mode
    for _mname, _base, module in plan:
        site = _site_holding(model, module)
        module.on_attach(model, site)
        for p in module.parameters():
            p.requires_grad_(trainable)
    _set_active(model, [name])


def _site_holding(model: nn.Module, module: AdapterModule) -> AdapterSite:
    for _, site in iter_sites(model):
        if any(m is module for m in site.adapters.values()):
            return site
    raise RuntimeError("adapter module is not inside a site")  # pragma: no cover


def attach(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Add adapter ``name`` (method and targets from ``config``) to ``model`` in place and return ``model``.

    The base model is frozen; the new adapter is trainable and becomes the only active adapter.
    Nothing is changed if the config does not fit the model. With FSDP2, attach on every rank
    before ``fully_shard``: attaching to an already sharded model raises :class:`ConfigError`.
    """
    from .sharding import check_unsharded

    check_unsharded(model, "attach")
    plan = prepare(model, config, name)
    install(model, plan, name)
    return model


def _set_active(model: nn.Module, names: list[str]) -> None:
    for _, site in iter_sites(model):
        site.active = list(names)


def activate(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make ``names`` the active adapters; several names stack (applied in the given order)."""
    names = [names] if isinstance(names, str) else list(names)
    check_names(model, names)
    _set_active(model, names)
    return model


def set_trainable(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make only the parameters of adapters ``names`` trainable (the others and the base are frozen)."""
    names = [names] if isinstance(names, str) else list(names)
    check_names(model, names)
    for _, site in iter_sites(model):
        for n, mod in site.adapters.items():
            for p in mod.parameters():
                p.requires_grad_(n in names)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as the base model (merged adapters are unmerged meanwhile)."""
    merged = _merged_by_site(model)
    unmerge(model)
    sites = [s for _, s in iter_sites(model)]
    for s in sites:
        s.disabled = True
    try:
        yield model
    finally:
        for s in sites:
            s.disabled = False
        for site, names in merged:
            for n in names:
                site.adapters[n].merge_into(site.base)
                site.merged.append(n)


def _merged_by_site(model: nn.Module) -> list[tuple[AdapterSite, list[str]]]:
    return [(s, list(s.merged)) for _, s in iter_sites(model) if s.merged]


@contextlib.contextmanager
def mixed_batch(model: nn.Module, names_per_row: Sequence[str | None]) -> Iterator[nn.Module]:
    """Row ``i`` of every batch inside the block goes through adapter ``names_per_row[i]`` (None: the base)."""
    rows = list(names_per_row)
    used = sorted({n for n in rows if n is not None})
    check_names(model, used)
    for n in used:
        for path, _site, mod in adapter_modules(model, n):
            if not mod.supports_mixed_batch:
                raise PeftkitError(
                    f"adapter {n!r} ({mod.config.method}, at {path}) cannot be used in a mixed batch: "
                    "its rows cannot share a batch with other adapters' rows"
                )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    groups: dict[str | None, torch.Tensor] = {}
    for i, n in enumerate(rows):
        groups.setdefault(n, [])  # type: ignore[arg-type]
        groups[n].append(i)  # type: ignore[union-attr]
    groups = {n: torch.tensor(ix, dtype=torch.long, device=device) for n, ix in groups.items()}
    sites = [s for _, s in iter_sites(model)]
    for s in sites:
        s.row_groups = (rows, groups)
    try:
        yield model
    finally:
        for s in sites:
            s.row_groups = None


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Fold adapters ``names`` (default: the active ones) into the base weights.

    Outputs are unchanged. Raises :class:`NotMergeableError` naming the first adapter whose
    method cannot be merged, before any weight is changed.
    """
    names = active_names(model) if names is None else ([names] if isinstance(names, str) else list(names))
    check_names(model, names)
    for n in names:
        for path, _site, mod in adapter_modules(model, n):
            if not mod.mergeable:
                raise NotMergeableError(
                    f"adapter {n!r} ({mod.config.method}, at {path}) cannot be merged into the weights: "
                    f"{mod.unmergeable_reason}"
                )
    for _, site in iter_sites(model):
        for n in names:
            if n in site.adapters and n not in site.merged:
                site.adapters[n].merge_into(site.base)
                site.merged.append(n)
    return model


_merge = merge


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the base weights of every merged adapter (in reverse merge order)."""
    for _, site in iter_sites(model):
        for n in reversed(site.merged):
            site.adapters[n].unmerge_from(site.base)
        site.merged.clear()
    return model


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from the model; sites left empty give back their original module."""
    check_names(model, [name])
    for mname, site in list(_sites_with_paths(model)):
        if name not in site.adapters:
            continue
        merged = list(site.merged)
        for n in reversed(merged):
            site.adapters[n].unmerge_from(site.base)
        site.merged.clear()
        mod = site.adapters[name]
        mod.on_detach()
        mod.restore_base(site.base)
        del site.adapters[name]
        for n in merged:
            if n != name:
                site.adapters[n].merge_into(site.base)
                site.merged.append(n)
        site.active = [n for n in site.active if n != name]
        if not len(site.adapters):
            replace_module(model, mname, site.base)
    return model


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every trace of peftkit; with ``merge=True`` the active adapters are merged first.

    A quantized base (``peftkit.quant``) is refused with ``merge=True``: call
    ``peftkit.quant.dequantize(model)`` first (exact merge into dense weights), or ``peftkit.merge``
    to merge with re-quantization.
    """
    if merge:
        _refuse_quantized_unload(model)
        _merge(model)
    for mname, site in list(_sites_with_paths(model))[::-1]:
        keep = set(site.merged) if merge else set()
        if not merge:
            for n in reversed(site.merged):
                site.adapters[n].unmerge_from(site.base)
            site.merged.clear()
        for n, mod in site.adapters.items():
            mod.on_detach()
            if n not in keep:
                mod.restore_base(site.base)
        replace_module(model, mname, site.base)
    return model


def _refuse_quantized_unload(model: nn.Module) -> None:
    names = [display_name(p) for p, s in _sites_with_paths(model)
             if is_quantized(getattr(s.base, "weight", None)) and any(n in s.active for n in s.adapters)]
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise NotMergeableError(
            f"unload(merge=True) refused: {shown} have a quantized base weight, and merging would re-quantize it; "
            "call peftkit.quant.dequantize(model) first to merge into dense weights, or peftkit.merge(model) "
            "to merge with re-quantization (errors in peftkit.quant.merge_errors(model))")


def _sites_with_paths(model: nn.Module) -> Iterator[tuple[str, AdapterSite]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterSite):
            yield name, module


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """The adapter parameters, keyed by their path in ``model.named_parameters()``.

    With ``name`` only that adapter's; otherwise all adapters'.
    """
    if name is not None:
        check_names(model, [name])
    out: dict[str, nn.Parameter] = {}
    for sname, site in _sites_with_paths(model):
        for n, mod in site.adapters.items():
            if name is not None and n != name:
                continue
            for pname, p in mod.named_parameters():
                out[f"{sname}.adapters.{n}.{pname}"] = p
    return out


def get_adapter(model: nn.Module, name: str) -> dict[str, AdapterModule]:
    """``{module path: adapter module}`` of adapter ``name``."""
    out = {path: mod for path, _, mod in adapter_modules(model, name)}
    if not out:
        raise unknown_adapter(model, name)
    return out
