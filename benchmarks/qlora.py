"""QLoRA (NF4 base) against LoRA on a bfloat16 base, SmolLM2-135M-Instruct, one process.

Both sides: the same bf16 weights (the NF4 side quantizes them), LoRA r=16 alpha=32 on every block
linear (float32 adapters), AdamW lr 1e-3, the same batches (GSM8K training questions + answers cut
to ``--length`` tokens, plain LM loss), ``--steps`` steps. Printed: weight bytes (all, and the
quantized linear layers' share), the torch peak of one training step measured by
``peftkit.memory_report(measure=True)``, the mean training loss of the last 10 steps, the loss on
``--held-out`` fixed GSM8K test batches before and after training, and the ratios NF4 / bf16. A third
side, ``nf4+loftq``, quantizes with LoftQ (``peftkit.quant.loftq``, ``--loftq-iters``): the adapter
starts at the rank-r fit of the quantization residual instead of B = 0.

    PYTHONPATH=src python benchmarks/qlora.py --data ../shared/data/gsm8k [--steps 100] [--length 64]
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
from peftkit import quant
from peftkit.memory import weight_bytes

MB = 2**20


def linear_weight_bytes(model: torch.nn.Module) -> int:
    return sum(quant.storage_bytes(m.weight) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n)


def run(base: torch.nn.Module, scheme: str | None, data: list[dict[str, torch.Tensor]],
        held_out: list[dict[str, torch.Tensor]], loftq_iters: int = 5) -> dict:
    model = copy.deepcopy(base)
    cfg = peftkit.LoRA(r=16, alpha=32, target_modules="all-linear")
    if scheme == "nf4+loftq":  # the adapter starts at LoftQ's rank-r fit of the quantization residual
        peftkit.attach(model, cfg)
        quant.loftq(model, "nf4", iters=loftq_iters)
        lin = linear_weight_bytes(model)
    else:
        if scheme:
            quant.quantize(model, scheme)
        lin = linear_weight_bytes(model)
        peftkit.attach(model, cfg)
        for n, p in peftkit.adapter_parameters(model).items():  # the same adapter start on both sides
            g = torch.Generator().manual_seed(hash(n) % 2**31)
            with torch.no_grad():
                if n.endswith("lora_A"):
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    torch.manual_seed(0)
    start = C.eval_loss(model, held_out)
    rep = peftkit.memory_report(model, data[0], measure=True)
    print(f"  {scheme or 'bf16'}: weights {weight_bytes(model)[0] / MB:.1f} MB (linear layers {lin / MB:.1f} MB), "
          f"step peak measured {rep.measured_peak / MB:.1f} MB, estimated {rep.estimated_peak / MB:.1f} MB", flush=True)
    opt = torch.optim.AdamW(peftkit.adapter_parameters(model).values(), lr=1e-3)
    model.train()
    losses, times = [], []
    for b in data:
        t = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            print(f"  {scheme or 'bf16'} step {len(losses)}: loss {statistics.mean(losses[-10:]):.4f}, "
                  f"{statistics.median(times):.2f} s/step", flush=True)
    return {"weights_mb": weight_bytes(model)[0] / MB, "linear_weights_mb": lin / MB,
            "held_out_start": start, "held_out_end": C.eval_loss(model, held_out),
            "measured_peak_mb": rep.measured_peak / MB, "estimated_peak_mb": rep.estimated_peak / MB,
            "loss_last10": statistics.mean(losses[-10:]), "loss_first": losses[0],
            "step_s_median": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/gsm8k")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--held-out", type=int, default=8, help="GSM8K test batches (of --rows) for the held-out loss")
    ap.add_argument("--loftq-iters", type=int, default=5)
    ap.add_argument("--sides", default="nf4,nf4+loftq", help="compared with bf16: any of nf4, nf4+loftq, int8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peftkit.hub.models import load_causal_lm

    base, tok = load_causal_lm("smollm2-135m")
    base = base.to(torch.bfloat16).eval()
    base.config.use_cache = False
    data = C.gsm8k_batches(f"{args.data}/train.jsonl", tok, args.steps, args.rows, args.length)
    held_out = C.gsm8k_batches(f"{args.data}/test.jsonl", tok, args.held_out, args.rows, args.length)
    res = {}
    sides = [x for x in args.sides.split(",") if x]
    bad = [x for x in sides if x not in ("nf4", "nf4+loftq", "int8")]
    if bad:
        ap.error(f"--sides: unknown side {bad[0]!r}; choose from nf4, nf4+loftq, int8")
    for side in ("bf16", *sides):
        res[side] = run(base, None if side == "bf16" else side, data, held_out, args.loftq_iters)
        print(side, json.dumps({k: round(v, 4) for k, v in res[side].items()}), flush=True)
    b = res["bf16"]
    for side in sides:
        q = res[side]
        print(f"{side} / bf16: weights {q['weights_mb'] / b['weights_mb']:.3f} (all), "
              f"{q['linear_weights_mb'] / b['linear_weights_mb']:.3f} (quantized linear layers); measured step peak "
              f"{q['measured_peak_mb'] / b['measured_peak_mb']:.3f}; step time {q['step_s_median'] / b['step_s_median']:.2f}")
        print(f"  held-out loss after {args.steps} steps {q['held_out_end'] / b['held_out_end']:.4f} "
              f"({q['held_out_end']:.4f} vs {b['held_out_end']:.4f}; before training {q['held_out_start']:.4f} vs "
              f"{b['held_out_start']:.4f}); training loss, mean of the last 10 steps "
              f"{q['loss_last10'] / b['loss_last10']:.4f}")


if __name__ == "__main__":
    main()
