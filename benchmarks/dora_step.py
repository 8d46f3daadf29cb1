"""DoRA training step vs peftkit's own LoRA step on SmolLM2-135M (and peft's DoRA vs peft's LoRA for context).

Same setting as ``lora_step.py`` (r=16 on all block linears, batch 4×128, 2 threads); the four
models' steps alternate in one process.

    python benchmarks/dora_step.py [--steps 8] [--json out.json]
"""

from __future__ import annotations

import _common as C
from lora_step import peft_model, peftkit_model


def run(steps: int = 8, with_peft: bool = True) -> dict[str, float]:
    C.setup()
    models = {"peftkit_lora": peftkit_model("lora"), "peftkit_dora": peftkit_model("dora")}
    if with_peft:
        models["peft_lora"] = peft_model("lora")
        models["peft_dora"] = peft_model("dora")
    batch = C.token_batch(4, 128, models["peftkit_lora"].config.vocab_size)
    fns = {k: C.train_step_fn(m, batch) for k, m in models.items()}
    times = C.alternate(fns, steps)
    res = {f"{k}_step_s": C.median(v) for k, v in times.items()}
    res["dora_over_own_lora"] = res["peftkit_dora_step_s"] / res["peftkit_lora_step_s"]
    if with_peft:
        res["peft_dora_over_peft_lora"] = res["peft_dora_step_s"] / res["peft_lora_step_s"]
        res["dora_vs_peft_dora"] = res["peftkit_dora_step_s"] / res["peft_dora_step_s"]
    return res


def main() -> None:
    C.cli(__doc__, run, "DoRA step vs LoRA step, SmolLM2-135M r=16 all block linears, batch 4x128", steps=8)


if __name__ == "__main__":
    main()
