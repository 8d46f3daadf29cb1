"""``modules_to_save``: whole modules trained and saved with an adapter (peft's ``ModulesToSaveWrapper``).

Every method config has a ``modules_to_save`` field: module names. Each module of the model whose
full name **ends with** one of them — peft's rule, a plain string suffix, so ``"classifier"`` also
selects DistilBERT's ``pre_classifier`` (its freshly initialised pre-head, which peft trains too) —
gets, under the adapter's name, a :class:`ModuleCopy`: trainable copies ``θ'`` of all the module's
parameters and persistent buffers, initialised from the base ``θ``. The module then computes

    y = f(x; θ')                 (f the base module, run through ``torch.func.functional_call``)

through the :class:`~peftkit.core.site.AdapterSite` parameter-override path. What trains: ``θ'``.
Frozen and unchanged: ``θ``. Two adapters hold two independent copies; a row of a mixed batch
goes through its own adapter's copy (rows of adapters without one use ``θ``); deleting the adapter
drops its copies. Merging writes ``θ'`` into the module (``θ`` is kept aside) and unmerging puts
``θ`` back bit for bit. The copies are adapter tensors named ``<module path>.<parameter name>``
(``classifier.weight``); in peft's file format ``base_model.model.<module path>.<parameter name>``,
exactly the keys peft writes for a ``modules_to_save`` entry.

A module selected both by the method's targets and by ``modules_to_save`` is an error naming it;
method targets *inside* a saved module are left out (peft's rule: the whole module is trained).
With several active adapters holding a copy of one module, the last one's copy is used (peft allows
one active adapter there). A parameter tied to another module (GPT-2's ``lm_head`` and input
embedding) is copied untied; such a copy cannot be merged (the other module would change too).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapter import AdapterModule
from .errors import ConfigError, TargetError, closest

if TYPE_CHECKING:
    from .config import AdapterConfig


class ModuleCopy(AdapterModule):
    """Trainable copies of a module's parameters and persistent buffers, used in place of the base ones.

    ``recurse``: copy the tensors of submodules too (``modules_to_save``), or only the module's own
    (LayerNorm tuning). State names are the module's own (``weight``, ``dense.weight``), so the state
    dict of a copy is laid out like the module's.
    """

    overrides_params = True
    adapts_output = False

    def __init__(self, config: AdapterConfig, base: nn.Module, recurse: bool = True) -> None:
        super().__init__(config, base)
        params = dict(base.named_parameters(recurse=recurse))
        self.param_names = list(params)
        self.buffer_names = persistent_buffers(base, recurse)
        taken = set(dir(self))
        for n, t in params.items():
            owner, leaf = self._holder(n, taken)
            owner.register_parameter(leaf, nn.Parameter(t.detach().clone()))
        for n in self.buffer_names:
            owner, leaf = self._holder(n, taken)
            owner.register_buffer(leaf, base.get_buffer(n).detach().clone())

    def _holder(self, dotted: str, taken: set[str]) -> tuple[nn.Module, str]:
        """The (plain) submodule of this copy that holds tensor ``dotted`` (``dense.weight`` → ``self.dense``)."""
        *parts, leaf = dotted.split(".")
        if (parts[0] if parts else leaf) in taken:
            raise ConfigError(f"cannot copy tensor {dotted!r}: {(parts[0] if parts else leaf)!r} is a reserved name "
                              "of peftkit's adapter modules")
        owner: nn.Module = self
        for p in parts:
            if p not in owner._modules:
                owner.add_module(p, nn.Module())
            owner = owner._modules[p]  # type: ignore[assignment]
        return owner, leaf

    def override_params(self, params: dict[str, torch.Tensor], site: Any) -> dict[str, torch.Tensor]:
        out = dict(params)
        base = site.base
        for n in self.param_names:
            out[n] = self.get_parameter(n).to(base.get_parameter(n).dtype)
        for n in self.buffer_names:
            ref, mine = base.get_buffer(n), self.get_buffer(n)
            out[n] = mine if mine.dtype == ref.dtype else mine.to(ref.dtype)  # same dtype: running stats update here
        return out

    def _base_tensor(self, base: nn.Module, n: str) -> torch.Tensor:
        return base.get_parameter(n) if n in self.param_names else base.get_buffer(n)

    @staticmethod
    def _stash_name(n: str) -> str:
        return "merge_stash_" + n.replace(".", "__")

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        """``θ ← θ'``; the base ``θ`` is kept aside in non-persistent buffers (they follow ``.to(device)``)."""
        for n in self.param_names + self.buffer_names:
            t = self._base_tensor(base, n)
            self.register_buffer(self._stash_name(n), t.detach().clone(), persistent=False)
            mine = self.get_parameter(n) if n in self.param_names else self.get_buffer(n)
            t.data = mine.detach().to(t.dtype).clone()

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        for n in self.param_names + self.buffer_names:
            stash = self._buffers.pop(self._stash_name(n), None)
            if stash is not None:
                t = self._base_tensor(base, n)
                t.data = stash.to(t.dtype)


