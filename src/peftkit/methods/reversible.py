"""Reversible two-stream coupling and its memory-free backward pass (used by :mod:`peftkit.methods.meft`).

One coupling maps the stream pair ``(x1, x2)`` to

    a = λ·x1 + F(x2)
    b = β·x2 + G(a)
    output (b, a)                       (the streams swap places, MEFT1/MEFT2; (a, b) for MEFT3)

and is inverted exactly (up to rounding) from its output alone:

    g  = G(a),   x2 = (b − g) / β
    f  = F(x2),  x1 = (a − f) / λ

:class:`ReversibleStack` runs a list of couplings as one autograd node that keeps only the two
final streams. Its backward walks the couplings from the top, rebuilds each coupling's inputs
from its outputs, re-runs ``F`` and ``G`` with gradients on and applies the chain rule:

    ∂L/∂a  ← ∂L/∂a + (∂G/∂a)ᵀ ∂L/∂b          (a feeds G)
    ∂L/∂x2 = β ∂L/∂b + (∂F/∂x2)ᵀ ∂L/∂a
    ∂L/∂x1 = λ ∂L/∂a
    ∂L/∂θ_G = (∂G/∂θ)ᵀ ∂L/∂b,   ∂L/∂θ_F = (∂F/∂θ)ᵀ ∂L/∂a

The backward checks its own work: the squared norms of every coupling's inputs (two float64
scalars per layer) are kept from the forward pass and compared with the rebuilt inputs'; a
relative drift above ``DRIFT_WARNING`` warns that the gradients are approximate.

Random draws (dropout in a layer in training mode) are replayed: the RNG state before each ``F``
and ``G`` call is kept (a few kB per call) and restored for the recomputation.

Rounding: ``x1 = (a − f)/λ`` multiplies the rounding error of ``a`` by ``1/λ`` (and ``x2`` by
``1/β``), once per coupling going down, so the reconstruction error grows roughly like
``(‖J‖/min(λ, β))ⁿ`` over ``n`` couplings. That is MEFT's known limit (the paper keeps only the
lower layers reversible for deep models); ``reversible_layers`` in the config does the same, and
MEFT's float64 streams with power-of-two scales make the rebuild exact over those layers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]
#: relative drift of the rebuilt inputs' norms above which the backward warns (exact rebuilds give 0)
DRIFT_WARNING = 1e-6


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay(state: tuple[torch.Tensor, torch.Tensor | None] | None, device: torch.device) -> Iterator[None]:
    """Run the block with the RNG as it was when ``state`` was taken (nothing to do for None)."""
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class Coupling:
    """One reversible coupling ``(x1, x2) → (β·x2 + G(a), a)`` with ``a = λ·x1 + F(x2)`` (``(a, b)`` when
    ``swap`` is False, MEFT3).

    ``params``: the trainable tensors ``F`` and ``G`` read (their gradients come back from
    :meth:`backward`). ``random``: whether ``F``/``G`` draw random numbers (dropout in training
    mode), so that their RNG state must be replayed when they are recomputed.
    """

    def __init__(self, f: Fn, g: Fn, lam: float, beta: float, params: list[torch.Tensor], random: bool,
                 swap: bool = True) -> None:
        self.f, self.g, self.lam, self.beta, self.swap = f, g, lam, beta, swap
        self.params = params
        self.random = random
        self.rng_f: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.rng_g: tuple[torch.Tensor, torch.Tensor | None] | None = None
        #: ‖x1‖², ‖x2‖² of the forward inputs (float64 scalars), kept by ReversibleStack to check the rebuild
        self.norms: torch.Tensor | None = None

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.random:
            self.rng_f = _rng_state(x2.device)
        a = self.f(x2) + self.lam * x1
        if self.random:
            self.rng_g = _rng_state(x2.device)
        b = self.g(a) + self.beta * x2
        return (b, a) if self.swap else (a, b)

    @torch.no_grad()
    def inverse(self, o1: torch.Tensor, o2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs ``(x1, x2)`` rebuilt from the outputs ``(o1, o2) = (b, a)`` (``(a, b)`` without swap)."""
        b, a = (o1, o2) if self.swap else (o2, o1)
        with _replay(self.rng_g, a.device):
            x2 = (b - self.g(a)) / self.beta
        with _replay(self.rng_f, a.device):
            x1 = (a - self.f(x2)) / self.lam
        return x1, x2

    def backward(self, o1: torch.Tensor, o2: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """``(x1, x2, ∂L/∂x1, ∂L/∂x2, ∂L/∂params)`` from the outputs and their gradients (in output order)."""
        b, a, db, da = (o1, o2, d1, d2) if self.swap else (o2, o1, d2, d1)
        n = len(self.params)
        with torch.enable_grad(), _replay(self.rng_g, a.device):
            a_in = a.detach().requires_grad_(True)
            g = self.g(a_in)
            grads_g = _grads(g, [a_in, *self.params], db)
        with torch.no_grad():
            da = da + grads_g[0] if grads_g[0] is not None else da
            x2 = (b - g.detach()) / self.beta
        del g
        with torch.enable_grad(), _replay(self.rng_f, a.device):
            x2_in = x2.detach().requires_grad_(True)
            f = self.f(x2_in)
            grads_f = _grads(f, [x2_in, *self.params], da)
        with torch.no_grad():
            x1 = (a - f.detach()) / self.lam
            dx2 = self.beta * db
            if grads_f[0] is not None:
                dx2 = dx2 + grads_f[0]
            dx1 = self.lam * da
        params: list[torch.Tensor | None] = []
        for i in range(n):
            gg, gf = grads_g[i + 1], grads_f[i + 1]
            params.append(gf if gg is None else (gg if gf is None else gg + gf))
        return x1, x2.detach(), dx1, dx2, params


class ReversibleStack(torch.autograd.Function):
    """The couplings of ``run`` as one autograd node that saves only the two final streams.

    ``apply(couplings, params, x1, x2, *params)``: ``params`` (also passed flat, so autograd routes
    their gradients) is every trainable tensor the couplings read, each once.
    """

    @staticmethod
    def forward(ctx: Any, couplings: list[Coupling], params: list[torch.Tensor], x1: torch.Tensor,
                x2: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for c in couplings:
            c.norms = _norms(x1, x2)
            x1, x2 = c.forward(x1, x2)
        ctx.couplings = couplings
        ctx.params = params
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d1: torch.Tensor | None, d2: torch.Tensor | None) -> tuple[Any, ...]:
        o1, o2 = ctx.saved_tensors
        d1 = torch.zeros_like(o1) if d1 is None else d1
        d2 = torch.zeros_like(o2) if d2 is None else d2
        index = {id(p): i for i, p in enumerate(ctx.params)}
        acc: list[torch.Tensor | None] = [None] * len(ctx.params)
        drift = []
        for c in reversed(ctx.couplings):
            o1, o2, d1, d2, grads = c.backward(o1, o2, d1, d2)
            drift.append(((_norms(o1, o2) - c.norms).abs() / c.norms.clamp_min(1e-300)).max())
            for p, g in zip(c.params, grads, strict=True):
                if g is not None:
                    i = index[id(p)]
                    acc[i] = g if acc[i] is None else acc[i] + g
        worst = float(torch.stack(drift).max()) if drift else 0.0  # one device sync per backward
        if worst > DRIFT_WARNING:
            warnings.warn(f"reversible backward: the layer inputs rebuilt from the outputs differ from the forward "
                          f"pass's (relative error of their norms up to {worst:.2e}), so the gradients are "
                          "approximate; make fewer layers reversible (MEFT: reversible_layers) or use a larger "
                          "scale / float64 streams", RuntimeWarning, stacklevel=2)
        return (None, None, d1, d2, *acc)  # the couplings (layer arguments, RNG states) go with the graph


def run_couplings(couplings: list[Coupling], x1: torch.Tensor, x2: torch.Tensor, reversible: int,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The streams after every coupling; the first ``reversible`` couplings through :class:`ReversibleStack`
    when gradients are wanted (the rest with ordinary autograd, which caches their activations)."""
    if need_grad and reversible > 0:
        head = couplings[:reversible]
        params = _unique([p for c in head for p in c.params])
        x1, x2 = ReversibleStack.apply(head, params, x1, x2, *params)
        couplings = couplings[reversible:]
    for c in couplings:
        x1, x2 = c.forward(x1, x2)
    return x1, x2


def _norms(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return torch.stack([x1.detach().double().pow(2).sum(), x2.detach().double().pow(2).sum()])


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """``(∂out/∂inputs)ᵀ grad`` (None where an input does not reach ``out``; all None for a constant)."""
    if not out.requires_grad:
        return (None,) * len(inputs)
    return torch.autograd.grad(out, inputs, grad, allow_unused=True)


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out
