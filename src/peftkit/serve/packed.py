"""Packed steps: the prompts of joining requests and the next token of every running request in one forward.

A decode step feeds one token per running request, a prefill the whole prompt of a joining one. On
a CPU (and on a GPU at small batches) a forward costs about the same for 16 tokens as for 40: reading
the weights dominates. Prefilling joining requests in a forward of their own (the padded engine,
:mod:`peftkit.serve.kv`) therefore costs a server whose requests join every few steps about a third
of its time. Here every step is one forward over a *packed* sequence (batch 1)::

    tokens    = [t_1 .. t_R,  p_1,1 .. p_1,P1,  ...,  p_k,1 .. p_k,Pk]
                 one per running row   the prompts of the k joining requests
    positions = [n_1 .. n_R,  0 .. P1-1,        ...,  0 .. Pk-1]

(``n_i`` tokens of row ``i`` are cached). Linear layers and their adapters act on each token alone
(``peftkit.mixed_batch(..., tokens=True)``: token ``n`` goes through its request's adapter); only
attention needs to know which tokens belong together. :func:`packed_attention`, registered as a
transformers attention implementation, computes for every layer

* decode token ``i``: ``softmax(q_i K_iᵀ / √d) V_i`` over its row's cached keys ``K_i[:n_i]`` and its
  own key (written at column ``n_i`` first), one batched SDPA over all running rows with a length
  mask (grouped-query heads read their shared key/value head: no repeated keys);
* prompt ``j``: causal attention within the prompt, its keys written into a fresh slot. A prompt longer
  than the step's token budget is prefilled in pieces over several steps; a later piece attends to the
  part already cached in its slot and causally to itself.

The cache (:class:`SlotKV`) is preallocated per layer, ``[slots, kv_heads, capacity, head_dim]``,
the capacity doubling when a row needs more: no concatenation per step. Running rows occupy slots
``0 .. R-1``; a finished row's slot is refilled by the last row (one row copied), so every view is a
plain slice. The attention implementation is switched on only inside :func:`packed_step`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PeftkitError

PACKED = "peftkit_packed"
#: keyword arguments of an attention call that change its math; a packed step refuses them when set
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "position_bias")


@dataclass
class Segment:
    """A piece of one prompt in a packed step: tokens ``first .. first+n-1`` of the sequence, written to ``slot`` after
    the ``past`` tokens already cached there (a long prompt is prefilled in pieces over several steps)."""

    slot: int
    first: int
    n: int
    past: int
    mask: torch.Tensor | None  # [n, past + n] causal over the cached part and the piece (None when past == 0)


@dataclass
class Plan:
    """One packed step: ``decode`` tokens (one per decoding row, slots ``rows``), then the prompt segments."""

    kv: SlotKV
    decode: int
    rows: torch.Tensor  # [R] the slots the decode tokens are written to (in token order)
    prefix: bool  # rows == 0..R-1: the decode rows are the first slots (a slice, no gather)
    cols: torch.Tensor  # [R] the column of each decode token (its row's length so far)
    mask: torch.Tensor | None  # [R, 1, 1, width] True on the columns a decode token attends to
    width: int
    segments: list[Segment]


_PLAN: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("peftkit_packed_plan", default=None)


class SlotKV:
    """Preallocated keys and values of the running rows, one ``[slots, kv_heads, capacity, head_dim]`` pair per layer."""

    def __init__(self, slots: int, capacity: int = 128) -> None:
        self.slots = slots
        self.capacity = capacity
        self.min_capacity = capacity
        self.lengths: list[int] = []  # tokens cached per running row (slot i = row i)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def plan(self, decode: list[int], chunks: list[tuple[int, int]], device: torch.device) -> Plan:
        """The layout of the next step: rows ``decode`` (slots, ascending) feed one token each, then ``chunks``
        ``(slot, n)`` feed ``n`` prompt tokens each; a slot ``>= rows`` is a new row (the new slots follow the rows)."""
        rows = self.rows
        new = sum(1 for slot, _ in chunks if slot >= rows)
        if [slot for slot, _ in chunks if slot >= rows] != list(range(rows, rows + new)):
            raise PeftkitError(f"new rows must take slots {rows}.. in order, got {[c[0] for c in chunks]}")
        if rows + new > self.slots:
            raise PeftkitError(f"{rows} running rows and {new} joining ones exceed {self.slots} slots")
        past = {slot: (self.lengths[slot] if slot < rows else 0) for slot, _ in chunks}
        self._reserve(max([self.lengths[i] + 1 for i in decode] + [past[slot] + n for slot, n in chunks] + [1]))
        lengths = [self.lengths[i] for i in decode]
        cols = torch.tensor(lengths, dtype=torch.long, device=device)
        width = max(lengths) + 1 if decode else 0
        mask = None
        if decode:
            mask = (torch.arange(width, device=device)[None, :] <= cols[:, None])[:, None, None, :]
        segments, first = [], len(decode)
        for slot, n in chunks:
            p = past[slot]
            seg_mask = None
            if p:  # query i of the piece sees the cached tokens and the piece's first i + 1 tokens
                seg_mask = torch.arange(p + n, device=device)[None, :] <= p + torch.arange(n, device=device)[:, None]
            segments.append(Segment(slot, first, n, p, seg_mask))
            first += n
        prefix = decode == list(range(len(decode)))
        return Plan(self, len(decode), torch.tensor(decode, dtype=torch.long, device=device), prefix, cols, mask,
                    width, segments)

    def commit(self, plan: Plan) -> None:
        """After the forward: every decoded row is one token longer, the segments are cached (new rows appended)."""
        for i in plan.rows.tolist():
            self.lengths[i] += 1
        for seg in plan.segments:
            if seg.slot < len(self.lengths):
                self.lengths[seg.slot] = seg.past + seg.n
            else:
                self.lengths.append(seg.n)

    def remove(self, i: int) -> None:
        """Drop row ``i``; the last row moves into its slot (callers remove in descending order)."""
        last = self.rows - 1
        if i != last:
            n = self.lengths[last]
            for store in (self.keys, self.values):
                for t in store.values():
                    t[i, :, :n] = t[last, :, :n]
            self.lengths[i] = n
        self.lengths.pop()
        if not self.lengths:
            self._resize(self.min_capacity)

    def storage(self, layer: int, like: torch.Tensor, value_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's ``(K, V)`` tensors, allocated at its first use (shapes and dtype from the model's states)."""
        k = self.keys.get(layer)
        if k is None or k.dtype != like.dtype or k.device != like.device:
            k = self.keys[layer] = like.new_zeros((self.slots, like.shape[1], self.capacity, like.shape[3]))
            self.values[layer] = value_like.new_zeros((self.slots, value_like.shape[1], self.capacity,
                                                       value_like.shape[3]))
        return k, self.values[layer]

    def _reserve(self, need: int) -> None:
        if need > self.capacity:
            self._resize(max(need, 2 * self.capacity))

    def _resize(self, capacity: int) -> None:
        if capacity == self.capacity:
            return
        keep = min(capacity, self.capacity)
        for store in (self.keys, self.values):
            for layer, t in store.items():
                new = t.new_zeros((*t.shape[:2], capacity, t.shape[3]))
                new[:, :, :keep] = t[:, :, :keep]
                store[layer] = new
        self.capacity = capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.keys, self.values) for t in store.values())


