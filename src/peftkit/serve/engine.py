"""The generation engine: one thread, one base model, continuous batching over many adapters.

Every model forward runs on the engine thread (:class:`~peftkit.serve.worker.Worker`); other
threads (the HTTP event loop, a benchmark) hand it requests and control calls through a queue and receive events back through each
request's ``emit`` callback. One iteration of the loop:

1. take new requests and control calls (load/unload an adapter) from the inbox;
2. admit waiting requests, oldest first, while the batch has room (``max_batch`` rows): each
   request's adapter is loaded if needed (an idle adapter may be evicted, see
   :class:`~peftkit.serve.adapters.AdapterTable`); a request whose adapter cannot be loaded yet
   because every loaded adapter is in use keeps waiting, and so do the requests behind it;
3. prefill the admitted requests together (left-padded, one forward) and append their cache rows
   to the running batch (:class:`~peftkit.serve.kv.BatchKV`);
4. one decode step for every running row: feed each row's last token at its own position.

That is the *padded* layout. Models that take pluggable attention functions (Llama, Mistral, Qwen,
... in transformers) run *packed* steps instead (:mod:`peftkit.serve.packed`): steps 3 and 4 are one
forward over the joining prompts and every running row's next token laid end to end, so a request
joining costs no forward of its own. ``layout="auto"`` (the default) picks packed when the model
passes a numerical probe at start (packed logits equal the model's own), else padded.

Rows go through their own adapters in the same forward with ``peftkit.mixed_batch`` (LoRA: one
gathered batched product for all adapters per layer, never a loop over rows). While all live rows
use one mergeable adapter, it is merged into the weights instead (:class:`~peftkit.serve.fastpath.
MergedPath`). After each step, finished rows (eos, a stop string, ``max_tokens``, or the context
limit) leave the batch and their requests get a ``Finished`` event; new requests join at the next
iteration. Each row decodes exactly as it would alone (``model.generate`` on that prompt with
that adapter): padding is masked, position ids are per row.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import AdapterTable
from .decoding import SamplingParams, TextStream, next_tokens
from .kv import BatchKV, left_padded, positions
from .metrics import Metrics
from .packed import PackedCache, SlotKV, packed_step, unsupported_reason
from .worker import Failed, QueueFull, Worker, log

LAYOUTS = ("auto", "packed", "padded")

__all__ = ["Delta", "Engine", "Event", "Failed", "Finished", "GenerationRequest", "QueueFull"]


@dataclass
class Delta:
    """New text of a request (possibly empty when only held-back text was decided)."""

    text: str


@dataclass
class Finished:
    reason: str  # "stop" (eos or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion


Event = Delta | Finished | Failed
_ids = itertools.count()


@dataclass
class GenerationRequest:
    """One completion: token ids of the prompt, the adapter (None: the base model), decoding parameters."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    #: False: only the ``Finished`` event (with the whole text) is emitted, no ``Delta`` per token; a
    #: non-streaming HTTP answer needs nothing else, and the event loop is not woken every step
    deltas: bool = True
    #: prompt tokens already in the cache (packed layout: a long prompt is prefilled in pieces)
    prefilled: int = 0

    def cancel(self) -> None:
        """Thread-safe: the engine drops the request at its next step (a client went away)."""
        self.cancelled = True


