"""The training-hook protocol: methods whose adapters change during training (schedules, regularisers).

Most methods are plain parameters trained by any optimizer. Some need the training loop to call
them: AdaLoRA re-allocates its rank budget after each optimizer step, IncreLoRA grows ranks,
DyLoRA samples a rank before each step, SpIEL drops and regrows entries, Chain of LoRA merges and
restarts; AdaLoRA also adds an orthogonality penalty to the loss. Such a method defines any of
these methods on its **config class** (the engine looks them up with ``getattr``; a method
without them costs nothing):

* ``before_step(modules, info)`` — before the forward pass of an optimizer step;
* ``after_backward(modules, info)`` — gradients are there, the optimizer has not stepped
  (gradient masks, importance from the current weights);
* ``after_step(modules, info)`` — the optimizer has stepped and the gradients are still there
  (``zero_grad`` comes after): rank allocation, growth, drop/regrow, merge-and-restart;
* ``regularization_loss(modules, info) -> Tensor | None`` — a term added to the training loss.

``modules`` is ``{module path: AdapterModule}`` of one adapter (its ``modules_to_save`` copies left
out), so a hook sees the whole adapter (a global rank budget spans every layer); ``info`` is a
:class:`StepInfo`. Hooks run for the adapters being trained (those with a trainable parameter), in attachment order. All the state
a hook keeps lives in the adapter modules or their config, never in the loop.

A training loop calls, for optimizer step ``step`` (0-based) of ``total_steps``::

    peftkit.before_step(model, step, total_steps)
    loss = model(**batch).loss + peftkit.regularization_loss(model)
    loss.backward()
    peftkit.after_backward(model, step, total_steps)
    optimizer.step()
    peftkit.after_step(model, step, total_steps, optimizer=optimizer)
    optimizer.zero_grad()

``peftkit.train`` does this; ``peftkit.train.callbacks.PeftkitCallback`` does it for a
transformers ``Trainer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapter import AdapterModule
from .model import adapter_modules, adapter_names
from .saved_modules import SavedModule

HOOKS = ("before_step", "after_backward", "after_step", "regularization_loss")


@dataclass
class StepInfo:
    """What a hook is told about the step.

    ``step``: the 0-based index of the optimizer step in progress (the same in the four hooks of
    one step); ``total_steps``: the planned number of optimizer steps (None if unknown);
    ``adapter``: the adapter's name; ``model``: the user's model; ``optimizer``: the optimizer when
    the loop passes it (a restart may need to reset its state for the parameters it re-initialises).
    """

    step: int
    total_steps: int | None
    adapter: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None


def _trained(model: nn.Module) -> list[tuple[str, Any, dict[str, AdapterModule]]]:
    out = []
    for name in adapter_names(model):
        every = {path: mod for path, _site, mod in adapter_modules(model, name)}
        if not any(p.requires_grad for m in every.values() for p in m.parameters()):
            continue
        mods = {path: mod for path, mod in every.items() if not isinstance(mod, SavedModule)}
        if not mods:
            continue
        out.append((name, next(iter(mods.values())).config, mods))
    return out


def training_hooks(model: nn.Module) -> dict[str, list[str]]:
    """``{adapter name: [hook names its method defines]}`` for the adapters being trained that define any.

    Empty for plain methods: a loop may skip the calls then (they would do nothing anyway).
    """
    out: dict[str, list[str]] = {}
    for name, config, _mods in _trained(model):
        found = [h for h in HOOKS if callable(getattr(config, h, None))]
        if found:
            out[name] = found
    return out


def _call(model: nn.Module, hook: str, step: int, total_steps: int | None,
          optimizer: torch.optim.Optimizer | None) -> list[Any]:
    results = []
    for name, config, mods in _trained(model):
        fn = getattr(config, hook, None)
        if callable(fn):
            results.append(fn(mods, StepInfo(step, total_steps, name, model, optimizer)))
    return results


def before_step(model: nn.Module, step: int, total_steps: int | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> None:
    """Call every trained adapter's ``before_step`` hook (before the forward pass of step ``step``)."""
    _call(model, "before_step", step, total_steps, optimizer)


def after_backward(model: nn.Module, step: int, total_steps: int | None = None,
                   optimizer: torch.optim.Optimizer | None = None) -> None:
    """Call every trained adapter's ``after_backward`` hook (gradients present, before the optimizer step)."""
    _call(model, "after_backward", step, total_steps, optimizer)


def after_step(model: nn.Module, step: int, total_steps: int | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> None:
    """Call every trained adapter's ``after_step`` hook (after ``optimizer.step()``, before ``zero_grad``)."""
    _call(model, "after_step", step, total_steps, optimizer)


def param_groups(model: nn.Module, params: list[nn.Parameter], lr: float) -> list[dict[str, Any]]:
    """Optimizer groups for ``params`` (the trainable adapter parameters) at learning rate ``lr``.

    A method whose parts train at different rates (DePT: prompt and low-rank update) defines
    ``param_groups(modules, lr) -> [{"params": [...], "lr": ...}, ...]`` on its config class; its
    parameters go into those groups. Every other parameter is in the first group, at the
    optimizer's default rate. Without such methods: one group holding ``params``.
    """
    wanted = {id(p) for p in params}
    taken: set[int] = set()
    groups: list[dict[str, Any]] = []
    for _name, config, mods in _trained(model):
        fn = getattr(config, "param_groups", None)
        if not callable(fn):
            continue
        for g in fn(mods, lr):
            mine = [p for p in g["params"] if id(p) in wanted and id(p) not in taken]
            taken.update(id(p) for p in mine)
            if mine:
                groups.append({**g, "params": mine})
    rest = [p for p in params if id(p) not in taken]
    return ([{"params": rest}] if rest else []) + groups


def regularization_loss(model: nn.Module, step: int = 0, total_steps: int | None = None) -> torch.Tensor:
    """The sum of the trained adapters' regularisation terms, to add to the training loss.

    A 0-d zero tensor when no method adds one, so ``loss + regularization_loss(model)`` always works.
    """
    terms = [t for t in _call(model, "regularization_loss", step, total_steps, None) if t is not None]
    if terms:
        return torch.stack([t.reshape(()) for t in terms]).sum() if len(terms) > 1 else terms[0].reshape(())
    ref = next((p for p in model.parameters()), None)
    return torch.zeros((), device=ref.device if ref is not None else None)
