"""Poly (Polytropon) and MHR (multi-head routing): task-routed inventories of LoRA modules.

Poly: Ponti et al. 2023 (arXiv:2202.13914); MHR: Caccia et al. 2023 (arXiv:2211.03831).

Each adapted linear layer (``y = W x + b``, ``W`` frozen) holds an inventory of ``m`` = ``n_skills``
LoRA pairs, split into ``h`` = ``n_splits`` heads (``h = 1``: Poly; ``h > 1``: MHR). Head ``q``
owns the slice ``x_q`` (``in/h`` features) of the input and the slice ``y_q`` (``out/h``) of the
output: ``A_{q,j} ∈ R^{(in/h)×r}``, ``B_{q,j} ∈ R^{r×(out/h)}``. A per-task routing table
``Z ∈ R^{n_tasks × (h·m)}`` (the logits, ``module_logits``) mixes the inventory per row of the
batch, from the row's task id ``t``:

    w_{q,·} = u_{q,·} / (Σ_j u_{q,j} + ε),   u = σ(Z_{t,q,·})                 (eval)
                                             u ~ RelaxedBernoulli(T=1, Z_{t,q,·})  (training, reparametrised)
    A_q = Σ_j w_{q,j} A_{q,j},   B_q = Σ_j w_{q,j} B_{q,j}
    y = W x + b + (1/r) · [Σ_q x_q A_q] · [B_1 | ... | B_h]

(the ``r`` columns are shared by the heads on the input side; each head writes its own output
slice). The inventory ``A, B`` and the routing ``Z`` train; ``W, b`` are frozen. At init ``A``
is Kaiming-uniform, ``B = 0`` (``init_weights=True``: the model is unchanged), ``Z ~ U(-1e-3, 1e-3)``.
These are the conventions of peft 0.21.2's ``PolyConfig`` (same tensors, same sampling), so files
move both ways. Task ids per row are given with ``with peftkit.task_ids(model, ids):`` (see
:mod:`peftkit.core.task_ids`); with ``n_tasks = 1`` they may be omitted (every row is task 0).
Not mergeable: the update depends on each row's task (and is sampled in training).

MHR's variants for few-shot adaptation (Caccia et al.): MHR-z trains only the routing over a frozen
inventory (``routing_only=True``: ``A, B`` are buffers); MHR-μ discards the routing and fine-tunes
the average ``(1/m) Σ_j`` of the inventory as one LoRA (:func:`average_to_lora`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from ..core.adapter import AdapterModule
from ..core.config import AdapterConfig, one_of, positive_int
from ..core.errors import ConfigError, PeftkitError
from ..core.layers import LINEAR, layer_info
from ..core.registry import register
from ..core.targets import ATTENTION_QV
from ..core.task_ids import current_task_ids
from ..formats.codec import HFCodec

POLY_TYPES = ("poly",)
EPS = 1e-12


@register
@dataclass
class Poly(AdapterConfig):
    """Poly/MHR: ``n_skills`` LoRAs of rank ``r`` per layer, mixed per task (``n_tasks``) by a learned
    relaxed-Bernoulli routing; ``n_splits > 1`` gives MHR (one routing per head). peft's ``PolyConfig``.

    ``routing_only=True`` is MHR-z: the inventory is frozen (kept as buffers) and only the routing trains;
    to start from a multi-task run: ``st = peftkit.read_adapters(path)[0]; st.config =
    st.config.replace(routing_only=True); peftkit.install(model, st, trainable=True)``.
    MHR-μ (fine-tune the inventory's average as one LoRA) is :func:`average_to_lora`.
    """

    method = "poly"
    family = "routed"
    paper = "Ponti et al. 2023 (arXiv:2202.13914); MHR: Caccia et al. 2023 (arXiv:2211.03831)"
    formula = "W x + (1/r)·x A(t) B(t), inventory mixed per task t; A, B, routing"
    supported_layers = (LINEAR,)
    default_targets = ATTENTION_QV
    mergeable = False

    r: int = 8
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    poly_type: str = "poly"
    init_weights: bool = True
    routing_only: bool = False

    def validate(self) -> None:
        owner = type(self).__name__
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            positive_int(owner, name, getattr(self, name))
        one_of(owner, "poly_type", self.poly_type, POLY_TYPES)

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        info = layer_info(base)
        for side, size in (("in_features", info.in_features), ("out_features", info.out_features)):
            if size % self.n_splits:
                divisors = [d for d in range(1, size + 1) if size % d == 0 and d <= 64]
                return (f"n_splits={self.n_splits} does not divide {side}={size} "
                        f"(valid splits for this layer include {divisors[-4:]})")
        return None

    def build(self, base: nn.Module, module_name: str) -> PolyLayer:
        return PolyLayer(self, base, module_name)


class PolyRouter(nn.Module):
    """The per-task routing logits ``module_logits`` ``(n_tasks, n_splits·n_skills)`` and their mixing weights."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int) -> None:
        super().__init__()
        self.n_splits, self.n_skills = n_splits, n_skills
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills))
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``w`` ``(rows, n_splits, n_skills)``: sampled (training) or σ (eval) logits, normalised per head."""
        logits = self.module_logits[ids.to(self.module_logits.device)].view(-1, self.n_splits, self.n_skills)
        if self.training:
            u = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            u = torch.sigmoid(logits)
        return u / (u.sum(dim=-1, keepdim=True) + EPS)


class PolyLayer(AdapterModule):
    """The inventory ``poly_lora_A`` ``(h, m, in/h, r)``, ``poly_lora_B`` ``(h, m, r, out/h)`` and the router."""

    mergeable = False
    unmergeable_reason = "poly mixes its LoRAs per row from the row's task id (and samples the mix in training)"

    def __init__(self, config: Poly, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        info = layer_info(base)
        self.module_name = module_name
        self.in_features, self.out_features = info.in_features, info.out_features
        self.r, self.n_tasks = config.r, config.n_tasks
        h, m, r = config.n_splits, config.n_skills, config.r
        a, b = torch.empty(h, m, self.in_features // h, r), torch.zeros(h, m, r, self.out_features // h)
        if config.routing_only:  # MHR-z: a frozen inventory (state, not parameters)
            self.register_buffer("poly_lora_A", a)
            self.register_buffer("poly_lora_B", b)
        else:
            self.poly_lora_A, self.poly_lora_B = nn.Parameter(a), nn.Parameter(b)
        self.poly_router = PolyRouter(config.n_tasks, h, m)
        self._init(config)

    @torch.no_grad()
    def _init(self, config: Poly) -> None:
        h, m = config.n_splits, config.n_skills
        for j in range(m):  # each (head, skill) pair like a LoRA A of shape (r, in/h), stored transposed
            for q in range(h):
                a = torch.empty(self.r, self.in_features // h)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.poly_lora_A[q, j] = a.t()
                if not config.init_weights:
                    b = torch.empty(self.out_features // h, self.r)
                    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
                    self.poly_lora_B[q, j] = b.t()

    def _row_task_ids(self, rows: int, site: Any) -> torch.Tensor:
        ids = current_task_ids(site)
        name = next((n for n, mod in site.adapters.items() if mod is self), "?")
        if ids is None:
            if self.n_tasks == 1:
                return torch.zeros(rows, dtype=torch.long)
            raise PeftkitError(f"adapter {name!r} (poly, at {self.module_name}) routes by task (n_tasks="
                               f"{self.n_tasks}) but no task ids were given: run the model inside "
                               "`with peftkit.task_ids(model, ids):` with one id per row")
        groups = site.row_groups
        if groups is not None and ids.shape[0] == len(groups[0]) != rows:  # mixed batch: this adapter's rows
            ids = ids[groups[1][name].cpu()]
        if ids.shape[0] != rows:
            raise PeftkitError(f"adapter {name!r} (poly, at {self.module_name}): peftkit.task_ids was given "
                               f"{ids.shape[0]} ids but the batch has {rows} rows")
        if int(ids.max()) >= self.n_tasks:
            raise PeftkitError(f"adapter {name!r} (poly, at {self.module_name}): task id {int(ids.max())} is out "
                               f"of range (n_tasks={self.n_tasks}: ids 0..{self.n_tasks - 1})")
        return ids

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        rows = x.shape[0]
        w = self.poly_router(self._row_task_ids(rows, site))  # (rows, h, m)
        A = torch.einsum("bqs,qsdr->bqdr", w, self.poly_lora_A).reshape(rows, self.in_features, self.r)
        B = torch.einsum("bqs,qsrd->bqrd", w, self.poly_lora_B).transpose(1, 2).reshape(rows, self.r, -1)
        xr = x.reshape(rows, -1, self.in_features).to(A.dtype)
        delta = xr.bmm(A).bmm(B) / self.r
        return y + delta.reshape(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return f"method=poly, r={c.r}, n_tasks={c.n_tasks}, n_skills={c.n_skills}, n_splits={c.n_splits}"


def average_to_lora(model: nn.Module, name: str = "default", new_name: str | None = None) -> str:
    """MHR-μ: attach a LoRA (rank ``r``, scale ``1/r``: ``alpha = 1``) that starts at the average of Poly adapter
    ``name``'s inventory, ``A = (1/m) Σ_j A_j``, ``B = (1/m) Σ_j B_j`` per head (heads laid side by side), i.e.
    Poly with uniform routing. Returns the new adapter's name (default ``"<name>_mu"``); it is trainable and
    active, the Poly adapter stays attached (delete it with ``peftkit.delete``)."""
    from ..core.api import attach, get_adapter
    from .lora import LoRA

    mods = get_adapter(model, name)
    first = next(iter(mods.values()))
    if not isinstance(first, PolyLayer):
        raise ConfigError(f"average_to_lora: adapter {name!r} is {first.config.method}, not poly")
    new_name = new_name or f"{name}_mu"
    attach(model, LoRA(r=first.r, alpha=1.0, target_modules=list(mods)), name=new_name)
    lora = get_adapter(model, new_name)
    with torch.no_grad():
        for path, mod in mods.items():
            a = mod.poly_lora_A.mean(1)  # (h, in/h, r): the skills averaged per head
            b = mod.poly_lora_B.mean(1)  # (h, r, out/h)
            lora[path].lora_A.copy_(a.reshape(-1, mod.r).t())
            lora[path].lora_B.copy_(b.transpose(0, 1).reshape(mod.r, -1).t())
    return new_name


# -- Hugging Face PEFT format (peft's PolyConfig) ----------------------------------------------
def _poly_to_hf(config: Poly) -> dict[str, Any]:
    return {"r": config.r, "n_tasks": config.n_tasks, "n_skills": config.n_skills, "n_splits": config.n_splits,
            "poly_type": config.poly_type, "init_weights": config.init_weights, "modules_to_save": None}


def _poly_from_hf(d: dict[str, Any]) -> Poly:
    return Poly(r=d.get("r", 8), n_tasks=d.get("n_tasks", 1), n_skills=d.get("n_skills", 4),
                n_splits=d.get("n_splits", 1), poly_type=d.get("poly_type", "poly"),
                init_weights=bool(d.get("init_weights", True)), target_modules=d.get("target_modules"))


Poly.hf_codec = HFCodec(
    peft_type="POLY",
    config_to_hf=lambda c, targets: _poly_to_hf(c),
    config_from_hf=_poly_from_hf,
    read_names={"poly_lora_A": "poly_lora_A", "poly_lora_B": "poly_lora_B",
                "poly_router.module_logits": "poly_router.module_logits"},
    options=frozenset({"r", "n_tasks", "n_skills", "n_splits", "poly_type", "init_weights", "modules_to_save"}),
)
