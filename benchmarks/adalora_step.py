"""AdaLoRA training step on SmolLM2-135M: peftkit vs peft (time and peak memory), rank allocation included.

init_r=12, target_r=8, alpha=32 on every linear layer of the blocks (q/k/v/o/gate/up/down), batch
4×128, AdamW, 2 threads. One step = forward with the orthogonality penalty in the loss, backward,
optimizer step, then the rank allocation with the gradients still there (peft:
``model.base_model.update_and_allocate(step)``; peftkit: ``peftkit.after_step(model, step)``), then
``zero_grad``. The schedule (tinit=0, deltaT=1) updates the importance and re-masks after every
step, the costliest setting. Steps alternate between the two models in one process; the figure is
the ratio of median step times. Memory: the bytes autograd saves for backward during one step, and
the peak resident memory of a separate process per library doing the same steps.

    python benchmarks/adalora_step.py [--steps 6] [--warmup 2] [--no-rss] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import _common as C
import torch

TOTAL_STEP = 1000
OPTIONS = dict(init_r=12, target_r=8, tinit=0, tfinal=0, total_step=TOTAL_STEP, orth_reg_weight=0.5)


def peftkit_model():
    import peftkit

    model = C.base_model()
    o = OPTIONS
    cfg = peftkit.AdaLoRA(init_r=o["init_r"], target_r=o["target_r"], alpha=32, total_step=o["total_step"],
                          tinit=o["tinit"], tfinal=o["tfinal"], delta_t=1, orth_reg_weight=o["orth_reg_weight"],
                          target_modules=C.BLOCK_LINEARS)
    return peftkit.attach(model, cfg)


def peft_model():
    from peft import AdaLoraConfig, get_peft_model

    model = C.base_model()
    cfg = AdaLoraConfig(task_type="CAUSAL_LM", lora_alpha=32, deltaT=1, target_modules=C.BLOCK_LINEARS, **OPTIONS)
    return get_peft_model(model, cfg)


BUILDERS = {"peftkit": peftkit_model, "peft": peft_model}


def loss_fn(lib: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    if lib == "peft":
        return lambda: model(**batch).loss  # peft's model adds the penalty itself

    import peftkit

    return lambda: model(**batch).loss + peftkit.regularization_loss(model)


def step_fn(lib: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    import peftkit

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    loss_of = loss_fn(lib, model, batch)
    count = [0]

    def step() -> None:
        loss_of().backward()
        opt.step()
        if lib == "peft":
            model.base_model.update_and_allocate(count[0])
        else:
            peftkit.after_step(model, count[0], TOTAL_STEP)
        opt.zero_grad(set_to_none=True)
        count[0] += 1

    return step


def rss_child(lib: str, steps: int) -> None:
    C.setup()
    print(json.dumps(C.training_peak_rss(BUILDERS[lib](), steps, lambda model, batch: step_fn(lib, model, batch))))


def peak_rss(lib: str, steps: int = 3) -> dict[str, float]:
    return C.child_json(__file__, "--rss-child", lib, "--steps", str(steps))


def run(steps: int = 6, warmup: int = 2, rss: bool = True) -> dict[str, float]:
    C.setup()
    models = {lib: build() for lib, build in BUILDERS.items()}
    batch = C.token_batch(4, 128, models["peft"].config.vocab_size)
    fns = {lib: step_fn(lib, m, batch) for lib, m in models.items()}
    times = C.alternate(fns, steps, warmup=warmup)
    res = {"peftkit_step_s": C.median(times["peftkit"]), "peft_step_s": C.median(times["peft"])}
    res["time_ratio"] = res["peftkit_step_s"] / res["peft_step_s"]
    print(json.dumps({"step_times": times, **res}), flush=True)  # the time figures first: memory takes long
    saved = {}
    for lib, m in models.items():
        m.train()
        saved[lib] = C.saved_activation_bytes(loss_fn(lib, m, batch), m)
    res.update(saved_mb_peftkit=saved["peftkit"] / 2**20, saved_mb_peft=saved["peft"] / 2**20)
    res["saved_memory_ratio"] = res["saved_mb_peftkit"] / res["saved_mb_peft"]
    print(json.dumps(res), flush=True)
    if rss:
        peaks = {lib: peak_rss(lib) for lib in BUILDERS}
        res.update(peak_rss_mb_peftkit=peaks["peftkit"]["peak_rss_mb"], peak_rss_mb_peft=peaks["peft"]["peak_rss_mb"])
        res["peak_rss_ratio"] = res["peak_rss_mb_peftkit"] / res["peak_rss_mb_peft"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes (they reload the model)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--rss-child", default=None, choices=list(BUILDERS))
    a = ap.parse_args()
    if a.rss_child:
        rss_child(a.rss_child, a.steps)
        return
    res = run(a.steps, a.warmup, not a.no_rss)
    C.report("AdaLoRA training step with rank allocation, SmolLM2-135M init_r=12 target_r=8 all block linears, "
             "batch 4x128", [(k, f"{v:.4f}") for k, v in res.items()])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
