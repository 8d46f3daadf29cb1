"""Finding and editing adapter sites inside a user's model.

peftkit keeps no state outside the model: every adapter lives in the
:class:`~peftkit.core.site.AdapterSite` that replaced a targeted module, so these helpers
walk ``model.named_modules()``.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .adapter import AdapterModule
from .errors import AdapterNotFoundError, ConfigError, did_you_mean
from .site import AdapterSite
from .targeting import display_name


def iter_sites(model: nn.Module) -> Iterator[tuple[str, AdapterSite]]:
    """``(user-facing name, site)`` for every site, outermost first."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterSite):
            yield display_name(name), module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the attached adapters, in the order they were attached."""
    seen: dict[str, None] = {}
    for _, site in iter_sites(model):
        for n in site.adapters:
            seen.setdefault(n, None)
    return list(seen)


def adapter_modules(model: nn.Module, name: str) -> Iterator[tuple[str, AdapterSite, AdapterModule]]:
    for path, site in iter_sites(model):
        if name in site.adapters:
            yield path, site, site.adapters[name]


def config_of(model: nn.Module, name: str):
    for _, _, mod in adapter_modules(model, name):
        return mod.config
    raise unknown_adapter(model, name)


def unknown_adapter(model: nn.Module, name: str) -> AdapterNotFoundError:
    known = adapter_names(model)
    listing = ", ".join(map(repr, known)) if known else "none"
    return AdapterNotFoundError(f"no adapter named {name!r}{did_you_mean(str(name), known)}; attached: {listing}")


def check_names(model: nn.Module, names: list[str]) -> None:
    known = set(adapter_names(model))
    for n in names:
        if n not in known:
            raise unknown_adapter(model, n)


def active_names(model: nn.Module) -> list[str]:
    for _, site in iter_sites(model):
        return list(site.active)
    return []


def validate_adapter_name(name: str) -> None:
    """An adapter name is also a module key and a folder name: a short plain string."""
    ok = (isinstance(name, str) and name.strip() == name and name != "" and not name.startswith("_")
          and not any(c in name for c in "./\\:") and name.isprintable() and len(name.encode("utf-8")) <= 255)
    if ok and hasattr(nn.ModuleDict(), name):
        raise ConfigError(f"adapter name {name!r} is reserved (an attribute of torch modules); pick another name")
    if not ok:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else repr(name[:60]) + "..."
        raise ConfigError(
            f"adapter name {shown} must be a non-empty printable string of at most 255 bytes, without '.', '/', "
            "'\\', ':' or surrounding spaces, and not starting with '_'"
        )


def parent_of(model: nn.Module, module_name: str) -> tuple[nn.Module, str]:
    if "." in module_name:
        parent_name, child = module_name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, module_name


#: bumped whenever peftkit puts a module into a model or takes one out; site lists are cached against it
_STRUCTURE = [0]


def replace_module(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent, child = parent_of(model, module_name)
    if isinstance(parent, nn.ModuleList | nn.Sequential) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    _STRUCTURE[0] += 1


def site_list(model: nn.Module) -> tuple[list[AdapterSite], frozenset[int]]:
    """Every site of ``model`` (outermost first) and their ids, without walking the model again while its
    sites are the ones peftkit put there last (a serving engine asks before every forward)."""
    hit = model.__dict__.get("_peftkit_sites")
    if hit is not None and hit[0] == _STRUCTURE[0]:
        return hit[1], hit[2]
    sites = [m for m in model.modules() if isinstance(m, AdapterSite)]
    ids = frozenset(id(s) for s in sites)
    model.__dict__["_peftkit_sites"] = (_STRUCTURE[0], sites, ids)  # a plain attribute: never saved
    return sites, ids
