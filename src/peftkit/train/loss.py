"""Chunked cross-entropy for causal language models: never the full logits over the vocabulary.

A causal LM computes ``logits = H W_headᵀ`` for every position (``T × V``, V ≈ 50k) and, for the
loss, an fp32 copy, its softmax and their gradients: for a batch of 8 × 512 tokens and V = 49152
that is 0.8 GB per copy. Here the body runs alone (``model.base_model``: hidden states ``H``),
then only the positions that carry a label (the completion: label ≠ −100 after the causal
shift ``y_t = labels_{t+1}``) are kept, and the head and the loss run over chunks of
``chunk_size`` positions:

    L = (1/N) Σ_chunks Σ_{t ∈ chunk} −log softmax(W_head h_t)_{y_t},     N = #{t : y_t ≠ −100}

For a plain linear head the head and the loss are one autograd node that computes the gradients
of each chunk in the forward, while its logits exist (:mod:`peftkit.train.fused_ce`); any other
head runs each chunk under activation checkpointing, so the backward recomputes that chunk's
logits instead of keeping them. Either way the peak holds the logits of one chunk, not of the batch. The value
and the gradients are those of the model's own loss (transformers' mean over labelled tokens).

Used when the model is a transformers causal LM whose logits are the plain head output (no
logit soft-capping or scaling), no forward pre-hook rewrites its call (prompt and prefix tuning,
MAM and DePT do: running the body alone would skip them) and the model runs in one process
(DDP/FSDP hook the root's forward, so they keep the model's own loss); otherwise the model's own
loss is used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
DEFAULT_CHUNK = 1024


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def supports_chunked_loss(model: nn.Module) -> bool:
    """True for a transformers causal LM whose logits are ``head(base_model(...)[0])`` and nothing else."""
    if not type(model).__name__.endswith("ForCausalLM") and not type(model).__name__.endswith("LMHeadModel"):
        return False
    body = getattr(model, "base_model", None)
    if body is None or body is model or _head(model) is None:
        return False
    if model._forward_pre_hooks:  # a hook rewrites the model's call (prompt/prefix tuning, DePT): keep it
        return False
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return True


def _plain_linear(head: nn.Module | None) -> bool:
    """A bare ``nn.Linear`` with no hooks: its output is exactly ``h Wᵀ + b``."""
    return (type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and not torch.nn.modules.module._global_forward_hooks
            and not torch.nn.modules.module._global_forward_pre_hooks)


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_causal_lm_loss(model: nn.Module, batch: dict[str, Any], chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The model's causal-LM loss (mean over labelled next tokens) without materialising all logits.

    ``batch`` holds ``labels`` (−100 where no loss) and the model's inputs. Call
    :func:`supports_chunked_loss` first.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["use_cache"] = False
    hidden = model.base_model(**inputs)[0]
    head = _head(model)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]  # (N, d): only the positions with a label
    y = targets[keep]
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0  # transformers returns nan here; a zero keeps the step finite
    if _plain_linear(head):  # gradients computed in the forward, chunk by chunk (train/fused_ce.py)
        from .fused_ce import fused_linear_cross_entropy

        return fused_linear_cross_entropy(h, head, y, chunk_size) / n
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    grad = torch.is_grad_enabled()
    for start in range(0, n, chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        if grad:
            total = total + checkpoint(_chunk_loss, hc, yc, head, use_reentrant=False)
        else:
            total = total + _chunk_loss(hc, yc, head)
    return total / n


def model_loss(model: nn.Module, batch: dict[str, Any], chunked: bool = True, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The loss of one batch: chunked cross-entropy where it applies (token labels, a plain causal LM), else
    the ``loss`` the model returns."""
    labels = batch.get("labels")
    if chunked and labels is not None and labels.ndim == 2 and supports_chunked_loss(model):
        return chunked_causal_lm_loss(model, batch, chunk_size)
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        from ..core.errors import ConfigError

        raise ConfigError("the model returned no loss: the batches need 'labels' (or the model must return a loss)")
    return loss
