"""Choosing the next token and turning tokens into text, per request.

* Greedy (``temperature == 0``): ``argmax_v logits_v``.
* Sampling: ``p = softmax(logits / T)``; with ``top_p < 1`` only the smallest set of most likely
  tokens whose probabilities sum to at least ``top_p`` is kept (nucleus sampling, Holtzman et al.
  2019, arXiv:1904.09751), renormalised, and one token is drawn with the request's own
  ``torch.Generator`` (seeded by ``seed``: the same request gives the same text whatever else
  shares the batch).
* Text: the generated ids are decoded as a whole each step and only the new characters are
  released; characters that may still become a stop string (a suffix that is a prefix of one) or an
  incomplete UTF-8 sequence (U+FFFD at the end) are held back until they are decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    """How one request decodes. ``max_tokens`` new tokens at most; ``stop`` strings end the text (excluded)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` ``[rows, vocab]``: greedy rows in one argmax, sampled rows each with its generator."""
    out = logits.argmax(-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            out[i] = sample(logits[i], p.temperature, p.top_p, g)
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Draw one token id from ``softmax(logits / temperature)`` restricted to the top-``top_p`` nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
        keep = before < top_p  # the first token is always kept
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Incremental detokenisation of one request's generated ids, with stop strings."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.stopped = False
        self.text = ""

    def push(self, token: int) -> str:
        """Add one token; return the newly released text. Sets ``stopped`` when a stop string appeared."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [p for p in (text.find(s, start) for s in self.stop) if p >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
                self.text = text[:end]
                return self._release(end)
        self.text = text
        hold = 1 if text.endswith("\ufffd") else 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return self._release(len(text) - hold)

    def flush(self) -> str:
        """The held-back text once generation ended without a stop string."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        piece = self.text[self.sent:upto]
        self.sent = upto
        return piece
