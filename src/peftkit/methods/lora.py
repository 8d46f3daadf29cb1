"""LoRA: low-rank adaptation (Hu et al., 2021, arXiv:2106.09685), with rsLoRA, PiSSA and MiLoRA initialisations.

For a frozen layer ``y = W x + b`` (``W ∈ R^{out×in}``; convolutions and embeddings through
their matrix view, see :mod:`peftkit.core.layers`) LoRA trains ``A ∈ R^{r×in}`` and
``B ∈ R^{out×r}``:

    y = W x + b + s · B A dropout(x),      s = alpha / r   (rsLoRA: s = alpha / √r, Kalajdzievski 2023)

and merges as ``W ← W + s B A``. ``W`` and ``b`` are frozen.

Initialisations (``init``):

* ``"default"`` — A Kaiming-uniform, B = 0 (embeddings: A = 0, B ~ N(0, 1), as peft), so the
  model is unchanged at step 0;
* ``"gaussian"`` — A ~ N(0, 1/r), B = 0;
* ``"pissa"`` — PiSSA (Meng et al., 2024, arXiv:2404.02948): with ``W = U S Vᵀ`` and the top-r
  triplets, ``A = diag(√(S_r/s)) V_rᵀ``, ``B = U_r diag(√(S_r/s))``, and the base keeps the
  residual ``W_res = W − s B A``; outputs are unchanged at step 0 and the principal
  directions are trained. ``"pissa_niter_N"`` uses a randomised SVD with N power iterations;
* ``"milora"`` — MiLoRA (Wang et al., 2024, arXiv:2406.09044): the same with the r *minor*
  singular triplets.

The random starting factor (A; B for embeddings) is drawn from a per-layer generator seeded with
``init_seed`` and the layer's name (:func:`peftkit.core.seeds.module_generator`). Left at None, the
seed is drawn from torch's global generator when the adapter is attached and recorded in the
config, so every saved adapter can regenerate its starting point: ComPEFT compresses the change
``A − A₀`` rather than ``A`` (:meth:`LoRA.initial_value`).

The PiSSA/MiLoRA starting factors are kept as buffers (``init_A``, ``init_B``) so that
unloading without merging restores the original ``W`` and saved files work on the original
base. :func:`lora_plus_param_groups` builds LoRA+ (Hayou et al., 2024, arXiv:2402.12354)
optimizer groups: the learning rate of B is ``ratio`` times that of A.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from ..core.config import LowRankOptions, probability
from ..core.errors import ConfigError
from ..core.layers import (
    CONV1D,
    CONV2D,
    EMBEDDING,
    HF_CONV1D,
    LINEAR,
    dense_tensor,
    dense_weight,
    is_quantized,
    layer_info,
    layer_kind,
)
from ..core.registry import register
from ..core.seeds import fresh_seed, module_generator
from ..core.targets import ATTENTION_QV
from ..formats.codec import HFCodec
from .lora_fused import FusedLoRALinear, QuantLoRALinear
from .svd_init import split_root, svd_triplets

try:
    from transformers.pytorch_utils import Conv1D as _HFConv1D

    _HF_CONV1D_FORWARD = _HFConv1D.forward
except Exception:  # pragma: no cover - transformers is optional
    _HF_CONV1D_FORWARD = None

INITS = ("default", "gaussian", "pissa", "milora")
RANDOM_INITS = ("default", "gaussian")


@torch.no_grad()
def random_factor_(t: torch.Tensor, init: str, r: int, embedding: bool, seed: int | None, module: str) -> None:
    """Fill LoRA's random starting factor in place: A (B for an embedding), from ``(seed, module)`` or,
    with ``seed=None``, from torch's global generator."""
    g = module_generator(seed, module) if seed is not None else None
    if embedding:
        nn.init.normal_(t, generator=g)
    elif init == "gaussian":
        nn.init.normal_(t, std=1.0 / r, generator=g)
    else:
        nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)


