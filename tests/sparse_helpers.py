"""Helpers shared by the tests of the sparse and selective methods with schedules (RoSA, SpIEL, SaRA, HFT)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import peftkit

from .models import MODELS


class Small(nn.Module):
    """One targeted ``fc`` (4 → 3) and a frozen ``head``: the dense gradient of ``fc.weight`` is easy by hand."""

    def __init__(self, out: int = 3, inp: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(inp, out)
        self.head = nn.Linear(out, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x))


def hook_loop(model: nn.Module, steps: int, loss_fn: Callable[[int], torch.Tensor],
              optimizer: torch.optim.Optimizer) -> None:
    """``steps`` optimizer steps with the training hooks called as ``peftkit.train`` calls them."""
    for step in range(steps):
        peftkit.before_step(model, step, steps, optimizer)
        loss = loss_fn(step) + peftkit.regularization_loss(model, step, steps)
        loss.backward()
        peftkit.after_backward(model, step, steps, optimizer)
        optimizer.step()
        peftkit.after_step(model, step, steps, optimizer)
        optimizer.zero_grad(set_to_none=True)


def llama_loss(model: nn.Module, inputs: dict) -> Callable[[int], torch.Tensor]:
    ids = inputs["input_ids"]
    return lambda step: model(input_ids=ids, labels=ids).loss


def train_tiny(model: nn.Module, inputs: dict, out: Path, steps: int, lr: float = 1e-2) -> dict:
    """``peftkit.train`` on the tiny Llama's four rows (batch 2)."""
    from peftkit.train import train

    ids = inputs["input_ids"]
    examples = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i]} for i in range(4)]

    def collate(ex, bs, shuffle, seed):
        return [{k: torch.stack([e[k] for e in ex[i:i + bs]]) for k in ex[0]} for i in range(0, len(ex), bs)]

    return train(model, peftkit_train_config(out, steps, lr), examples, collate=collate)


def peftkit_train_config(out: Path, steps: int, lr: float):
    from peftkit.train import TrainConfig

    return TrainConfig(output=str(out), max_steps=steps, batch_size=2, lr=lr, progress=False)


def llama(seed: int = 0):
    return MODELS["llama"](seed)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." not in k}
