"""Training step of the SVD-family methods and PaCA on SmolLM2-135M, against peft in one run.

CorDA is compared with peft's CorDA (``init_lora_weights="corda"``, same calibration batches):
both are LoRAs on a residual base, so the ratio is the LoRA step of each library. peft has no
SVFit, SORSA or PaCA: they are compared with peft's LoRA of the same rank (r=16, alpha=32), the
usual alternative. All adapters on the 7 linear layers of every block, batch 4×128, AdamW,
2 threads; the models' steps alternate and the ratios are of the medians. Also printed: the
activation bytes kept for backward (deterministic) and the trainable parameter counts.

    python benchmarks/svd_step.py [--steps 5] [--methods corda,peft_corda,svfit,sorsa,paca,peft_lora] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import _common as C
import torch

R = 16


def _calibration(vocab: int) -> list[torch.Tensor]:
    """Four single-sequence batches of 128 tokens (peft's CorDA hook needs one sequence per call)."""
    ids = C.token_batch(4, 128, vocab, seed=1)["input_ids"]
    return [ids[i:i + 1] for i in range(4)]


def build(name: str) -> torch.nn.Module:
    import peftkit

    model = C.base_model()
    targets = C.BLOCK_LINEARS
    if name == "corda":
        cov = peftkit.corda_calibrate(model, _calibration(model.config.vocab_size), target_modules=targets)
        return peftkit.attach(model, peftkit.CorDA(r=R, alpha=2 * R, covariances=cov, target_modules=targets))
    if name == "svfit":
        return peftkit.attach(model, peftkit.SVFit(target_modules=targets))
    if name == "sorsa":
        return peftkit.attach(model, peftkit.SORSA(r=R, target_modules=targets))
    if name == "paca":
        return peftkit.attach(model, peftkit.PaCA(r=R, target_modules=targets))
    from peft import LoraConfig, get_peft_model

    if name == "peft_lora":
        return get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets))
    if name == "peft_corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets, init_lora_weights="corda",
                         corda_config=CordaConfig(corda_method="ipm"))
        batches = _calibration(model.config.vocab_size)
        preprocess_corda(model, cfg, run_model=lambda: [model(b) for b in batches])
        return get_peft_model(model, cfg)
    raise SystemExit(f"unknown method {name!r}")


def step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """``C.train_step_fn`` plus the method's regulariser (SORSA) through the training-hook protocol."""
    import peftkit

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    hooked = bool(peftkit.training_hooks(model))

    def step() -> None:
        loss = model(**batch).loss
        if hooked:
            loss = loss + peftkit.regularization_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(steps: int, methods: list[str]) -> dict[str, float]:
    C.setup()
    models = {m: build(m) for m in methods}
    batch = C.token_batch(4, 128, next(iter(models.values())).config.vocab_size)
    times = C.alternate({m: step_fn(mod, batch) for m, mod in models.items()}, steps, warmup=1)
    res: dict[str, float] = {}
    for m, mod in models.items():
        res[f"{m}_step_s"] = C.median(times[m])
        res[f"{m}_saved_mb"] = C.saved_activation_bytes(lambda mod=mod: mod(**batch).loss, mod) / 2**20
        res[f"{m}_trainable"] = float(sum(p.numel() for p in mod.parameters() if p.requires_grad))
    if "corda" in models and "peft_corda" in models:
        res["corda_over_peft_corda_time"] = res["corda_step_s"] / res["peft_corda_step_s"]
        res["corda_over_peft_corda_saved"] = res["corda_saved_mb"] / res["peft_corda_saved_mb"]
    if "peft_lora" in models:
        for m in ("svfit", "sorsa", "paca", "corda"):
            if m in models:
                res[f"{m}_over_peft_lora_time"] = res[f"{m}_step_s"] / res["peft_lora_step_s"]
                res[f"{m}_over_peft_lora_saved"] = res[f"{m}_saved_mb"] / res["peft_lora_saved_mb"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", default="corda,peft_corda,svfit,sorsa,paca,peft_lora")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = run(a.steps, [m for m in a.methods.split(",") if m])
    C.report("SVD-family and PaCA training step, SmolLM2-135M, all block linears, batch 4x128",
             [(k, f"{v:.4f}") for k, v in res.items()])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
