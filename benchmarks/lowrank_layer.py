"""VeRA, LoHa, LoKr on three SmolLM2-shaped linear layers (576→576→1536→576): peftkit vs peft, forward+backward.

A cheap check of the adapters' own cost when the full-model benchmark (``lowrank_step.py``) cannot
run: batch 4×128, 2 threads, the two libraries alternate call by call, ratio of median times.

    nice -n 10 python benchmarks/lowrank_layer.py
"""

from __future__ import annotations

import statistics
import time

import torch
from peft import LoHaConfig, LoKrConfig, VeraConfig, get_peft_model

import peftkit


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(576, 576)
        self.up_proj = torch.nn.Linear(576, 1536)
        self.down_proj = torch.nn.Linear(1536, 576)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(self.q_proj(x))))


T = ["q_proj", "up_proj", "down_proj"]
CONFIGS = {
    "loha": (lambda: peftkit.LoHa(r=8, alpha=16, target_modules=T), lambda: LoHaConfig(r=8, alpha=16, target_modules=T)),
    "lokr": (lambda: peftkit.LoKr(r=8, alpha=16, target_modules=T), lambda: LoKrConfig(r=8, alpha=16, target_modules=T)),
    "vera": (lambda: peftkit.VeRA(r=128, target_modules=T), lambda: VeraConfig(r=128, target_modules=T)),
}


def main(rounds: int = 12, warmup: int = 2) -> None:
    torch.set_num_threads(2)
    x = torch.randn(4, 128, 576)
    for name, (ours, theirs) in CONFIGS.items():
        torch.manual_seed(0)
        models = {"peftkit": peftkit.attach(Block(), ours()).train()}
        torch.manual_seed(0)
        models["peft"] = get_peft_model(Block(), theirs()).train()
        times: dict[str, list[float]] = {k: [] for k in models}
        for i in range(rounds):
            for k in (list(models) if i % 2 == 0 else list(models)[::-1]):
                t0 = time.perf_counter()
                models[k](x).pow(2).mean().backward()
                if i >= warmup:
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name}: peftkit {med['peftkit'] * 1e3:.1f} ms, peft {med['peft'] * 1e3:.1f} ms, "
              f"ratio {med['peftkit'] / med['peft']:.3f}", flush=True)


if __name__ == "__main__":
    main()
