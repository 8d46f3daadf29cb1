"""The public operations on a model: attach, activate, disable, mixed batches, merge, unload.

Each operation validates everything it needs first and only then edits the model, so a bad
call leaves the model as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from . import saved_modules
from .adapter import AdapterModule, SharedTensors
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
    site_list,
    unknown_adapter,
    validate_adapter_name,
)
from .saved_modules import SavedModule
from .site import ROW_GROUPS, AdapterSite, RowGroups
from .targeting import display_name, resolve_targets

Plan = list[tuple[str, nn.Module, AdapterModule]]


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` of a transformers model (``"llama"``), else None."""
    cfg = getattr(model, "config", None)
    value = getattr(cfg, "model_type", None)
    return value if isinstance(value, str) else None


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
    config.check_types()
    config.validate()
    module_names, saved = _split_saved(model, config, _module_names(model, config, targets), targets is None)
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
    tensors = config.build_shared(model, shown)
    shared = SharedTensors(tensors) if tensors else None
    plan: Plan = []
    for mname, base in bases:
        module = config.build(base, display_name(mname))
        if shared is not None:
            module.shared = shared  # one module for every layer: its tensors exist once
        _place_like(module, base)
        plan.append((mname, base, module))
    for mname in saved:  # modules_to_save: trainable copies of whole modules, after the method's own modules
        base = model.get_submodule(mname)
        module = SavedModule(config, base, saved_modules.tied_parameter(model, mname))
        _place_like(module, base)
        plan.append((mname, base, module))
    return plan


def _split_saved(model: nn.Module, config: AdapterConfig, names: list[str],
                 resolve: bool) -> tuple[list[str], list[str]]:
    """``(method targets, modules_to_save copies)`` as module names. ``resolve``: ``names`` came from the
    config's patterns and the copies are looked up in the model; else ``names`` (an adapter's recorded
    modules) holds both, told apart by the ``modules_to_save`` rule."""
    wanted = saved_modules.entries(config)
    if not wanted:
        method, saved = names, []
    elif resolve:
        saved = saved_modules.resolve(model, config)
        method = saved_modules.split_targets(names, saved, config.method)
    else:
        saved = [n for n in names if saved_modules.is_saved(display_name(n), wanted)]
        method = [n for n in names if n not in saved]
    saved_modules.check_nesting(model, method, saved)
    return method, saved


def module_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The module paths ``config`` selects in ``model`` (its patterns, or its defaults for the model type);
    ``modules_to_save`` copies not included (:func:`saved_targets`)."""
    names, _saved = _split_saved(model, config, _module_names(model, config, None), True)
    return [display_name(n) for n in names]


def saved_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The module paths whose copies ``config.modules_to_save`` asks for in ``model``."""
    return [display_name(n) for n in saved_modules.resolve(model, config)]


def _module_names(model: nn.Module, config: AdapterConfig, targets: Sequence[str] | None) -> list[str]:
    if targets is None:
        default = config.default_targets.get(model_type(model) or "", None)
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


