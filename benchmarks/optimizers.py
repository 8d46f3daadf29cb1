"""Optimizer state and step time: GaLore vs AdamW (full fine-tuning) and LoRA-FA vs AdamW (LoRA), SmolLM2-135M.

The optimizers run on the real parameter shapes of SmolLM2-135M-Instruct with fixed random gradients
(the forward/backward are the same for both sides and are left out): ``--steps`` optimizer steps per
side, alternating the two sides step by step. GaLore: rank 128, projector refreshed every 200 steps
(the refresh, an SVD per matrix, is timed separately). LoRA: r=16 on every block linear.

    PYTHONPATH=src python benchmarks/optimizers.py [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import peftkit
from peftkit.optim import GaLoreAdamW, build_optimizer, state_bytes

MB = 2**20


def timed(opt: torch.optim.Optimizer) -> float:
    t = time.perf_counter()
    opt.step()
    return time.perf_counter() - t


def fake_grads(params: list[torch.nn.Parameter]) -> None:
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peftkit.hub.models import load_causal_lm

    full, _ = load_causal_lm("smollm2-135m")
    params = [p for p in full.parameters()]
    fake_grads(params)
    adamw = torch.optim.AdamW(params, lr=1e-5)
    galore = GaLoreAdamW(params, lr=1e-5, rank=128, update_gap=200)
    first = {"adamw": timed(adamw), "galore": timed(galore)}  # GaLore's first step computes the projectors
    times: dict[str, list[float]] = {"adamw": [], "galore": []}
    for _ in range(args.steps):
        times["adamw"].append(timed(adamw))
        times["galore"].append(timed(galore))
    sa, sg = state_bytes(adamw), state_bytes(galore)
    ma, mg = statistics.median(times["adamw"]), statistics.median(times["galore"])
    print(f"full fine-tuning, {sum(p.numel() for p in params) / 1e6:.1f} M parameters:")
    print(f"  state: AdamW {sa / MB:.0f} MB, GaLore r=128 {sg / MB:.0f} MB (ratio {sg / sa:.3f})")
    print(f"  step: AdamW {ma:.3f} s, GaLore {mg:.3f} s (ratio {mg / ma:.2f}); projector refresh step "
          f"{first['galore']:.2f} s (every 200 steps)")
    del adamw, galore, full, params

    model, _ = load_causal_lm("smollm2-135m")
    peftkit.attach(model, peftkit.LoRA(r=16, alpha=32, target_modules="all-linear"))
    lp = list(peftkit.adapter_parameters(model).values())
    fake_grads(lp)
    adamw = torch.optim.AdamW(lp, lr=1e-4)
    fa = build_optimizer("lora-fa", model, [{"params": lp}], lr=1e-4)
    times = {"adamw": [], "lora-fa": []}
    timed(adamw)
    timed(fa)
    for _ in range(args.steps):
        times["adamw"].append(timed(adamw))
        times["lora-fa"].append(timed(fa))
    sa, sf = state_bytes(adamw), state_bytes(fa)
    ma, mf = statistics.median(times["adamw"]), statistics.median(times["lora-fa"])
    print(f"LoRA r=16 all block linears, {sum(p.numel() for p in lp) / 1e6:.2f} M adapter parameters:")
    print(f"  state: AdamW {sa / MB:.1f} MB, LoRA-FA {sf / MB:.1f} MB (ratio {sf / sa:.3f})")
    print(f"  optimizer step: AdamW {ma * 1e3:.1f} ms, LoRA-FA {mf * 1e3:.1f} ms (ratio {mf / ma:.2f})")


if __name__ == "__main__":
    main()