class PackedCache:
    """What the attention layers of the model see as their cache during a packed step."""

    is_compileable = False

    def __init__(self, kv: SlotKV) -> None:
        self.kv = kv

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values (``[1, kv_heads, tokens, head_dim]``) into the slots."""
        plan = _current()
        k, v = self.kv.storage(layer_idx, key_states, value_states)
        r = plan.decode
        if r:
            k[plan.rows, :, plan.cols] = key_states[0, :, :r].transpose(0, 1)
            v[plan.rows, :, plan.cols] = value_states[0, :, :r].transpose(0, 1)
        for seg in plan.segments:
            k[seg.slot, :, seg.past:seg.past + seg.n] = key_states[0, :, seg.first:seg.first + seg.n]
            v[seg.slot, :, seg.past:seg.past + seg.n] = value_states[0, :, seg.first:seg.first + seg.n]
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given per token


def _current() -> Plan:
    plan = _PLAN.get()
    if plan is None:
        raise PeftkitError("packed attention was called outside a packed step (peftkit.serve.packed.packed_step)")
    return plan


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any = None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of a packed step (the signature of a transformers attention function); ``[1, N, heads, d_v]``."""
    plan = _current()
    bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if bad or attention_mask is not None:
        raise PeftkitError(f"{type(module).__name__} passes {bad[0] if bad else 'an attention mask'} to its attention "
                           "function, which a packed step cannot honour; use the padded engine")
    k_all, v_all = plan.kv.keys[module.layer_idx], plan.kv.values[module.layer_idx]
    _, heads, n_tokens, _ = query.shape
    kv_heads, d_v = key.shape[1], value.shape[3]
    group = heads // kv_heads
    out = query.new_empty((n_tokens, heads, d_v))
    r = plan.decode
    if r:  # [R, heads, 1, d] against [R, kv_heads, T, d] (grouped-query heads share their key/value head)
        q = query[0, :, :r].transpose(0, 1).unsqueeze(2)
        if plan.prefix:
            k_rows, v_rows = k_all[:r, :, :plan.width], v_all[:r, :, :plan.width]
        else:  # some rows are still prefilling: gather the decoding ones
            k_rows = k_all[:, :, :plan.width].index_select(0, plan.rows)
            v_rows = v_all[:, :, :plan.width].index_select(0, plan.rows)
        o = F.scaled_dot_product_attention(q, k_rows, v_rows, attn_mask=plan.mask, scale=scaling, enable_gqa=group > 1)
        out[:r] = o[:, :, 0]
    for seg in plan.segments:
        s = slice(seg.first, seg.first + seg.n)
        if seg.past:  # a later piece of a long prompt: the cached part of the prompt and the piece, causally
            end = seg.past + seg.n
            o = F.scaled_dot_product_attention(query[:, :, s], k_all[seg.slot:seg.slot + 1, :, :end],
                                               v_all[seg.slot:seg.slot + 1, :, :end], attn_mask=seg.mask,
                                               scale=scaling, enable_gqa=group > 1)
        else:
            o = F.scaled_dot_product_attention(query[:, :, s], key[:, :, s], value[:, :, s], is_causal=True,
                                               scale=scaling, enable_gqa=group > 1)
        out[s] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED, packed_attention)
        _registered = True


@contextlib.contextmanager
def packed_step(model: nn.Module, plan: Plan) -> Iterator[None]:
    """Inside the block the model's attention layers run :func:`packed_attention` for ``plan``."""
    _register()
    config = model.config
    before = config._attn_implementation
    token = _PLAN.set(plan)
    config._attn_implementation = PACKED
    try:
        yield
    finally:
        config._attn_implementation = before
        _PLAN.reset(token)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot run packed steps (None: it may; :func:`probe` confirms it numerically)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return "it is not a transformers model"
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not take pluggable attention functions"
    kinds = set(getattr(config, "layer_types", None) or [])
    if kinds - {"full_attention"}:
        return f"it has {', '.join(sorted(kinds - {'full_attention'}))} layers"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "it uses sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "it caps attention logits (attn_logit_softcapping)"
    return None