@register
@dataclass
class LoRA(LowRankOptions):
    """Low-rank adaptation ``W + s·B A``: ``r`` the rank, ``alpha`` the scale numerator.

    ``rank_pattern`` / ``alpha_pattern`` map module-name patterns (names, suffixes or regular
    expressions, peft's rule) to a per-module rank / alpha.
    """

    method = "lora"
    family = "low-rank"
    paper = "Hu et al. 2021 (arXiv:2106.09685); rsLoRA, PiSSA, MiLoRA, LoRA+"
    formula = "W x + s·B A x; A, B"
    supported_layers = (LINEAR, HF_CONV1D, CONV1D, CONV2D, EMBEDDING)
    default_targets = ATTENTION_QV
    supports_quantized_base = True

    dropout: float = 0.0
    init: str = "default"
    init_seed: int | None = None

    def resolve(self, model: nn.Module, module_names: list[str]) -> LoRA:
        if self.init_seed is None and self.init in RANDOM_INITS:
            return self.replace(init_seed=fresh_seed())
        return self

    def initial_value(self, module: str, tensor: str, shape: tuple[int, ...],
                      facts: dict[str, Any]) -> torch.Tensor | float | None:
        """``A₀`` (``B₀`` for embeddings) regenerated from ``init_seed``; 0 for the zero-initialised factor."""
        if self.init not in RANDOM_INITS or tensor not in ("lora_A", "lora_B"):
            return None
        embedding = facts.get("kind") == EMBEDDING
        if (tensor == "lora_B") != embedding:
            return 0.0
        if self.init_seed is None:
            return None
        t = torch.empty(shape)
        random_factor_(t, self.init, self.rank_for(module), embedding, self.init_seed, module)
        return t

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        probability(owner, "dropout", self.dropout)
        if not (self.init in INITS or re.fullmatch(r"pissa_niter_\d+", str(self.init))):
            from ..core.errors import did_you_mean

            raise ConfigError(f"{owner}: init={self.init!r} is not one of {', '.join(INITS)} or 'pissa_niter_N'"
                              f"{did_you_mean(str(self.init), INITS)}")

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        reason = super().check_layer(base, module_name)
        if reason:
            return reason
        kind = layer_kind(base)
        if kind in (CONV1D, CONV2D):
            if base.groups != 1:
                return f"grouped convolutions (groups={base.groups}) are not supported by {self.method}"
            if base.padding_mode != "zeros":
                return f"padding_mode={base.padding_mode!r} is not supported by {self.method}"
        if str(self.init).startswith(("pissa", "milora")) and kind not in (LINEAR, HF_CONV1D):
            return f"init={self.init!r} needs a linear layer, not {type(base).__name__}"
        if str(self.init).startswith(("pissa", "milora")) and is_quantized(base.weight):
            return (f"init={self.init!r} rewrites the base weight, which is quantized here; "
                    "use init='default' or peftkit.quant.loftq for a quantized base")
        return rank_too_large(self.rank_for(module_name), base)

    def build(self, base: nn.Module, module_name: str) -> LoRALayer:
        return LoRALayer(self, base, module_name)


def max_rank(base: nn.Module) -> int:
    w = base.weight
    if layer_kind(base) in (CONV1D, CONV2D):
        return min(w.shape[0], w[0].numel())
    return min(w.shape[0], w.shape[1])


def rank_too_large(r: int, base: nn.Module, limit: int | None = None) -> str | None:
    """The refusal of a rank above what the layer allows (``limit``, default :func:`max_rank`); None when it fits."""
    limit = max_rank(base) if limit is None else limit
    if r > limit:
        return f"rank {r} is larger than the layer allows ({limit} = min(out, in) of its {tuple(base.weight.shape)} weight)"
    return None


