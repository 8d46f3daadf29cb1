"""Where training memory goes: ``peftkit.memory_report(model, batch)``.

One training step holds, at its peak (the start of the backward pass):

* **weights** — every parameter and buffer, quantized ones at their real size (``peftkit.quant``);
* **gradients** — one tensor per trainable parameter, its size;
* **optimizer state** — measured from the optimizer when one is given (after a step), else AdamW's
  two moments per trainable parameter;
* **activations** — the tensors autograd saves for the backward, recorded with
  ``torch.autograd.graph.saved_tensors_hooks`` during one forward and loss on ``batch`` (storages
  counted once, weights left out; checkpointed regions save nothing);
* **loss working set** — the backward of a causal-LM loss holds logits-sized fp32 tensors that are
  not saved activations: with the chunked loss (:mod:`peftkit.train.loss`) the recomputed logits of
  one chunk, their log-softmax and its gradient (3 × rows × V × 4 bytes, rows = one chunk); with the
  model's own loss the gradient of the logits, in fp32 and in the model dtype.

``estimated peak = weights + activations + loss working set + gradients + optimizer state``. With ``measure=True``
the forward and backward run again under a dispatch mode that follows every tensor storage
allocated (and freed) by torch, and ``measured peak = weights + the largest live total`` — a
measurement of torch's own allocations on any device, CPU included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MB = 1024 * 1024


@dataclass
class MemoryReport:
    """Bytes per component; ``measured_peak`` is None unless measured."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    loss_working_set: int = 0
    measured_peak: int | None = None
    optimizer_measured: bool = False

    @property
    def estimated_peak(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.loss_working_set

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["estimated_peak"] = self.estimated_peak
        return d

    def markdown(self) -> str:
        opt = "measured" if self.optimizer_measured else "AdamW estimate: 2 moments"
        rows = [("weights", self.weights, "parameters and buffers (quantized at their real size)"),
                ("gradients", self.gradients, "trainable parameters"),
                ("optimizer state", self.optimizer_state, opt),
                ("activations", self.activations, "tensors saved for backward (saved-tensor hooks)"),
                ("loss working set", self.loss_working_set, "fp32 logits being differentiated (one chunk with chunked CE)"),
                ("estimated peak", self.estimated_peak, "sum of the above")]
        if self.measured_peak is not None:
            err = (self.estimated_peak - self.measured_peak) / max(1, self.measured_peak)
            what = f"torch allocations during forward+backward; estimate off by {err:+.1%}"
            rows.append(("measured peak", self.measured_peak, what))
        lines = ["| component | MB | what |", "| --- | ---: | --- |"]
        lines += [f"| {n} | {b / MB:.1f} | {w} |" for n, b, w in rows]
        return "\n".join(lines)


def _tensor_bytes(t: torch.Tensor) -> int:
    from .quant.schemes import storage_bytes

    return storage_bytes(t)


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    if type(t) not in (torch.Tensor, nn.Parameter):
        return None
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return st.data_ptr(), st.nbytes()


def weight_bytes(model: nn.Module) -> tuple[int, set[int]]:
    """Bytes of the model's parameters and buffers (each storage once) and the set of their storage pointers."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = _storage_key(t)
        if key is None:
            if id(t) not in seen:
                seen.add(id(t))
                total += _tensor_bytes(t)
            continue
        if key[0] not in seen:
            seen.add(key[0])
            total += key[1]
    return total, seen


def _loss(model: nn.Module, batch: dict[str, Any], chunked: bool = True) -> torch.Tensor:
    from .train.loss import model_loss

    return model_loss(model, batch, chunked=chunked)


def saved_activation_bytes(model: nn.Module, batch: dict[str, Any], skip: set[int] | None = None,
                           chunked: bool = True) -> int:
    """Bytes of the tensors autograd keeps for backward after one forward and loss on ``batch``."""
    skip = skip if skip is not None else weight_bytes(model)[1]
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is None:
            if id(t) not in skip:
                seen.setdefault(id(t), 0)
            return t
        if key[0] not in skip and key[0] != 0:
            seen[key[0]] = max(seen.get(key[0], 0), key[1])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, batch, chunked)
    del loss
    return sum(seen.values())


class LiveMemory(TorchDispatchMode):
    """Follows every storage torch allocates inside the block: ``peak`` is the largest live total (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if type(t) in (torch.Tensor, nn.Parameter)}
        for t in tree_flatten(out)[0]:
            if type(t) is torch.Tensor:
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.live and key not in inputs:  # a view of an input is no allocation
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def measure_peak(model: nn.Module, batch: dict[str, Any], chunked: bool = True) -> int:
    """Weights plus the peak of torch's live allocations during one forward, loss and backward (gradients freed after)."""
    weights, _ = weight_bytes(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with LiveMemory() as mem:
        _loss(model, batch, chunked).backward()
    for p in params:
        p.grad = None
    return weights + mem.peak


def memory_report(model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
                  measure: bool = False, chunked_loss: bool = True) -> MemoryReport:
    """Weights, gradients, optimizer state and saved activations of one training step on ``batch``.

    ``batch`` is what the model is called with (``labels`` included for a loss). ``optimizer``: its state
    is measured if it has stepped, else AdamW's two moments are assumed. ``measure``: also run one forward
    and backward under :class:`LiveMemory` and report the measured peak. ``chunked_loss``: the loss as
    training computes it (:func:`peftkit.train.loss.model_loss`).
    """
    weights, skip = weight_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    opt_bytes, measured_opt = 2 * sum(p.numel() * 4 if p.element_size() < 4 else p.numel() * p.element_size()
                                      for p in trainable), False
    if optimizer is not None and optimizer.state:
        from .optim import state_bytes

        opt_bytes, measured_opt = state_bytes(optimizer), True
    was = model.training
    model.train()
    try:
        acts = saved_activation_bytes(model, batch, skip, chunked_loss)
        peak = measure_peak(model, batch, chunked_loss) if measure else None
    finally:
        model.train(was)
    if peak is not None:
        peak += opt_bytes  # no optimizer step runs in the measurement
    work = _loss_working_set(model, batch, chunked_loss)
    return MemoryReport(weights, grads, opt_bytes, acts, work, peak, measured_opt)


def _loss_working_set(model: nn.Module, batch: dict[str, Any], chunked: bool) -> int:
    from .train.loss import DEFAULT_CHUNK, IGNORE, _head, _plain_linear, supports_chunked_loss

    labels = batch.get("labels")
    head = _head(model)
    if labels is None or labels.ndim != 2 or head is None or not hasattr(head, "out_features"):
        return 0
    vocab = head.out_features
    if chunked and supports_chunked_loss(model):
        rows = min(int((labels[:, 1:] != IGNORE).sum()), DEFAULT_CHUNK)
        if _plain_linear(head):  # fused: one chunk's float32 logits, softmax and gradient in place (+ half logits)
            item = head.weight.element_size()
            return rows * vocab * 4 + (rows * vocab * item if item < 4 else 0)
        return 3 * rows * vocab * 4
    item = head.weight.element_size()
    return labels.numel() * vocab * (4 + item)


def append_memory_section(path: Any, report: dict[str, Any], rss_peak_mb: float | None = None) -> None:
    """Add a "Memory" section (the first batch's :func:`memory_report`) to a training report.md."""
    from pathlib import Path

    from .core.files import atomic_write_bytes

    path = Path(path)
    r = MemoryReport(**{k: v for k, v in report.items() if k != "estimated_peak"})
    lines = ["", "## Memory (first batch, peftkit.memory_report)", "", r.markdown()]
    if rss_peak_mb:
        lines += ["", f"Process peak RSS during the run: {rss_peak_mb:.1f} MB (includes Python, libraries, data and "
                      "allocator caching; the estimate counts torch tensors only)."]
    atomic_write_bytes(path, (path.read_text() + "\n".join(lines) + "\n").encode())
