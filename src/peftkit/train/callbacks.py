"""The training-hook protocol (:mod:`peftkit.core.hooks`) for a transformers ``Trainer``.

    from peftkit.train.callbacks import PeftkitCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PeftkitCallback()])

Per optimizer step the callback calls ``before_step`` (``on_step_begin``), ``after_backward``
(``on_pre_optimizer_step``, after gradient clipping) and ``after_step`` (``on_optimizer_step``,
before ``zero_grad``) with ``state.global_step`` (0-based) and ``state.max_steps``. For the
regularisers (AdaLoRA's orthogonality penalty) it adds ``peftkit.regularization_loss(model)`` to
the ``loss`` the model returns in training mode, through a forward hook registered at
``on_train_begin`` and removed at ``on_train_end``; a ``Trainer`` that computes the loss itself
(``compute_loss_func``, label smoothing) must add the term there instead.

This module imports transformers; ``import peftkit`` does not import it.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..core import hooks


class PeftkitCallback(TrainerCallback):
    """Runs the training hooks of the adapters being trained (AdaLoRA's allocation, DyLoRA's rank draw, ...)."""

    def __init__(self) -> None:
        self._handle: Any = None

    @staticmethod
    def _total(state: Any) -> int | None:
        return state.max_steps if getattr(state, "max_steps", 0) and state.max_steps > 0 else None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any) -> None:
        if model is None or self._handle is not None:
            return

        def add_regularization(module: nn.Module, inputs: Any, output: Any) -> Any:
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            if module.training and loss is not None and hooks.training_hooks(module):
                total = loss + hooks.regularization_loss(module, state.global_step, self._total(state))
                if isinstance(output, dict):
                    output["loss"] = total
                else:
                    output.loss = total
            return output

        self._handle = model.register_forward_hook(add_regularization)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any) -> None:
        if model is not None:
            hooks.before_step(model, state.global_step, self._total(state), kw.get("optimizer"))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                              **kw: Any) -> None:
        if model is not None:
            hooks.after_backward(model, state.global_step, self._total(state), kw.get("optimizer"))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any) -> None:
        if model is not None:
            hooks.after_step(model, state.global_step, self._total(state), kw.get("optimizer"))
