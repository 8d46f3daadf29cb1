"""An adapter as a plain value: :class:`AdapterState`, taken out of a model and put back.

Everything after ``attach`` — saving in either file format, merging adapters, compressing
them, serving many over one base — works on this value instead of on the model:

    state = extract(model, "default")     # model → value (tensors on the CPU side of FSDP gathers)
    ... transform, write, read ...
    install(model, state, name="copy")    # value → model, checked first, all or nothing

``tensors`` holds each adapted module's ``state_dict()`` keyed ``"<module path>.<name>"``;
``shared`` the tensors shared by every layer (saved once); ``layers`` the facts about each
adapted layer that file writers need (kind, weight shape, method-specific facts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .errors import AdapterLoadError, ConfigError
from .layers import layer_kind
from .model import adapter_modules, adapter_names, config_of, validate_adapter_name
from .sharding import class_name, module_state
from .targets import in_output_head

SHARED = "shared"


@dataclass
class AdapterState:
    """One adapter, detached from any model."""

    name: str
    config: AdapterConfig
    #: adapted module paths as the user sees them; None: resolved from the config's targets at install
    targets: list[str] | None
    #: ``"<module path>.<state name>"`` → tensor (for ``targets=None``: ``"<state name>"``)
    tensors: dict[str, torch.Tensor]
    #: tensors shared by all layers of the adapter (``module.shared``), saved once
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    #: module path → {"kind": layer kind, "shape": base weight shape, ...method facts}
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the base model the adapter was made on: {"class", "name_or_path", "parameters"}
    base: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method

    def module_tensors(self, path: str) -> dict[str, torch.Tensor]:
        """The state of the module at ``path`` (names without the path)."""
        prefix = path + "."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def replace(self, **changes: Any) -> AdapterState:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def base_facts(model: nn.Module) -> dict[str, Any]:
    return {
        "class": class_name(model),
        "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "parameters": sum(p.numel() for n, p in model.named_parameters() if ".adapters." not in n),
        # the frozen body without task heads: what adapters for different tasks of one base share
        "body_parameters": sum(p.numel() for n, p in model.named_parameters()
                               if ".adapters." not in n and not in_output_head(n)),
    }


def extract(model: nn.Module, name: str) -> AdapterState:
    """Adapter ``name`` of ``model`` as an :class:`AdapterState` (tensors detached, not copied).

    Under FSDP2 the tensors are gathered first: call it on every rank.
    """
    config = config_of(model, name)
    tensors: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    targets: list[str] = []
    for path, site, mod in adapter_modules(model, name):
        targets.append(path)
        for k, v in module_state(mod).items():
            if k.startswith(SHARED + "."):
                shared.setdefault(k[len(SHARED) + 1:], v.detach())
            else:
                tensors[f"{path}.{k}"] = v.detach()
        w = getattr(site.base, "weight", None)
        facts: dict[str, Any] = {"kind": layer_kind(site.base)}
        if isinstance(w, torch.Tensor):
            facts["shape"] = list(w.shape)
        facts.update(mod.layer_facts())
        layers[path] = facts
    return AdapterState(name, config, targets, tensors, shared, layers, base_facts(model))


def install(model: nn.Module, state: AdapterState, name: str | None = None, *, trainable: bool = False,
            activate: bool = True, allow_nonfinite: bool = False, source: str | None = None) -> nn.Module:
    """Put ``state`` into ``model`` as adapter ``name`` (default ``state.name``).

    Every tensor is checked by name, shape, dtype and (unless ``allow_nonfinite``) for NaN/inf
    before the model is touched; any failure leaves the model exactly as it was. Other
    adapters keep their trainable flags; with ``activate`` the new adapter becomes the only
    active one, else the active set is unchanged.
    """
    from .api import install_plan, module_targets, prepare, saved_targets
    from .sharding import check_unsharded

    check_unsharded(model, "load")
    name = state.name if name is None else name
    source = source or f"adapter {name!r}"
    validate_adapter_name(name)
    if not isinstance(state.config, AdapterConfig):
        raise AdapterLoadError(f"{source}: the config is a {type(state.config).__name__}, not a peftkit method config")
    if name in adapter_names(model):
        raise ConfigError(f"an adapter named {name!r} is already attached; pick another name or delete it first")
    tensors = state.tensors
    targets = state.targets
    try:
        if targets is None:  # a prompt-learning adapter read from peft's files: bare tensor names
            targets = module_targets(model, state.config)
            if len(targets) != 1:
                raise ConfigError(f"expected exactly one module for {state.config.method}, found {len(targets)}")
            saved = saved_targets(model, state.config)  # modules_to_save copies keep their module paths
            tensors = {k if any(k.startswith(p + ".") for p in saved) else f"{targets[0]}.{k}": v
                       for k, v in tensors.items()}
            targets = targets + saved
        plan = prepare(model, state.config, name, targets)
    except ConfigError as e:
        raise AdapterLoadError(f"{source}: adapter does not fit {type(model).__name__}: {e}") from None
    module_states, shared_state = check_tensors(plan, tensors, state.shared, source, allow_nonfinite)
    with torch.no_grad():
        shared_mod = getattr(plan[0][2], SHARED, None) if plan else None
        if shared_mod is not None:
            shared_mod.load_state_dict(shared_state, strict=False)  # check_tensors found every required one
        for (_mname, _base, module), st in zip(plan, module_states, strict=True):
            module.load_state_dict(st, strict=False)
    install_plan(model, plan, name, trainable=trainable, activate=activate, freeze_other_adapters=False)
    return model


def check_tensors(plan: list, tensors: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], source: str,
                  allow_nonfinite: bool = False) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Match ``tensors`` to the built modules; report every missing, unexpected, mis-shaped or non-finite one."""
    from .targeting import display_name

    problems: list[str] = []
    used: set[str] = set()
    states: list[dict[str, torch.Tensor]] = []
    shared_ref: dict[str, torch.Tensor] = {}
    optional_shared: set[str] = set()
    for mname, _base, module in plan:
        optional_shared.update(k[len(SHARED) + 1:] for k in module.optional_state if k.startswith(SHARED + "."))
        path = display_name(mname)
        state: dict[str, torch.Tensor] = {}
        for k, ref in module.state_dict().items():
            if k.startswith(SHARED + "."):
                shared_ref.setdefault(k[len(SHARED) + 1:], ref)
                continue
            key = f"{path}.{k}"
            t = tensors.get(key)
            if t is None:
                if k not in module.optional_state:
                    problems.append(f"missing tensor {key} (expected shape {tuple(ref.shape)})")
                continue
            used.add(key)
            if k in module.resizable_state and isinstance(t, torch.Tensor) and t.dim() == ref.dim():
                ref = ref.new_empty(t.shape)  # its length depends on training: the module resizes it on load
            problem = _tensor_problem(t, ref, allow_nonfinite)
            if problem:
                problems.append(f"tensor {key} {problem}")
                continue
            state[k] = t.to(ref.dtype)
        states.append(state)
    shared_state: dict[str, torch.Tensor] = {}
    for k, ref in shared_ref.items():
        t = shared.get(k)
        if t is None:
            if k not in optional_shared:  # an optional one keeps its built value (VeRA's seeded bases)
                problems.append(f"missing shared tensor {k} (expected shape {tuple(ref.shape)})")
            continue
        problem = _tensor_problem(t, ref, allow_nonfinite)
        if problem:
            problems.append(f"shared tensor {k} {problem}")
            continue
        shared_state[k] = t.to(ref.dtype)
    extra = sorted(set(tensors) - used)
    for k in extra[:10]:
        problems.append(f"unexpected tensor {k}")
    if len(extra) > 10:
        problems.append(f"... and {len(extra) - 10} more unexpected tensors")
    for k in sorted(set(shared) - set(shared_ref)):
        problems.append(f"unexpected shared tensor {k}")
    if problems:
        hint = ("\n  (pass allow_nonfinite=True to load non-finite values anyway)"
                if any("non-finite" in p for p in problems) else "")
        raise AdapterLoadError(f"{source}: the adapter does not match the model:\n  " + "\n  ".join(problems) + hint)
    return states, shared_state


def _tensor_problem(t: Any, ref: torch.Tensor, allow_nonfinite: bool) -> str | None:
    if not isinstance(t, torch.Tensor):
        return f"is a {type(t).__name__}, not a tensor"
    if tuple(t.shape) != tuple(ref.shape):
        return f"has shape {tuple(t.shape)} in the file but the model needs {tuple(ref.shape)}"
    if t.is_floating_point() != ref.is_floating_point() or (t.dtype == torch.bool) != (ref.dtype == torch.bool):
        return f"has dtype {t.dtype} in the file but the model needs {ref.dtype}"
    if not allow_nonfinite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        return f"holds {bad} non-finite value(s) (NaN or inf)"
    if not t.is_floating_point() and ref.is_floating_point() is False and t.dtype != ref.dtype:
        info = torch.iinfo(ref.dtype) if ref.dtype != torch.bool else None
        if info is not None and t.numel() and (int(t.min()) < info.min or int(t.max()) > info.max):
            return f"has values outside the range of {ref.dtype}"
    return None


def total_size(state: AdapterState) -> int:
    """Bytes of every tensor in ``state``."""
    return sum(t.numel() * t.element_size() for t in list(state.tensors.values()) + list(state.shared.values()))

