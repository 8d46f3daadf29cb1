"""MEFT activation memory: bytes kept for backward, MEFT vs LoRA (same adapter budget) and full fine-tuning.

SmolLM2-135M (causal LM, alias smollm2-135m, 30 layers) and all-MiniLM-L6-v2 (sequence classification,
alias minilm-l6, 6 layers), batch 2×128, one training forward + loss + backward, 2 threads. All figures
are byte counts, deterministic (no timing), so one run gives them:

* ``saved``: the bytes autograd keeps for backward (``saved_tensors_hooks``, storages counted once, weights
  excluded) — the activation memory MEFT removes;
* ``peak``: the largest total of torch's live allocations during forward, loss and backward, weights
  excluded (``peftkit.memory.LiveMemory``) — includes the recomputation in MEFT's backward.

Rows: LoRA on q/v with the rank that gives about MEFT's trainable-parameter count; full fine-tuning;
MEFT1 with ordinary autograd (``reversible_layers=0``, the same coupling caching everything); MEFT1 with
its default (the lowest layers whose inputs float64 streams rebuild exactly, see ``exact_layers``);
MEFT1 with every layer reversible; MEFT2 and MEFT3 with their defaults. For MEFT rows also: how many layers are reversible and the
reconstruction error over them (``reconstruction_error``: 0 = bit-exact, so the gradients equal
ordinary autograd's). Then the start point for λ = 2^-1, 2^-3 (the default), 2^-5, 2^-8 (forward only):
the relative distance of the last hidden state from the PLM's, the KL divergence of the output
distribution from the PLM's (per token, or per row for the classifier), the share of positions
whose top-1 prediction is the PLM's, and how many layers the float64 streams rebuild exactly at
that λ (``exact_layers``).

    python benchmarks/meft_memory.py [--models smollm2-135m,minilm-l6] [--rows 2] [--length 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import _common as C
import torch

import peftkit
from peftkit.memory import LiveMemory
from peftkit.methods.meft import MEFT, exact_layers, reconstruction_error


def load(alias: str):
    from transformers.utils import logging as hf_logging

    from peftkit.hub.models import load_causal_lm, load_encoder

    hf_logging.set_verbosity_error()
    if alias == "minilm-l6":
        model, _ = load_encoder(alias, num_labels=2)
    else:
        model, _ = load_causal_lm(alias)
        model.config.use_cache = False
    return model.eval()


def batch_for(model, rows: int, length: int) -> dict[str, torch.Tensor]:
    b = C.token_batch(rows, length, min(model.config.vocab_size, 30000))
    if model.config.model_type == "bert":
        b["labels"] = torch.arange(rows) % 2
    return b


def step_bytes(model, batch) -> tuple[int, int]:
    """(saved bytes, peak live bytes) of one forward + loss + backward."""
    model.train()
    saved = C.saved_activation_bytes(lambda: model(**batch).loss, model)
    model.zero_grad(set_to_none=True)
    with LiveMemory() as mem:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return saved, mem.peak


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trunk(model):
    """The transformer without its head (its output is the final hidden state)."""
    return model.bert if model.config.model_type == "bert" else model.model


def lora_rank_for(model, budget: int, targets: list[str]) -> int:
    per_rank = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            per_rank += m.in_features + m.out_features
    return max(1, round(budget / per_rank))


def run_model(alias: str, rows: int, length: int) -> dict[str, float]:
    base = load(alias)
    batch = batch_for(base, rows, length)
    plain_inputs = {k: v for k, v in batch.items() if k != "labels"}
    is_bert = base.config.model_type == "bert"
    with torch.no_grad():
        y0 = base(**plain_inputs).logits
        h0 = trunk(base)(**plain_inputs).last_hidden_state
    qv = ["query", "value"] if is_bert else ["q_proj", "v_proj"]
    out: dict[str, float] = {}

    meft_rows = {"meft1 ordinary autograd": MEFT(reversible_layers=0), "meft1 default": MEFT(),
                 "meft1 all layers reversible": MEFT(reversible_layers=base.config.num_hidden_layers),
                 "meft2 default": MEFT(variant=2), "meft3 default": MEFT(variant=3)}
    budget = None
    for label, cfg in meft_rows.items():
        model = copy.deepcopy(base)
        peftkit.attach(model, cfg)
        out[f"{alias} {label}: trainable params"] = trainable(model)
        if label == "meft1 default":
            budget = trainable(model)  # LoRA gets MEFT1's budget
        stack = model.bert.encoder.layer if is_bert else model.model.layers
        n = len(stack)
        k = cfg.reversible_layers if cfg.reversible_layers is not None else \
            exact_layers(cfg.resolve(model, []), list(range(n)), torch.float64, stack)
        model.eval()
        err = reconstruction_error(model, plain_inputs, layers=k) if k else 0.0
        saved, peak = step_bytes(model, batch)
        out.update({f"{alias} {label}: saved MB": saved / C_MB, f"{alias} {label}: peak MB": peak / C_MB,
                    f"{alias} {label}: reversible layers": k, f"{alias} {label}: reconstruction error": err})
        del model
    for lam in (2.0**-1, 2.0**-3, 2.0**-5, 2.0**-8):
        model = copy.deepcopy(base)
        cfg = MEFT(lam=lam)
        peftkit.attach(model, cfg)
        stack = model.bert.encoder.layer if is_bert else model.model.layers
        with torch.no_grad():
            y = model(**plain_inputs).logits
            h = trunk(model)(**plain_inputs).last_hidden_state
        kl = torch.nn.functional.kl_div(y.log_softmax(-1), y0.log_softmax(-1), log_target=True, reduction="none")
        tag = f"{alias} start at λ=2^{round(math.log2(lam))}"
        out.update({f"{tag}: |h - h_PLM| / |h_PLM| (last hidden state)": float((h - h0).norm() / h0.norm()),
                    f"{tag}: KL(PLM || MEFT) per position": float(kl.sum(-1).mean()),
                    f"{tag}: top-1 agreement with PLM": float((y.argmax(-1) == y0.argmax(-1)).float().mean()),
                    f"{tag}: exact reversible layers": exact_layers(cfg.resolve(model, []), list(range(len(stack))),
                                                                    torch.float64, stack)})
        del model

    r = lora_rank_for(base, budget, qv)
    model = copy.deepcopy(base)
    peftkit.attach(model, peftkit.LoRA(r=r, alpha=2 * r, target_modules=qv))
    saved, peak = step_bytes(model, batch)
    out.update({f"{alias} lora r={r} q/v: saved MB": saved / C_MB, f"{alias} lora r={r} q/v: peak MB": peak / C_MB,
                f"{alias} lora trainable params": trainable(model)})
    lora_saved, lora_peak = saved, peak
    del model

    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    full_saved, full_peak = step_bytes(model, batch)
    out.update({f"{alias} full FT: saved MB": full_saved / C_MB, f"{alias} full FT: peak MB": full_peak / C_MB})
    del model

    for label in meft_rows:
        s, p = out[f"{alias} {label}: saved MB"] * C_MB, out[f"{alias} {label}: peak MB"] * C_MB
        out[f"{alias} {label} / lora: saved"] = s / lora_saved
        out[f"{alias} {label} / lora: peak"] = p / lora_peak
        out[f"{alias} {label} / full FT: saved"] = s / full_saved
    return out


C_MB = 1024 * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,minilm-l6")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    C.setup()
    res: dict[str, float] = {}
    for alias in a.models.split(","):
        res.update(run_model(alias, a.rows, a.length))
    C.report(f"MEFT activation memory, batch {a.rows}x{a.length}", [
        (k, f"{v:.3g}" if isinstance(v, float) else str(v)) for k, v in res.items()])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
