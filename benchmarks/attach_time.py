"""Time to attach a LoRA adapter to SmolLM2-135M: ``peftkit.attach`` vs peft's ``get_peft_model``.

r=16 on all block linears; each trial starts from a fresh deep copy of the base model (the
copy is not timed); trials alternate between the two libraries.

    python benchmarks/attach_time.py [--trials 7] [--json out.json]
"""

from __future__ import annotations

import time

import _common as C


def run(trials: int = 7) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model

    import peftkit

    C.setup()
    times: dict[str, list[float]] = {"peftkit": [], "peft": []}
    for i in range(trials + 1):
        for lib in (["peftkit", "peft"] if i % 2 == 0 else ["peft", "peftkit"]):
            model = C.base_model()
            t0 = time.perf_counter()
            if lib == "peftkit":
                peftkit.attach(model, peftkit.LoRA(r=16, alpha=32, target_modules=C.BLOCK_LINEARS))
            else:
                get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=C.BLOCK_LINEARS))
            dt = time.perf_counter() - t0
            if i > 0:
                times[lib].append(dt)
    res = {"peftkit_attach_s": C.median(times["peftkit"]), "peft_get_peft_model_s": C.median(times["peft"])}
    res["attach_ratio"] = res["peftkit_attach_s"] / res["peft_get_peft_model_s"]
    return res


def main() -> None:
    C.cli(__doc__, run, "attach time, SmolLM2-135M LoRA r=16 all block linears", trials=7)


if __name__ == "__main__":
    main()
