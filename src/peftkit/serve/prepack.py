"""oneDNN-prepacked copies of the frozen linear weights of a model served on a CPU.

At serving batch sizes a CPU forward is bound by reading the weights, and MKL's ``sgemm`` behind
``F.linear`` reads a row-major ``[out, in]`` weight well below the memory bandwidth. oneDNN with the
weight reordered once into its blocked layout computes the same product much faster (2 cores, 16
rows: 576→1536 in 77 µs instead of 218 µs; SmolLM2's 49,152-way output head in 3.7 ms instead of
14.3 ms). The serving engine keeps a blocked copy ``W̃`` of every frozen ``nn.Linear`` weight and
routes inference forwards through it:

    y = x W̃ᵀ + b    (the same product; the summation order differs, results agree to float rounding)

What is kept and refreshed: the dense weights stay where they are (merges, saving and the adapters
read them), so the linear weights take twice the memory. A copy is made again whenever the engine
may have changed its weight: after an adapter is loaded or evicted (some methods rewrite the base
weight, e.g. PiSSA's residual) and after the merged single-adapter path folds an adapter in or takes
it out; only layers that are (or were) adapter sites change, so only those are packed again. A forward
whose weight is not the tensor the copy was made from (a method that overrides parameters calls the
layer through ``functional_call`` with its own weight; a weight replaced through ``.data``) takes
``F.linear``, and so do layers inside adapters, quantized or float16 weights, non-CPU tensors and any
forward that needs gradients.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import is_quantized
from ..core.model import site_list

log = logging.getLogger("peftkit.serve")
_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Prepacked:
    """Blocked weight copies for the frozen linear layers of ``model``; :meth:`sync` after any weight change."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        #: layer -> (blocked copy, the weight tensor it was made from, that tensor's data pointer)
        self.packed: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._site_bases: set[nn.Module] = set()

    def sync(self) -> None:
        """Pack new eligible layers, pack again those that are or were adapter sites, drop the ineligible."""
        sites = site_list(self.model)[0]
        inside = {id(m) for site in sites for m in site.adapters.modules()}
        bases = {site.base for site in sites}
        again = bases | self._site_bases
        seen = set()
        for m in self.model.modules():
            if type(m) is not nn.Linear or id(m) in inside:
                continue
            seen.add(m)
            if not _eligible(m):
                self._unpack(m)
            elif m not in self.packed or m in again or self.packed[m][1] is not m.weight \
                    or self.packed[m][2] != m.weight.data_ptr():
                self._pack(m)
        for m in [m for m in self.packed if m not in seen]:
            self._unpack(m)
        self._site_bases = bases

    def close(self) -> None:
        """Every layer back to its own forward (the model is left as it was)."""
        for m in list(self.packed):
            self._unpack(m)

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w, _, _ in self.packed.values())

    def _pack(self, m: nn.Linear) -> None:
        try:
            with torch.no_grad():
                self.packed[m] = (torch.ops.mkldnn._reorder_linear_weight(m.weight.detach()), m.weight,
                                  m.weight.data_ptr())
        except RuntimeError as e:  # this CPU's oneDNN cannot take the dtype
            log.info("linear weight %s not prepacked: %s", tuple(m.weight.shape), e)
            self._unpack(m)
            return
        if "forward" not in m.__dict__:
            m.forward = types.MethodType(_make_forward(self.packed), m)

    def _unpack(self, m: nn.Module) -> None:
        self.packed.pop(m, None)  # type: ignore[call-overload]
        m.__dict__.pop("forward", None)


def _eligible(m: nn.Linear) -> bool:
    w = m.weight
    return (type(w) is nn.Parameter or type(w) is torch.Tensor) and not is_quantized(w) and w.device.type == "cpu" \
        and w.dtype in _DTYPES and w.layout == torch.strided


def _make_forward(packed: dict) -> Any:
    op = torch.ops.mkldnn._linear_pointwise

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        entry = packed.get(self)
        weight = self.weight
        # the copy serves only the tensor it was made from: a weight swapped in for this call (functional_call, as
        # methods that override parameters do) or replaced (.data = ...) takes F.linear
        if entry is None or entry[1] is not weight or entry[2] != weight.data_ptr() or torch.is_grad_enabled() \
                or x.dtype != weight.dtype or x.device.type != "cpu":
            return F.linear(x, weight, self.bias)
        return op(x, entry[0], self.bias, "none", [], "")

    return forward
