"""DePT: decomposed prompt tuning (Shi and Lipani, 2024, arXiv:2309.05173).

A prompt of ``m`` virtual tokens (``m·d`` parameters) is decomposed into a shorter prompt of
``m′`` = ``num_virtual_tokens`` tokens and a low-rank update of the frozen input embeddings of
the sequence's first ``s`` = ``max_positions`` positions:

    E′(x) = E(x) + (A B)[0:L],       A ∈ R^{s×r},  B ∈ R^{r×d}      (row i updates position i)
    h_0 = [P; E′(x)] ∈ R^{(m′+L)×d},  P ∈ R^{m′×d}

and the frozen model runs on ``h_0`` (the prompt-tuning wiring of :mod:`peftkit.methods.prompt`:
mask, labels and cache handled the same way). ``P``, ``A`` and ``B`` train; the model, its
embedding table included, is frozen. Same budget as a prompt of ``m`` tokens when

    m·d = m′·d + s·r + r·d          (:func:`dept_budget`)

and the input is ``m − m′`` tokens shorter, which is where DePT saves time and memory. At init
``A`` is Kaiming-uniform and ``B = 0``, so ``AB = 0`` and with ``m′ = 0`` the model is the base
model. Positions at or beyond ``s`` get no update (the paper pads or cuts
every input to ``s``); with a key/value cache (``generate``) the position of a new token is
counted from the cache length minus ``m′``. Positions are the indices in the given sequence
(right padding keeps them the paper's). The paper trains the two parts with different learning
rates: ``lowrank_lr`` sets the rate of ``A, B`` in ``peftkit.train`` / ``peftkit train --lowrank-lr``
(the prompt takes the training rate), and :func:`dept_param_groups` builds the groups for own loops.
Not mergeable, no mixed batches (the sequence length changes), no peft form (peft has no DePT).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import one_of, positive_int
from ..core.errors import ConfigError
from ..core.registry import register
from .prompt import INITS, TASK_TYPES, PromptEmbedding, PromptTuning, _cache_length


@register
@dataclass
class DePT(PromptTuning):
    """DePT: ``num_virtual_tokens`` (m′, may be 0) prompt tokens plus a rank-``r`` update ``A B`` of the input
    embeddings of the first ``max_positions`` (s) positions. Other options as :class:`PromptTuning`."""

    method: ClassVar[str] = "dept"
    family: ClassVar[str] = "prompt"
    paper: ClassVar[str] = "Shi & Lipani 2024 (arXiv:2309.05173)"
    formula: ClassVar[str] = "model([P; E(x) + (A B)_pos]), A ∈ R^{s×r}, B ∈ R^{r×d}; P, A, B"
    hf_codec: ClassVar[Any] = None

    num_virtual_tokens: int = 10
    r: int = 4
    max_positions: int = 256
    lowrank_lr: float | None = None

    def validate(self) -> None:
        owner = type(self).__name__
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ConfigError(f"{owner}: num_virtual_tokens must be an integer >= 0 (0: no prompt), got {n!r}")
        positive_int(owner, "r", self.r)
        positive_int(owner, "max_positions", self.max_positions)
        if self.lowrank_lr is not None and not (math.isfinite(self.lowrank_lr) and self.lowrank_lr > 0):
            raise ConfigError(f"{owner}: lowrank_lr must be a positive number (or None: the training rate), "
                              f"got {self.lowrank_lr!r}")
        if self.r > self.max_positions:
            raise ConfigError(f"{owner}: r={self.r} is above max_positions={self.max_positions} (A is max_positions×r; "
                              f"use r <= {self.max_positions})")
        one_of(owner, "prompt_tuning_init", self.prompt_tuning_init, INITS)
        if self.task_type is not None:
            one_of(owner, "task_type", self.task_type, TASK_TYPES)
        if self.prompt_tuning_init == "TEXT" and n > 0:
            super().validate()

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason.replace("prompt tuning", "DePT")
        if self.r > base.embedding_dim:
            return f"r={self.r} is above the embedding width {base.embedding_dim} (use r <= {base.embedding_dim})"
        return None

    def build(self, base: nn.Module, module_name: str) -> DePTEmbedding:
        return DePTEmbedding(copy.copy(self), base)

    def param_groups(self, modules: dict[str, Any], lr: float) -> list[dict[str, Any]]:
        """The training loop's optimizer groups (:func:`peftkit.core.hooks.param_groups`): the prompt at
        ``lr``, ``A`` and ``B`` at ``lowrank_lr`` (None: ``lr`` too)."""
        prompt, lowrank = [], []
        for mod in modules.values():
            for pname, p in mod.named_parameters():
                (lowrank if pname.startswith("lora_embedding_") else prompt).append(p)
        return [{"params": prompt, "lr": lr}, {"params": lowrank, "lr": self.lowrank_lr or lr}]


def dept_budget(config: DePT, d: int) -> int:
    """DePT's trainable parameter count for embedding width ``d``: ``m′·d + s·r + r·d``."""
    return config.num_virtual_tokens * d + config.max_positions * config.r + config.r * d


