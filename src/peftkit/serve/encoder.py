"""Embedding and classification requests for an encoder (BERT-like) over many adapters.

Requests waiting in the queue are taken together, up to ``max_batch`` texts, their rows tokenized in
one padded batch and run in one forward with ``peftkit.mixed_batch`` (each row through its request's
adapter, grouped per adapter). No decode loop: one forward answers them all.

* Embeddings (a bare encoder, e.g. ``minilm-l6``): the mean of the last hidden states over the real
  tokens, ``e = Σ_t m_t h_t / Σ_t m_t``, scaled to unit length (``e / ‖e‖``), the sentence-transformers
  recipe of all-MiniLM-L6-v2.
* Classification (a ``...ForSequenceClassification`` model): ``softmax(logits)`` with the label names
  of ``config.id2label``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import AdapterTable
from .metrics import Metrics
from .worker import Failed, Worker

_ids = itertools.count()


@dataclass
class Encoded:
    """Per text: an embedding (``vectors``) or class probabilities (``vectors`` ordered as ``labels``)."""

    vectors: list[list[float]]
    labels: list[str] | None
    prompt_tokens: int


@dataclass
class EncodeRequest:
    texts: list[str]
    adapter: str | None
    emit: Callable[[Encoded | Failed], None]
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


def is_classifier(model: nn.Module) -> bool:
    return any(isinstance(getattr(model, n, None), nn.Module) for n in ("classifier", "score"))


class EncoderEngine(Worker):
    """Serves ``/v1/embeddings`` (bare encoders) or ``/v1/classifications`` (sequence classifiers)."""

    endpoint = "encode"

    def __init__(self, model: nn.Module, tokenizer: Any, table: AdapterTable, max_batch: int = 32,
                 max_length: int = 512, max_waiting: int = 1024, metrics: Metrics | None = None,
                 prepack: bool = False) -> None:
        super().__init__(model, tokenizer, table, max_batch, max_waiting, metrics, prepack=prepack)
        self.max_length = max_length
        self.kind = "classification" if is_classifier(model) else "embedding"
        cfg = getattr(model, "config", None)
        labels = getattr(cfg, "id2label", None) or {}
        self.labels = [str(labels.get(i, labels.get(str(i), i))) for i in range(int(getattr(cfg, "num_labels", 0) or 0))]
        self.mixed_steps = 0

    def work(self) -> None:
        room, rows = 0, 0
        for r in self.waiting:  # whole requests, up to max_batch texts (at least one request)
            if room and rows + len(r.texts) > self.max_batch:
                break
            room, rows = room + 1, rows + len(r.texts)
        new = self.admit(room)
        if not new:
            return
        self.running = new
        try:
            outs, tokens = self._encode(new)
        finally:
            self.running = []
        start = 0
        for r, n_tok in zip(new, tokens, strict=True):
            n = len(r.texts)
            r.emit(Encoded(outs[start:start + n].tolist(), self.labels if self.kind == "classification" else None,
                           n_tok))
            start += n

    @torch.no_grad()
    def _encode(self, reqs: list[EncodeRequest]) -> tuple[torch.Tensor, list[int]]:
        """``(one vector per text, real tokens per request)`` from one forward over every text."""
        from ..core.api import mixed_batch

        texts = [t for r in reqs for t in r.texts]
        names = [r.adapter for r in reqs for _ in r.texts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        counts = enc["attention_mask"].sum(-1).tolist()
        tokens, i = [], 0
        for r in reqs:
            tokens.append(int(sum(counts[i:i + len(r.texts)])))
            i += len(r.texts)
        self.metrics.tokens(prompt=sum(tokens))
        if set(names) == {None}:
            ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        else:
            ctx = mixed_batch(self.model, names)
            self.mixed_steps += 1
        with ctx:
            out = self.model(**enc)
        self.metrics.step()
        if self.kind == "classification":
            return torch.softmax(out.logits.float(), dim=-1), tokens
        h = out.last_hidden_state.float()
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1.0), dim=-1), tokens