def install_plan(model: nn.Module, plan: Plan, name: str, trainable: bool = True, activate: bool = True,
                 freeze_other_adapters: bool = True) -> None:
    """Insert prepared adapter modules into sites and freeze the base model.

    ``trainable``: the new adapter's parameters train. ``freeze_other_adapters``: adapters already
    attached are frozen too (``attach``), else they keep their flags (``load``). ``activate``: the
    new adapter becomes the only active one. On any failure the model is restored exactly.
    """
    flags = {id(p): p.requires_grad for p in model.parameters()}
    actives = [(site, list(site.active)) for _, site in iter_sites(model)]
    active_before = active_names(model)
    others = {id(p) for _, site in iter_sites(model) for p in site.adapters.parameters()}
    inserted: list[tuple[str, AdapterSite, bool]] = []  # (module name, site, site created here)
    attached: list[AdapterModule] = []
    try:
        for p in model.parameters():
            if freeze_other_adapters or id(p) not in others:
                p.requires_grad_(False)
        for mname, base, module in plan:
            parent_name, _, child = mname.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            created = not (isinstance(parent, AdapterSite) and child == "base")
            if created:
                site = AdapterSite(base)
                replace_module(model, mname, site)
                inserted.append((mname, site, True))
            else:
                site = parent
                inserted.append((parent_name, site, False))
            site.adapters[name] = module
            module.train(model.training)  # dropout follows the model's train/eval mode
        for _mname, _base, module in plan:
            module.on_attach(model, _site_holding(model, module))
            attached.append(module)
            for p in module.parameters():
                p.requires_grad_(trainable)
        _set_active(model, [name] if activate else active_before)
    except BaseException:
        for module in reversed(attached):
            site = _site_holding(model, module)
            module.on_detach()
            module.restore_base(site.base)
        for mname, site, created in reversed(inserted):
            if name in site.adapters:
                del site.adapters[name]
            if created:
                replace_module(model, mname, site.base)
        for site, act in actives:
            site.active = act
        for p in model.parameters():
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])
        raise


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
    install_plan(model, plan, name)
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
    """Inside the block the model computes as the base model.

    Merged adapters are unmerged meanwhile (the exact pre-merge weights are restored, so
    repeated blocks never drift) and merged again afterwards.
    """
    sites = [s for _, s in iter_sites(model)]
    merged = [(s, list(s.merged)) for s in sites if s.merged]
    for s in sites:
        s.unmerge_all()
        s.disabled = True
    try:
        yield model
    finally:
        for s in sites:
            s.disabled = False
        for site, names in merged:
            for n in names:
                site.merge_adapter(n)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, names_per_row: Sequence[str | None], *, tokens: bool = False) -> Iterator[nn.Module]:
    """Row ``i`` of every batch inside the block goes through adapter ``names_per_row[i]`` (None: the base).

    ``tokens=True``: the batch is packed, ``[1, N, ...]`` (several requests' tokens in one sequence, as a
    serving engine's packed step feeds them), and ``names_per_row[n]`` is the adapter of token ``n``. Sites
    on token-wise modules (linear layers, embeddings, norms) and output-only methods allow this; others
    refuse by name.

    The assignment lives in a context variable, not on the model: blocks nest, several threads
    can each run their own mixed batch on one model, and nothing is left behind by an exception.
    Merged adapters are refused (unmerge first): their change is already in every row.
    """
    if isinstance(names_per_row, (str, bytes)) or not isinstance(names_per_row, Sequence):
        raise ConfigError(f"mixed_batch expects a list with one adapter name (or None) per row, got {names_per_row!r}")
    rows = list(names_per_row)
    bad = [r for r in rows if r is not None and not isinstance(r, str)]
    if bad:
        raise ConfigError(f"mixed_batch: row entries must be adapter names or None, got {bad[0]!r}")
    used = sorted({n for n in rows if n is not None})
    # cached between calls (this runs before every forward of a serving engine's decode step)
    sites, site_ids = site_list(model)
    known = {n for s in sites for n in s.adapters}
    for n in used:
        if n not in known:
            raise unknown_adapter(model, n)
    for site in sites:
        own = site.adapters._modules
        for n in used:
            mod = own.get(n)
            if mod is not None and not mod.supports_mixed_batch:
                path = next(p for p, s in iter_sites(model) if s is site)
                raise PeftkitError(
                    f"adapter {n!r} ({mod.config.method}, at {path}) cannot be used in a mixed batch: "
                    "its rows cannot share a batch with other adapters' rows"
                )
    merged = sorted({m for s in sites for m in s.merged})
    if merged:
        raise PeftkitError(f"mixed_batch: adapter(s) {', '.join(map(repr, merged))} are merged into the weights, so "
                           "every row would get them; call peftkit.unmerge(model) first")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    index: dict[str | None, list[int]] = {}
    for i, n in enumerate(rows):
        index.setdefault(n, []).append(i)
    groups = {n: torch.tensor(ix, dtype=torch.long, device=device) for n, ix in index.items()}
    token = ROW_GROUPS.set(RowGroups(rows, groups, site_ids, tokens=bool(tokens)))
    try:
        yield model
    finally:
        ROW_GROUPS.reset(token)


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Fold adapters ``names`` (default: the active ones) into the base weights.

    Outputs are unchanged. Raises :class:`NotMergeableError` naming the first adapter whose
    method cannot be merged, before any weight is changed. The weights each site had before
    its first merge are kept, so ``unmerge`` restores them exactly.
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
                site.merge_adapter(n)
    return model


_merge = merge


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the base weights of every merged adapter (exactly: the pre-merge weights are put back)."""
    for _, site in iter_sites(model):
        site.unmerge_all()
    return model


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from the model; sites left empty give back their original module."""
    check_names(model, [name])
    for mname, site in list(_sites_with_paths(model)):
        if name not in site.adapters:
            continue
        merged = list(site.merged)
        site.unmerge_all()
        mod = site.adapters[name]
        mod.on_detach()
        mod.restore_base(site.base)
        del site.adapters[name]
        for n in merged:
            if n != name:
                site.merge_adapter(n)
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
            site.unmerge_all()
        for n, mod in site.adapters.items():
            mod.on_detach()
            if n not in keep:
                mod.restore_base(site.base)
        site.forget_premerge()
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
