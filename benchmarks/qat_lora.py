"""Quantization-aware LoRA (L4Q, LR-QAT) against LoRA followed by round-to-nearest, SmolLM2-135M, 4 bits.

Every side quantizes the same layers (every linear layer of the blocks) to the same grid: signed
``--bits`` integers, one step size per ``--group-size`` inputs (absmax / qmax at the start). The
sides, each trained ``--steps`` AdamW steps (lr ``--lr``) on the same GSM8K training batches
(question + answer, ``--length`` tokens, plain LM loss), r=16 alpha=32:

* ``lora+rtn``: LoRA on the float32 model, merged, then round-to-nearest (post-training quantization);
* ``l4q``: L4Q (LoRA + LSQ step sizes, quantized in the forward), exported to integers;
* ``lrqat``: LR-QAT (Φ0 in int8 fixed point), exported to integers.

The QAT step sizes train at ``--scale-lr`` (default ``lr / 100``, as :func:`peftkit.qat_param_groups`).

Printed: the mean LM loss on ``--eval-batches`` held-out batches (GSM8K test) of the float32 base,
of the base quantized by round-to-nearest, of the LoRA before quantization and of each quantized
side, the ratios against ``lora+rtn``, and the median step time of each side (informational: a
QAT step forms every quantized weight, a LoRA step does not).

    PYTHONPATH=src python benchmarks/qat_lora.py --data ../shared/data/gsm8k [--steps 30] [--bits 4]

With the defaults (30 steps, 4 × 64 tokens, 2 threads) the run takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common as C
import torch

import peftkit
from peftkit.methods.fakequant import grid, grouped, init_scale
from peftkit.quant import QuantizedLinear, export_quantized


@torch.no_grad()
def round_to_nearest(model: torch.nn.Module, bits: int, group: int) -> torch.nn.Module:
    """Post-training quantization of every block linear layer: ``s · clamp(round(W/s))``, absmax step sizes."""
    qmin, qmax = grid(bits)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in C.BLOCK_LINEARS:
            w = m.weight.float()
            g = group or w.shape[1]
            s = init_scale(w, g, bits).unsqueeze(-1)
            m.weight.copy_((s * torch.clamp(torch.round(grouped(w, g) / s), qmin, qmax)).reshape(w.shape))
    return model


def train(model: torch.nn.Module, data: list[dict[str, torch.Tensor]], lr: float, label: str,
          scale_lr: float | None = None) -> list[float]:
    params = peftkit.adapter_parameters(model)
    steps = [p for n, p in params.items() if n.endswith(".scale")]
    rest = [p for n, p in params.items() if not n.endswith(".scale")]
    groups = [{"params": rest, "lr": lr}] + ([{"params": steps, "lr": scale_lr or lr / 100}] if steps else [])
    opt = torch.optim.AdamW(groups, lr=lr)
    model.train()
    times = []
    for i, b in enumerate(data):
        t = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        if (i + 1) % 10 == 0 or i + 1 == len(data):
            print(f"  {label} step {i + 1}: loss {loss.item():.4f}, {statistics.median(times):.2f} s/step", flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/gsm8k")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lrqat-lr", type=float, default=None,
                    help="LR-QAT's learning rate (default --lr); its update is in grid units, so it wants a larger one")
    ap.add_argument("--scale-lr", type=float, default=None,
                    help="learning rate of the QAT step sizes (default: the side's lr / 100, as peftkit.qat_param_groups); "
                         "Adam moves every step size by about lr per step, and they are ~0.01")
    ap.add_argument("--sides", default="lora+rtn,l4q,lrqat")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peftkit.hub.models import load_causal_lm

    base, tok = load_causal_lm("smollm2-135m")
    base = base.float().eval()
    base.config.use_cache = False
    train_data = C.gsm8k_batches(f"{args.data}/train.jsonl", tok, args.steps, args.rows, args.length)
    held_out = C.gsm8k_batches(f"{args.data}/test.jsonl", tok, args.eval_batches, args.rows, args.length)
    res: dict[str, float] = {"base_fp32": C.eval_loss(base, held_out)}
    res["base_rtn"] = C.eval_loss(round_to_nearest(copy.deepcopy(base), args.bits, args.group_size), held_out)
    print(f"held-out loss: base fp32 {res['base_fp32']:.4f}, base RTN {args.bits}-bit {res['base_rtn']:.4f}", flush=True)
    step_s: dict[str, float] = {}
    for side in args.sides.split(","):
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        if side == "lora+rtn":
            peftkit.attach(model, peftkit.LoRA(r=16, alpha=32, target_modules=C.BLOCK_LINEARS))
            step_s[side] = statistics.median(train(model, train_data, args.lr, side))
            res["lora_fp32"] = C.eval_loss(model, held_out)
            peftkit.unload(model, merge=True)
            round_to_nearest(model, args.bits, args.group_size)
        elif side in ("l4q", "lrqat"):
            cls = peftkit.L4Q if side == "l4q" else peftkit.LRQAT
            peftkit.attach(model, cls(r=16, alpha=32, bits=args.bits, group_size=args.group_size,
                                      target_modules=C.BLOCK_LINEARS))
            res[f"{side}_init"] = C.eval_loss(model, held_out)
            lr = args.lrqat_lr if side == "lrqat" and args.lrqat_lr else args.lr
            step_s[side] = statistics.median(train(model, train_data, lr, side, args.scale_lr))
            export_quantized(model)
            assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 7 * len(model.model.layers)
        else:
            raise SystemExit(f"unknown side {side!r}; choose from lora+rtn, l4q, lrqat")
        res[side] = C.eval_loss(model, held_out)
        print(f"{side}: held-out loss {res[side]:.4f} after {args.steps} steps ({args.bits}-bit weights)", flush=True)
        del model
    print(json.dumps({k: round(v, 4) for k, v in res.items()}))
    ref = res.get("lora+rtn")
    for side in ("l4q", "lrqat"):
        if side in res and ref is not None:
            print(f"held-out loss {side}/lora+rtn: {res[side] / ref:.4f} ({res[side]:.4f} vs {ref:.4f}); "
                  f"step time {side}/lora: {step_s[side] / step_s['lora+rtn']:.2f}")


if __name__ == "__main__":
    main()