class SavedModule(ModuleCopy):
    """A ``modules_to_save`` copy: every tensor of the module, its submodules' included.

    ``tied``: ``(parameter, other module)`` when a parameter of the module is shared with a module outside
    it (GPT-2's ``lm_head.weight`` is the input embedding's): the copy is untied and trains on its own,
    but writing it into the shared tensor would change the other module too, so such a copy is not
    mergeable.
    """

    def __init__(self, config: AdapterConfig, base: nn.Module, tied: tuple[str, str] | None = None) -> None:
        super().__init__(config, base, recurse=True)
        if tied is not None:
            self.mergeable = False
            self.unmergeable_reason = (f"its copy of {tied[0]} is tied to {tied[1]} in the base model; merging it "
                                       "would change that module too")

    def layer_facts(self) -> dict[str, Any]:
        return {"modules_to_save": True}

    def extra_repr(self) -> str:
        return f"modules_to_save copy: {len(self.param_names)} parameter(s), {len(self.buffer_names)} buffer(s)"


def persistent_buffers(module: nn.Module, recurse: bool = True) -> list[str]:
    """Names of the buffers of ``module`` that its ``state_dict`` holds (running statistics, not caches)."""
    out = []
    for name, _b in module.named_buffers(recurse=recurse):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf not in owner._non_persistent_buffers_set:
            out.append(name)
    return out


def entries(config: AdapterConfig) -> list[str]:
    """The config's ``modules_to_save`` as a list (None → [])."""
    value = getattr(config, "modules_to_save", None)
    return [value] if isinstance(value, str) else list(value or [])


def is_saved(path: str, names: Iterable[str]) -> bool:
    """Whether module ``path`` (as the user sees it) is selected by ``modules_to_save`` ``names`` (peft: a suffix)."""
    return any(path.endswith(n) for n in names)


def saved_root(key: str, names: Sequence[str]) -> str | None:
    """The outermost module path, a dotted prefix of tensor name ``key``, that ``names`` select (None: none does)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if is_saved(prefix, names):
            return prefix
    return None


def check_entries(owner: str, value: Any) -> None:
    """``modules_to_save`` must be None or a list of distinct non-empty strings."""
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{owner}: modules_to_save must be a list of module names (e.g. ['classifier']), "
                          f"got {value!r}")
    seen: set[str] = set()
    for v in value:
        if not isinstance(v, str) or not v or v.strip() != v:
            raise ConfigError(f"{owner}: modules_to_save entries must be non-empty module names, got {v!r}")
        if v in seen:
            raise ConfigError(f"{owner}: modules_to_save lists {v!r} twice")
        seen.add(v)


def resolve(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Module names (as in ``model.named_modules()``) that ``config.modules_to_save`` selects, in model order.

    Each entry must select a module with tensors; a module inside another selected module is refused
    (the outer copy already holds its tensors). Errors name the entry and the closest module names.
    """
    from .layers import is_quantized
    from .targeting import candidate_modules, display_name

    names = entries(config)
    if not names:
        return []
    modules = candidate_modules(model)
    hits: dict[str, int] = {n: 0 for n in names}
    selected: list[tuple[str, str]] = []  # (real name, display name)
    for real, module in modules:
        shown = display_name(real)
        found = [n for n in names if shown.endswith(n)]
        if not found or not any(True for _ in _tensors(module)):
            continue
        for n in found:
            hits[n] += 1
        selected.append((real, shown))
    missing = [n for n, k in hits.items() if k == 0]
    if missing:
        shown_names = [display_name(r) for r, m in modules if any(True for _ in _tensors(m))]
        near = closest(missing[0], shown_names) or closest(missing[0], [s.rsplit(".", 1)[-1] for s in shown_names])
        hint = f"; closest module names: {', '.join(near)}" if near else ""
        raise ConfigError(f"modules_to_save entry {missing[0]!r} matches no module with parameters of "
                          f"{type(model).__name__}{hint}")
    for real, shown in selected:
        outer = next((s for _r, s in selected if shown.startswith(s + ".")), None)
        if outer is not None:
            raise ConfigError(f"modules_to_save selects both {outer!r} and {shown!r}, which lies inside it; "
                              "list only the outer module")
        if any(is_quantized(p) for p in model.get_submodule(real).parameters()):
            raise TargetError(f"modules_to_save: {shown} has quantized weights, which cannot be trained as a copy; "
                              "call peftkit.quant.dequantize(model) first")
    return [r for r, _ in selected]