class DePTEmbedding(PromptEmbedding):
    """The prompt ``prompt_embeddings`` ``(m′, d)`` and the position update ``lora_embedding_A`` ``(s, r)``,
    ``lora_embedding_B`` ``(r, d)``."""

    unmergeable_reason = "DePT adds virtual tokens and a per-position update; there is no weight to fold into"
    label = "DePT"

    def __init__(self, config: DePT, base: nn.Module) -> None:
        super().__init__(config, base)
        d = base.embedding_dim
        if config.num_virtual_tokens == 0:  # no prompt: no (empty) parameter to train or save
            del self.prompt_embeddings
            self.register_buffer("prompt_embeddings", torch.zeros(0, d), persistent=False)
        self.lora_embedding_A = nn.Parameter(torch.empty(config.max_positions, config.r))
        self.lora_embedding_B = nn.Parameter(torch.zeros(config.r, d))
        nn.init.kaiming_uniform_(self.lora_embedding_A, a=math.sqrt(5))

    def position_update(self, start: int, length: int) -> torch.Tensor:
        """``(A B)[start : start+length]`` ``(length, d)``, zero rows for positions at or beyond ``s``."""
        s = self.lora_embedding_A.shape[0]
        d = self.lora_embedding_B.shape[1]
        out = self.lora_embedding_A.new_zeros(length, d)
        end = min(start + length, s)
        if end > start:
            out = torch.cat([self.lora_embedding_A[start:end] @ self.lora_embedding_B,
                             out[end - start:]], dim=0)
        return out

    def rewrite(self, model: nn.Module, kwargs: dict) -> tuple[tuple, dict] | None:
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            return None
        if embeds is None:
            embeds = self._site(ids)  # the embedding site: other adapters on it still apply
        past = _cache_length(kwargs.get("cache", kwargs.get("past_key_values")))
        start = max(past - self.num_virtual_tokens, 0) if past else 0
        upd = self.position_update(start, embeds.shape[1]).to(device=embeds.device, dtype=embeds.dtype)
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = embeds + upd
        kwargs["input_ids"] = None
        return super().rewrite(model, kwargs)

    def extra_repr(self) -> str:
        s, r = self.lora_embedding_A.shape
        return f"method=dept, num_virtual_tokens={self.num_virtual_tokens}, r={r}, max_positions={s}"


def dept_param_groups(model: nn.Module, lr_prompt: float, lr_lowrank: float, name: str | None = None,
                      weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer groups for DePT adapters: the prompt ``P`` at ``lr_prompt``, ``A`` and ``B`` at ``lr_lowrank``
    (the paper uses a larger rate for the prompt). Other trainable adapter parameters join the prompt's group.
    Pass the result to any torch optimizer."""
    from ..core.model import iter_sites

    for label, lr in (("lr_prompt", lr_prompt), ("lr_lowrank", lr_lowrank)):
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or not math.isfinite(lr):
            raise ConfigError(f"dept_param_groups: {label} must be a positive number, got {lr!r}")
    prompt, lowrank, found = [], [], False
    for _, site in iter_sites(model):
        for n, mod in site.adapters.items():
            if name is not None and n != name:
                continue
            found = found or isinstance(mod, DePTEmbedding)
            for pname, p in mod.named_parameters():
                if p.requires_grad:
                    (lowrank if pname.startswith("lora_embedding_") else prompt).append(p)
    if not found:
        raise ConfigError(f"dept_param_groups: no DePT adapter{f' named {name!r}' if name else ''} is attached")
    groups = [{"params": prompt, "lr": lr_prompt, "weight_decay": weight_decay},
              {"params": lowrank, "lr": lr_lowrank, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]
