"""LoRA training step on SmolLM2-135M: peftkit vs peft (time and peak memory).

r=16, alpha=32 on every linear layer of the blocks (q/k/v/o/gate/up/down), batch 4×128,
AdamW, 2 threads. Steps alternate between the two models in one process; the figure is the
ratio of median step times. Also timed in the same rotation: the frozen base alone (forward and
backward without any adapter: the floor no adapter can go below) and peftkit's own training loss
(chunked over positions, as ``peftkit.train`` computes it). Memory: the bytes autograd saves for backward during one step
(deterministic; parameters excluded), and the peak resident memory of a separate process per library doing the
same steps.

    python benchmarks/lora_step.py [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import _common as C


def peftkit_model(method: str = "lora", r: int = 16):
    import peftkit

    model = C.base_model()
    cfg = (peftkit.DoRA if method == "dora" else peftkit.LoRA)(r=r, alpha=2 * r, target_modules=C.BLOCK_LINEARS)
    return peftkit.attach(model, cfg)


def peft_model(method: str = "lora", r: int = 16):
    from peft import LoraConfig, get_peft_model

    model = C.base_model()
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=C.BLOCK_LINEARS, use_dora=(method == "dora"))
    return get_peft_model(model, cfg)


BUILDERS = {"peftkit": peftkit_model, "peft": peft_model}


def rss_child(lib: str, method: str, steps: int) -> None:
    C.setup()
    print(json.dumps(C.training_peak_rss(BUILDERS[lib](method), steps)))


def peak_rss(lib: str, method: str, steps: int = 3) -> dict[str, float]:
    return C.child_json(__file__, "--rss-child", lib, "--method", method, "--steps", str(steps))


def chunked_step_fn(model, batch):
    """peftkit's own training step (what ``peftkit.train`` runs): the loss over chunks of positions,
    never the full float32 logits (``peftkit.train.loss.model_loss``); same model, data and optimizer."""
    import torch

    from peftkit.train.loss import model_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model.train()
        model_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def floor_fn(batch):
    """The frozen base's forward and backward alone (no adapter, no optimizer; gradients flow from the
    loss down to the embeddings' output): the least any adapter's step can cost on this model."""
    model = C.base_model()
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    model.train()
    return lambda: model(**batch).loss.backward()


def run(steps: int = 10, method: str = "lora") -> dict[str, float]:
    C.setup()
    models = {lib: build(method) for lib, build in BUILDERS.items()}
    batch = C.token_batch(4, 128, models["peft"].config.vocab_size)
    fns = {lib: C.train_step_fn(m, batch) for lib, m in models.items()}
    fns["peftkit_chunked"] = chunked_step_fn(models["peftkit"], batch)
    fns["floor"] = floor_fn(batch)
    times = C.alternate(fns, steps)
    saved = {}
    for lib, m in models.items():
        m.train()
        saved[lib] = C.saved_activation_bytes(lambda m=m: m(**batch).loss, m)
    rss = {lib: peak_rss(lib, method) for lib in BUILDERS}
    res = {
        "peftkit_step_s": C.median(times["peftkit"]),
        "peft_step_s": C.median(times["peft"]),
        "saved_mb_peftkit": saved["peftkit"] / 2**20,
        "saved_mb_peft": saved["peft"] / 2**20,
        "peak_rss_mb_peftkit": rss["peftkit"]["peak_rss_mb"],
        "peak_rss_mb_peft": rss["peft"]["peak_rss_mb"],
    }
    res["floor_step_s"] = C.median(times["floor"])
    res["peftkit_chunked_step_s"] = C.median(times["peftkit_chunked"])
    res["time_ratio"] = res["peftkit_step_s"] / res["peft_step_s"]
    res["floor_over_peft"] = res["floor_step_s"] / res["peft_step_s"]
    res["chunked_time_ratio"] = res["peftkit_chunked_step_s"] / res["peft_step_s"]
    res["saved_memory_ratio"] = res["saved_mb_peftkit"] / res["saved_mb_peft"]
    res["peak_rss_ratio"] = res["peak_rss_mb_peftkit"] / res["peak_rss_mb_peft"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--method", default="lora", choices=["lora", "dora"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--rss-child", default=None, choices=list(BUILDERS))
    a = ap.parse_args()
    if a.rss_child:
        rss_child(a.rss_child, a.method, a.steps)
        return
    res = run(a.steps, a.method)
    C.report(f"{a.method} training step, SmolLM2-135M r=16 all block linears, batch 4x128",
             [(k, f"{v:.4f}") for k, v in res.items()])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