def tied_parameter(model: nn.Module, name: str) -> tuple[str, str] | None:
    """``(parameter path, other module path)`` when a parameter of module ``name`` is shared with a module
    outside it (tied input and output embeddings), else None."""
    from .targeting import display_name

    mine = {id(p): f"{display_name(name)}.{n}" for n, p in model.get_submodule(name).named_parameters()}
    for other, module in model.named_modules(remove_duplicate=False):
        if other == name or other.startswith(name + "."):
            continue
        for p in module.parameters(recurse=False):
            if id(p) in mine:
                return mine[id(p)], display_name(other)
    return None


def check_nesting(model: nn.Module, method: list[str], saved: list[str]) -> None:
    """Copies and adapters of *other* adapters must not nest: a copy holds a module's tensors by name, so a module
    inside it cannot become a site (its tensors would move), and a module holding sites cannot be copied (the copy
    would take the other adapters' tensors). :class:`TargetError` naming both modules."""
    from .site import AdapterSite
    from .targeting import display_name

    for real in method + saved:
        parts = real.split(".")
        for i in range(1, len(parts) - (parts[-1] == "base")):  # not the site wrapping this very module
            outer = model.get_submodule(".".join(parts[:i]))
            if isinstance(outer, AdapterSite) and any(isinstance(m, SavedModule) for m in outer.adapters.values()):
                owners = [n for n, m in outer.adapters.items() if isinstance(m, SavedModule)]
                raise TargetError(f"{display_name(real)} lies inside {display_name('.'.join(parts[:i]))}, which adapter "
                                  f"{owners[0]!r} trains whole (modules_to_save); adapt or save modules outside it, "
                                  "or delete that adapter first")
    for real in saved:
        inner = next((n for n, m in model.get_submodule(real).named_modules() if n and isinstance(m, AdapterSite)), None)
        if inner is not None:
            raise TargetError(f"modules_to_save: {display_name(real)} holds adapted modules ({display_name(real)}."
                              f"{display_name(inner)}) of another adapter, whose tensors a copy would take; save "
                              "the module in an adapter attached before those")


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    for n in persistent_buffers(module):
        yield module.get_buffer(n)


def split_targets(method: list[str], saved: list[str], method_name: str) -> list[str]:
    """The method's targets without those inside a saved module; a module that is both is an error."""
    from .targeting import display_name

    shown_saved = [display_name(s) for s in saved]
    out = []
    for real in method:
        shown = display_name(real)
        if shown in shown_saved:
            raise TargetError(f"{shown} is both a target of {method_name} and in modules_to_save; a module is either "
                              f"adapted or trained whole (peft refuses both too): remove it from target_modules "
                              f"(exclude_modules=[{shown!r}]) or from modules_to_save")
        if not any(shown.startswith(s + ".") for s in shown_saved):
            out.append(real)
    if method and not out:
        raise TargetError(f"every module {method_name} targets lies inside modules_to_save "
                          f"({', '.join(shown_saved)}), which are trained whole; target other modules")
    return out


def copy_parameters(model: nn.Module, names: Sequence[str] | None = None) -> list[nn.Parameter]:
    """The trainable ``modules_to_save`` copies of adapters ``names`` (default: all) — a classification head's
    parameters, which training gives their own learning rate."""
    from .model import iter_sites

    out: list[nn.Parameter] = []
    for _, site in iter_sites(model):
        for n, mod in site.adapters.items():
            if isinstance(mod, SavedModule) and (names is None or n in names):
                out.extend(p for p in mod.parameters() if p.requires_grad)
    return out


def split_saved(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(the adapter without its modules_to_save copies, {model parameter name: copy})`` of an
    :class:`~peftkit.core.adapter_state.AdapterState`.

    For work on the method's part alone (merging the adapters of several tasks, each keeping its own
    head); the second value puts a head back into a model as its own weights
    (``model.load_state_dict(head, strict=False)``).
    """
    names = entries(state.config)
    if not names:
        return state, {}
    copies = {k: t for k, t in state.tensors.items() if saved_root(k, names) is not None}
    targets = None if state.targets is None else [t for t in state.targets if not is_saved(t, names)]
    config = copy.copy(state.config)  # not dataclasses.replace: a config read from a file keeps its flags (CorDA)
    config.modules_to_save = None
    rest = state.replace(config=config, targets=targets,
                         tensors={k: t for k, t in state.tensors.items() if k not in copies},
                         layers={p: f for p, f in state.layers.items() if not is_saved(p, names)})
    return rest, copies