class LoRALayer(AdapterModule):
    """``Δ(x) = s · B A x`` on one layer. Parameters ``lora_A`` ``(r, in[, *k])`` and ``lora_B`` ``(out, r[, 1...])``."""

    def __init__(self, config: LoRA, base: nn.Module, module_name: str) -> None:
        super().__init__(config, base)
        self.kind = layer_kind(base)
        info = layer_info(base)
        self.r = r = config.rank_for(module_name)
        self.scaling = config.scale_for(module_name)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        w = base.weight
        if self.kind in (CONV1D, CONV2D):
            k = tuple(w.shape[2:])
            self.lora_A = nn.Parameter(torch.empty(r, info.in_features, *k))
            self.lora_B = nn.Parameter(torch.zeros(info.out_features, r, *([1] * len(k))))
        else:
            self.lora_A = nn.Parameter(torch.empty(r, info.in_features))
            self.lora_B = nn.Parameter(torch.zeros(info.out_features, r))
        self._init(config, base, module_name)

    @torch.no_grad()
    def _init(self, config: LoRA, base: nn.Module, module_name: str) -> None:
        init = str(config.init)
        if init.startswith(("pissa", "milora")) and self.kind != EMBEDDING:
            self._svd_init(init, base)
            return
        embedding = self.kind == EMBEDDING
        if embedding:
            nn.init.zeros_(self.lora_A)
        random_factor_(self.lora_B if embedding else self.lora_A, init, self.r, embedding, config.init_seed, module_name)

    @torch.no_grad()
    def _svd_init(self, init: str, base: nn.Module) -> None:
        w = self.matrix(base)
        if init.startswith("pissa_niter_"):
            triplets = svd_triplets(w, self.r, "top", niter=int(init.rsplit("_", 1)[-1]))
        else:
            triplets = svd_triplets(w, self.r, "top" if init == "pissa" else "bottom")
        self.set_svd_factors(*triplets)

    @torch.no_grad()
    def set_svd_factors(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        """Start from the triplets ``U diag(s) Vᵀ`` (``s·B A`` equals them) and keep them as ``init_A``/``init_B``:
        the base keeps the residual ``W − s B₀ A₀`` while attached (PiSSA, MiLoRA, CorDA)."""
        a, b = split_root(u, s, vh, self.scaling)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.register_buffer("init_A", self.lora_A.detach().clone())
        self.register_buffer("init_B", self.lora_B.detach().clone())
        self.optional_state = ("init_A", "init_B")  # a peft file omits them: the SVD just made gives them

    # -- forward ---------------------------------------------------------------------
    def adapt_output(self, x: torch.Tensor, y: torch.Tensor, base_out: Any, site: Any) -> torch.Tensor:
        A, B = self.lora_A, self.lora_B
        if self.kind == EMBEDDING:
            base = site.base
            h = F.embedding(x, A.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            return _add_scaled(y, h, B, self.scaling)
        x = self.dropout(x)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.kind in (CONV1D, CONV2D):
            base = site.base
            conv = F.conv2d if self.kind == CONV2D else F.conv1d
            h = conv(x, A, None, base.stride, base.padding, base.dilation)
            delta = conv(h, B) * self.scaling
            return y + delta.to(y.dtype)
        return _add_scaled(y, F.linear(x, A), B, self.scaling)

    def fused_forward(self, x: torch.Tensor, site: Any) -> torch.Tensor | None:
        """Base + low-rank path as one autograd node (:mod:`peftkit.methods.lora_fused`) for a plain
        linear layer with the adapter's dtype and no active dropout; None otherwise."""
        base = site.base
        if is_quantized(base.weight):
            return self._quantized_forward(x, base)
        if type(base) is not nn.Linear and not (self.kind == HF_CONV1D and type(base).forward is _HF_CONV1D_FORWARD):
            return None
        if self.training and not isinstance(self.dropout, nn.Identity):
            return None
        A = self.lora_A
        if x.dtype != A.dtype or base.weight.dtype != A.dtype or x.device != A.device:
            return None
        return FusedLoRALinear.apply(x, base.weight, base.bias, A, self.lora_B, self.scaling, self.kind == HF_CONV1D)

    def _quantized_forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """QLoRA: one node that keeps only the quantized weight for backward (None: general path)."""
        if type(base) is not nn.Linear or (self.training and not isinstance(self.dropout, nn.Identity)):
            return None
        if x.device != self.lora_A.device:
            return None
        return QuantLoRALinear.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling, dense_tensor)

    # -- merging ---------------------------------------------------------------------
    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        if is_quantized(base.weight):  # re-quantize W + ΔW; the error is recorded (peftkit.quant.merge_errors)
            from ..core.requant import merge_dense

            w = dense_weight(base)
            merge_dense(self, base, w + self.delta_weight(base).to(w.dtype))
            return
        super().merge_into(base)

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        from ..core.requant import unmerge

        if not unmerge(self, base):
            super().unmerge_from(base)

    def delta_matrix(self) -> torch.Tensor:
        """``s · B A`` as an ``(out, in_flat)`` matrix (``in_flat`` = in·k for convolutions)."""
        a = self.lora_A.reshape(self.r, -1)
        b = self.lora_B.reshape(self.lora_B.shape[0], self.r)
        return (b @ a) * self.scaling

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.unmatrix(base, self.delta_matrix())

    @torch.no_grad()
    def on_attach(self, model: nn.Module, site: Any) -> None:
        if hasattr(self, "init_A"):  # PiSSA/MiLoRA: the base keeps the residual W − s B₀ A₀
            w = site.base.weight
            w.data -= self.unmatrix(site.base, (self.init_B @ self.init_A) * self.scaling).to(w.dtype)

    @torch.no_grad()
    def restore_base(self, base: nn.Module) -> None:
        if hasattr(self, "init_A"):
            w = base.weight
            w.data += self.unmatrix(base, (self.init_B @ self.init_A) * self.scaling).to(w.dtype)

    # -- mixed batches: every row's adapter in one batched product -------------------------
    @classmethod
    def gathered_output(cls, site: Any, names_per_row: list[str | None], x: torch.Tensor,
                        base_out: torch.Tensor) -> torch.Tensor | None:
        """``y_i = base_i + s_{a(i)} B_{a(i)} A_{a(i)} x_i`` for all rows at once (None: not applicable).

        Two batched products over the stacked factors, whatever the number of adapters
        (:mod:`peftkit.methods.lora_gather`; ranks may differ, the stacks are cached for inference).
        """
        from ..core.site import ROW_GROUPS
        from .lora_gather import build_stack, cached_stack, gathered_lora, row_factors

        if not isinstance(base_out, torch.Tensor):
            return None
        rg = ROW_GROUPS.get()
        memo = rg.memo if rg is not None else {}
        wanted = memo.get("lora_wanted")
        if wanted is None:
            wanted = memo["lora_wanted"] = [n for n in dict.fromkeys(names_per_row) if n is not None]
        own = site.adapters._modules
        here = [n for n in wanted if n in own]  # adapters of other modules give these rows nothing here
        if not here:
            return None
        ref = own[here[0]]
        dtype, device = ref.lora_A.dtype, ref.lora_A.device

        def fits(m: Any) -> bool:
            return (type(m) is cls and m.kind in (LINEAR, HF_CONV1D) and m.lora_A.dtype == dtype
                    and m.lora_A.device == device and m.lora_B.dtype == dtype)

        def dropping(m: Any) -> bool:
            return m.training and not isinstance(m.dropout, nn.Identity)

        if not fits(ref):
            return None

        grad = torch.is_grad_enabled() and any(p.requires_grad for n in here for p in own[n].parameters())
        if grad:  # gradients reach the factors through a stack built for this call
            mods = {n: own[n] for n in here}
            if not all(fits(m) and not dropping(m) for m in mods.values()):
                return None
            stack = build_stack(mods)
        else:  # inference: every fitting adapter of the site, cached while the site's adapters are unchanged
            stack = cached_stack(site, lambda: build_stack(
                {n: m for n, m in site.adapters.items() if n not in site.merged and fits(m)}))
            index = set(stack.names)
            if any(n not in index or dropping(own[n]) for n in here):
                return None
        a, b = row_factors(site, stack, names_per_row, memo, x.device, keep=not grad)
        return gathered_lora(a, b, x, base_out)


def _add_scaled(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``y + scaling · h Bᵀ`` as one fused ``addmm`` (no separate scale and add passes)."""
    if y.dtype != h.dtype:
        return y + (F.linear(h, B) * scaling).to(y.dtype)
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(), alpha=scaling)
    return out.view(y.shape)


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                           lr_embedding: float = 1e-6, name: str | None = None) -> list[dict[str, Any]]:
    """LoRA+ optimizer parameter groups: ``lora_B`` (and 1-D adapter vectors) at ``lr · ratio``, the rest at ``lr``.

    Embedding adapters get ``lr_embedding`` (peft's ``create_loraplus_optimizer`` grouping).
    Only trainable adapter parameters are included. Pass the result to any torch optimizer.
    """
    from ..core.model import iter_sites

    if ratio <= 0:
        raise ConfigError(f"LoRA+ ratio must be positive, got {ratio}")
    group_a, group_b, group_b_nodecay, group_emb = [], [], [], []
    for _, site in iter_sites(model):
        for n, mod in site.adapters.items():
            if name is not None and n != name:
                continue
            for pname, p in mod.named_parameters():
                if not p.requires_grad:
                    continue
                if getattr(mod, "kind", None) == EMBEDDING:
                    group_emb.append(p)
                elif p.ndim == 1:
                    group_b_nodecay.append(p)
                elif pname.endswith("lora_B"):
                    group_b.append(p)
                else:
                    group_a.append(p)
    groups = [
        {"params": group_a, "lr": lr, "weight_decay": weight_decay},
        {"params": group_emb, "lr": lr_embedding, "weight_decay": weight_decay},
        {"params": group_b, "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": group_b_nodecay, "lr": lr * ratio, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# -- Hugging Face PEFT format ------------------------------------------------------------------
def _hf_write_names(layer: dict[str, Any]) -> dict[str, str]:
    if layer.get("kind") == EMBEDDING:
        return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
    return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}


HF_READ_NAMES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B",
                 "lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}
#: peft LoraConfig keys that LoRA and DoRA read (the others must be switched off; see HFCodec.unsupported)
HF_OPTIONS = frozenset({"r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "rank_pattern",
                        "alpha_pattern", "bias", "use_dora", "fan_in_fan_out", "layers_to_transform", "layers_pattern",
                        "qalora_group_size", "megatron_core", "megatron_config",
                        # only read with init_lora_weights="corda" (refused below); a converted CorDA file keeps it
                        "corda_config"})

_UNSUPPORTED_HF = {"lora_bias": False, "use_qalora": False}


def lora_options_from_hf(d: dict[str, Any], owner: str) -> dict[str, Any]:
    """The LoRA options shared by LoRA and DoRA, from a peft ``LoraConfig`` dict."""
    for key, ok in _UNSUPPORTED_HF.items():
        if d.get(key, ok) not in (ok, None, False, [], {}):
            raise ConfigError(f"peft option {key}={d[key]!r} is not supported by peftkit's {owner}")
    if d.get("bias", "none") != "none":
        raise ConfigError(f"peft option bias={d['bias']!r} is not supported by peftkit's {owner}; use 'none'")
    init = d.get("init_lora_weights", True)
    if init is True or init is False:
        init = "default"
    elif isinstance(init, str) and init.startswith(("pissa", "milora", "gaussian")):
        init = init
    elif isinstance(init, str) and init.startswith(("corda", "olora")):
        raise ConfigError(f"peft init_lora_weights={init!r}: this file holds factors relative to a rewritten base; "
                          "save it from peft with path_initial_model_for_weight_conversion=... to get a plain LoRA "
                          "file on the original base, which peftkit loads")
    else:
        raise ConfigError(f"peft init_lora_weights={init!r} is not supported by peftkit's {owner}")
    return {
        "r": d.get("r", 8),
        "alpha": d.get("lora_alpha", 8),
        "dropout": d.get("lora_dropout") or 0.0,
        "use_rslora": d.get("use_rslora", False),
        "init": init,
        "rank_pattern": d.get("rank_pattern") or {},
        "alpha_pattern": d.get("alpha_pattern") or {},
        "target_modules": d.get("target_modules"),
    }


def lora_options_to_hf(config: LoRA) -> dict[str, Any]:
    out: dict[str, Any] = {
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
    }
    if str(config.init).startswith(("pissa", "milora")):
        # exported relative to the original base: s·B A − s·B₀ A₀ = s·[B, −B₀][A; A₀], rank 2r
        grow = math.sqrt(2.0) if config.use_rslora else 2.0
        out["r"] = 2 * config.r
        out["lora_alpha"] = config.alpha * grow
        out["rank_pattern"] = {k: 2 * v for k, v in config.rank_pattern.items()}
        out["alpha_pattern"] = {k: v * grow for k, v in config.alpha_pattern.items()}
        for k in config.rank_pattern:  # a pattern rank without alpha pattern: keep its scale
            out["alpha_pattern"].setdefault(k, config.alpha_pattern.get(k, config.alpha) * grow)
        out["init_lora_weights"] = True
    return out


def lora_export(state: dict[str, torch.Tensor], layer: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A layer's LoRA factors as peft stores them (PiSSA/MiLoRA: relative to the original base, rank 2r)."""
    if "init_A" not in state:
        return {"lora_A": state["lora_A"], "lora_B": state["lora_B"]}
    a = torch.cat([state["lora_A"], state["init_A"]], 0)
    b = torch.cat([state["lora_B"], -state["init_B"]], 1)
    return {"lora_A": a, "lora_B": b}


LoRA.hf_codec = HFCodec(
    peft_type="LORA",
    accepts=lambda d: not d.get("use_dora", False),
    config_to_hf=lambda c, targets: lora_options_to_hf(c),
    config_from_hf=lambda d: LoRA(**lora_options_from_hf(d, "LoRA")),
    read_names=HF_READ_NAMES,
    write_names=_hf_write_names,
    options=HF_OPTIONS,
    export=lora_export,
)
