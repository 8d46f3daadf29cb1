"""Poly, MoLoRA, Chain of LoRA and DePT training steps on SmolLM2-135M against peft (time and saved memory).

Each peftkit method is timed against the closest thing peft 0.21.2 has, the two models alternating step
by step in one process (batch 4×128, AdamW, 2 threads; ratio of median step times):

* ``poly``: Poly r=8, 4 skills, 1 task on q/v vs peft's ``PolyConfig`` (same adapter; peft gets
  ``task_ids=`` in forward, peftkit runs with ``n_tasks=1``, every row task 0);
* ``mhr``: the same with ``n_splits=4`` (multi-head routing) vs peft's Poly with ``n_splits=4``;
* ``chain_lora``: Chain of LoRA r=16 on all 7 block linears, in its second link (one link folded, so the
  frozen path is live) vs peft's LoRA r=16 (COLA's claim: no extra cost over one LoRA);
* ``molora``: 4 experts of rank 4, top-2, on all 7 block linears vs peft's LoRA of rank 16 (the same
  expert parameter count; peft has no token-routed mixture);
* ``dept``: DePT with m′=56 prompt tokens, r=36, s=128 vs peft prompt tuning with m=100 tokens, the same
  trainable budget (m·d = m′·d + s·r + r·d with d=576): DePT's shorter input is the point of the method.

Memory: the bytes autograd saves for backward in one step (deterministic; parameters excluded).

    python benchmarks/mix_step.py [--method poly|mhr|chain_lora|molora|dept|all] [--steps 6] [--warmup 1]
                                  [--json out.json]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import _common as C
import torch

METHODS = ("poly", "mhr", "chain_lora", "molora", "dept")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ours(method: str) -> torch.nn.Module:
    import peftkit
    from peftkit.methods.chain_lora import next_link

    model = C.base_model()
    configs: dict[str, Any] = {
        "poly": lambda: peftkit.Poly(r=8, n_skills=4, target_modules=["q_proj", "v_proj"]),
        "mhr": lambda: peftkit.Poly(r=8, n_skills=4, n_splits=4, target_modules=["q_proj", "v_proj"]),
        "chain_lora": lambda: peftkit.ChainLoRA(r=16, alpha=32, num_links=2, target_modules=ALL_LINEAR),
        "molora": lambda: peftkit.MoLoRA(r=4, alpha=8, num_experts=4, top_k=2, target_modules=ALL_LINEAR),
        "dept": lambda: peftkit.DePT(num_virtual_tokens=56, r=36, max_positions=128),
    }
    peftkit.attach(model, configs[method]())
    if method == "chain_lora":
        next_link(model)  # the second link: the folded first one runs in the frozen path
    return model


def _reference(method: str) -> torch.nn.Module:
    from peft import LoraConfig, PolyConfig, PromptTuningConfig, get_peft_model

    model = C.base_model()
    configs: dict[str, Any] = {
        "poly": lambda: PolyConfig(task_type="CAUSAL_LM", r=8, n_skills=4, target_modules=["q_proj", "v_proj"]),
        "mhr": lambda: PolyConfig(task_type="CAUSAL_LM", r=8, n_skills=4, n_splits=4,
                                  target_modules=["q_proj", "v_proj"]),
        "chain_lora": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR),
        "molora": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR),
        "dept": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=100),
    }
    return get_peft_model(model, configs[method]())


def _step(model: torch.nn.Module, batch: dict[str, torch.Tensor], extra: dict[str, Any]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        model(**batch, **extra).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(method: str, steps: int = 6, warmup: int = 1) -> dict[str, float]:
    C.setup()
    models = {"peftkit": _ours(method), "peft": _reference(method)}
    batch = C.token_batch(4, 128, models["peft"].config.vocab_size)
    extras = {"peftkit": {}, "peft": {"task_ids": torch.zeros(4, dtype=torch.long)} if method in ("poly", "mhr") else {}}
    trainable = {lib: sum(p.numel() for p in m.parameters() if p.requires_grad) for lib, m in models.items()}
    saved = {}
    for lib, m in models.items():
        m.train()
        saved[lib] = C.saved_activation_bytes(lambda m=m, lib=lib: m(**batch, **extras[lib]).loss, m)
    res = {"trainable_peftkit": float(trainable["peftkit"]), "trainable_peft": float(trainable["peft"]),
           "saved_mb_peftkit": saved["peftkit"] / 2**20, "saved_mb_peft": saved["peft"] / 2**20}
    res["saved_memory_ratio"] = res["saved_mb_peftkit"] / res["saved_mb_peft"]
    if steps > 0:
        fns = {lib: _step(m, batch, extras[lib]) for lib, m in models.items()}
        times = C.alternate(fns, steps, warmup=warmup)
        res["peftkit_step_s"] = C.median(times["peftkit"])
        res["peft_step_s"] = C.median(times["peft"])
        res["time_ratio"] = res["peftkit_step_s"] / res["peft_step_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per library (0: memory only)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--method", default="all", choices=[*METHODS, "all"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    C.report_results(((m, f"{m} training step vs peft, SmolLM2-135M, batch 4x128, 2 threads", run(m, a.steps, a.warmup))
                      for m in (METHODS if a.method == "all" else (a.method,))), a.json)


if __name__ == "__main__":
    main()