class Engine(Worker):
    """Serves generation requests for ``model`` (a causal LM) and the adapters of ``table``."""

    def __init__(self, model: nn.Module, tokenizer: Any, table: AdapterTable, max_batch: int = 16,
                 max_waiting: int = 1024, merge_single: bool = True, metrics: Metrics | None = None,
                 layout: str = "auto", max_step_tokens: int = 512, prepack: bool = False) -> None:
        if layout not in LAYOUTS:
            from ..core.errors import ConfigError, did_you_mean

            raise ConfigError(f"unknown engine layout {layout!r}{did_you_mean(layout, LAYOUTS)}; "
                              f"choose one of {', '.join(LAYOUTS)}")
        super().__init__(model, tokenizer, table, max_batch, max_waiting, metrics, prepack=prepack)
        if max_step_tokens < 1:
            from ..core.errors import ConfigError

            raise ConfigError(f"max_step_tokens must be at least 1, got {max_step_tokens}")
        self.max_step_tokens = max_step_tokens  # prompt tokens joining per step (a longer single prompt still joins)
        self.merge_single = merge_single
        self.pad_id = _pad_id(tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.max_context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 1 << 30)
        self.batch: BatchKV | None = None
        self.mixed_steps = 0
        self.merged_steps = 0
        accepted = inspect.signature(model.forward).parameters
        # transformers 5.x renamed ``past_key_values`` to ``cache``; ``logits_to_keep=1``: no LM head over the prompt
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
        self.kv: SlotKV | None = None  # the packed layout's cache (None: padded layout)
        self.layout = self._choose_layout(layout)  # the probe runs through the prepacked weights too
        table.packed = self.layout == "packed"

    @torch.no_grad()
    def work(self) -> None:
        room = self.max_batch - len(self.running)
        budget = self.max_step_tokens
        if self.kv is not None:  # prompt pieces still pending from earlier steps come first
            budget -= sum(len(r.prompt_ids) - r.prefilled for r in self.running)
        new = self.admit(room, budget) if room > 0 and self.waiting and budget > 0 else []
        if self.kv is not None:
            if self.running or new:
                self._packed(new)
            return
        if new:
            self._prefill(new)
        if self.running:
            self._decode()

    def reset(self) -> None:
        self.batch = None
        if self.kv is not None:
            self.kv = SlotKV(self.max_batch)

    # -- packed layout: one forward per step -------------------------------------------------
    def _choose_layout(self, layout: str) -> str:
        if layout == "padded":
            return "padded"
        reason = unsupported_reason(self.model) or self._probe()
        if reason is None:
            self.kv = SlotKV(self.max_batch)
            return "packed"
        if layout == "packed":
            from ..core.errors import ConfigError

            raise ConfigError(f"the packed engine layout cannot serve this model: {reason}; use --engine padded")
        log.info("serving with the padded engine layout: %s", reason)
        return "padded"

    def _probe(self) -> str | None:
        """Two prompts prefilled and decoded one token in packed steps must give the model's own logits."""
        from ..core.api import disabled

        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0)
        if vocab < 2:
            return "the model's config has no vocab_size"
        prompts = [[(7 * i + 3) % vocab for i in range(3)], [(11 * i + 5) % vocab for i in range(6)]]
        kv = SlotKV(2, capacity=4)  # the second step grows the capacity: that path is probed too
        try:
            with torch.no_grad(), disabled(self.model):
                first = self._packed_forward(kv, [], list(enumerate(prompts)), None)
                nxt = first.argmax(-1).tolist()
                second = self._packed_forward(kv, list(enumerate(nxt)), [], None)
                for p, a, t, b in zip(prompts, first, nxt, second, strict=True):
                    for ids, got in ((p, a), ([*p, t], b)):
                        want = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, -1]
                        err = float((got.float() - want.float()).abs().max())
                        tol = (1e-3 if want.dtype in (torch.float32, torch.float64) else 6e-2) * \
                            (1 + float(want.float().abs().max()))
                        if not err <= tol:
                            return f"a packed probe step differs from the model's own logits by {err:.3g}"
        except Exception as e:  # the model's code does not fit packed steps
            return f"a packed probe step failed ({type(e).__name__}: {e})"
        return None

    def _packed_forward(self, kv: SlotKV, decode: list[tuple[int, int]], chunks: list[tuple[int, list[int]]],
                        names: list[str | None] | None) -> torch.Tensor:
        """One packed forward: ``decode`` ``(slot, token)`` feeds one token to a decoding row, ``chunks``
        ``(slot, token ids)`` a prompt or a piece of one (slots ``>= kv.rows`` are new rows, in order);
        the next-token logits after each decode token and after the last token of each chunk, in that order."""
        ids = [t for _, t in decode]
        pos = [kv.lengths[slot] for slot, _ in decode]
        keep = list(range(len(decode)))
        for slot, piece in chunks:
            past = kv.lengths[slot] if slot < kv.rows else 0
            ids += piece
            pos += range(past, past + len(piece))
            keep.append(len(ids) - 1)
        plan = kv.plan([slot for slot, _ in decode], [(slot, len(piece)) for slot, piece in chunks], self.device)
        kw = {self._cache_arg: PackedCache(kv), "use_cache": True}
        # an adapted output head must see every packed token (its adapter names are per token): no logits_to_keep then
        keep_some = self._keep_last and not _head_is_site(self.model)
        if keep_some:
            kw["logits_to_keep"] = torch.tensor(keep, dtype=torch.long, device=self.device)
        route = self._route(names, tokens=True) if names is not None else contextlib.nullcontext()
        with route, packed_step(self.model, plan):
            out = self.model(input_ids=torch.tensor([ids], device=self.device),
                             position_ids=torch.tensor([pos], device=self.device), **kw)
        kv.commit(plan)
        logits = out.logits[0]
        return logits if keep_some else logits[keep]

    def _packed(self, new: list[GenerationRequest]) -> None:
        """One packed step: decoding rows feed their last token; prompts (pieces of at most the step's remaining
        budget, running rows' pending pieces first) feed theirs; rows whose prompt completes get their first token."""
        kv = self.kv
        assert kv is not None
        if new:
            self._start(new)
        rows = self.running = self.running + new
        budget = self.max_step_tokens
        decode, chunks, finishing = [], [], []
        names: list[str | None] = []
        for slot, r in enumerate(rows):
            if r.prefilled == len(r.prompt_ids):
                decode.append((slot, r.tokens[-1]))
                names.append(r.adapter)
        for slot, r in enumerate(rows):
            left = len(r.prompt_ids) - r.prefilled
            if left and budget > 0:
                n = min(left, budget)
                chunks.append((slot, r.prompt_ids[r.prefilled:r.prefilled + n]))
                names += [r.adapter] * n
                finishing.append(n == left)
                budget -= n
        logits = self._packed_forward(kv, decode, chunks, names)
        self.metrics.step()
        self.metrics.tokens(prompt=sum(len(piece) for _, piece in chunks))
        for slot, piece in chunks:
            rows[slot].prefilled += len(piece)
        with_token = [slot for slot, _ in decode] + [slot for (slot, _), f in zip(chunks, finishing, strict=True) if f]
        pick = list(range(len(decode))) + [len(decode) + j for j, f in enumerate(finishing) if f]
        done = self._accept([rows[i] for i in with_token], logits[pick] if len(pick) != len(logits) else logits)
        for r in rows:  # a row still prefilling can be cancelled too
            if r.cancelled and r.id not in done and r.prefilled < len(r.prompt_ids):
                self.metrics.request(self.endpoint, "cancelled")
                done.add(r.id)
        for i in sorted((i for i, r in enumerate(rows) if r.id in done), reverse=True):
            kv.remove(i)  # the last row moves into slot i: the running list does the same
            moved = rows.pop()
            if i < len(rows):
                rows[i] = moved

    def _start(self, new: list[GenerationRequest]) -> None:
        for r in new:
            r.stream = TextStream(self.tokenizer, r.params.stop)
            r.generator = r.params.generator(self.device)

    # -- both layouts ---------------------------------------------------------------------
    def _route(self, names: list[str | None], tokens: bool = False) -> contextlib.AbstractContextManager:
        """How this forward applies adapters: merged (one adapter live), mixed batch, or the bare base."""
        from ..core.api import mixed_batch

        live = {r.adapter for r in self.running} | set(names)
        if self.merge_single and len(live) == 1 and None not in live:
            name = next(iter(live))
            if self.merged.name == name or self.merged.mergeable(name):  # type: ignore[arg-type]
                self.merged.use(name)  # type: ignore[arg-type]
                self.merged_steps += 1
                return contextlib.nullcontext()
        self.merged.release()
        if live == {None}:
            return contextlib.nullcontext()
        self.mixed_steps += 1
        return mixed_batch(self.model, names, tokens=tokens)

    def _prefill(self, new: list[GenerationRequest]) -> None:
        ids, mask = left_padded([r.prompt_ids for r in new], self.pad_id, self.device)
        names = [r.adapter for r in new]
        with self._route(names):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                             **self._keep_last)
        self.metrics.step()
        self.metrics.tokens(prompt=sum(len(r.prompt_ids) for r in new))
        part = BatchKV(_cache_of(out), mask)
        if self.batch is None:
            self.batch = part
        else:
            self.batch.extend(part)
        self._start(new)
        self.running.extend(new)
        self._drop(self._accept(new, out.logits[:, -1]))

    def _decode(self) -> None:
        assert self.batch is not None
        last = torch.tensor([[r.tokens[-1]] for r in self.running], dtype=torch.long, device=self.device)
        pos = self.batch.lengths().unsqueeze(-1)
        self.batch.append_column()
        names = [r.adapter for r in self.running]
        with self._route(names):
            out = self.model(input_ids=last, attention_mask=self.batch.mask, position_ids=pos,
                             **{self._cache_arg: self.batch.cache}, use_cache=True)
        self.metrics.step()
        self.batch.cache = _cache_of(out)
        self._drop(self._accept(list(self.running), out.logits[:, -1]))

    def _drop(self, done: set[int]) -> None:
        """Padded layout: the finished rows leave the batch and its cache."""
        if done:
            keep = [i for i, r in enumerate(self.running) if r.id not in done]
            self.running = [self.running[i] for i in keep]
            if not keep:
                self.batch = None
            else:
                assert self.batch is not None
                self.batch.select(torch.tensor(keep, dtype=torch.long, device=self.device))

    def _accept(self, rows: list[GenerationRequest], logits: torch.Tensor) -> set[int]:
        """Choose each row's next token and release its text; the ids of the requests that are done."""
        tokens = next_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
        done: set[int] = set()
        for r, tok in zip(rows, tokens, strict=True):
            if r.cancelled:
                self.metrics.request(self.endpoint, "cancelled")
                done.add(r.id)
                continue
            r.tokens.append(tok)
            stream = r.stream
            assert stream is not None
            reason = None
            if tok in self.eos_ids:
                reason = "stop"
            else:
                piece = stream.push(tok)
                if piece and r.deltas:
                    r.emit(Delta(piece))
                if stream.stopped:
                    reason = "stop"
            if reason is None and (len(r.tokens) >= r.params.max_tokens
                                   or len(r.prompt_ids) + len(r.tokens) >= self.max_context):
                reason = "length"
            if reason is not None:
                if not stream.stopped:
                    rest = stream.flush()
                    if rest and r.deltas:
                        r.emit(Delta(rest))
                r.emit(Finished(reason, len(r.prompt_ids), len(r.tokens), stream.text))
                done.add(r.id)
        self.metrics.tokens(generated=len(rows))
        return done


def _head_is_site(model: nn.Module) -> bool:
    from ..core.site import AdapterSite

    get = getattr(model, "get_output_embeddings", None)
    return isinstance(get() if callable(get) else None, AdapterSite)


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None),
                                                                   "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids
