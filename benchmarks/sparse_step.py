"""RoSA, SpIEL, SaRA and HFT training steps on SmolLM2-135M against the closest reference (time and memory).

peft 0.21.2 has none of these methods, so each is measured against the nearest thing that runs
in the same process on the same model (every linear layer of the blocks, batch 4×128, AdamW,
2 threads; the two sides alternate step by step and the figure is the ratio of median step times):

* ``rosa`` — RoSA r=16, alpha=32, density 0.005 (support fixed, ``support="random"``: the
  steady state after the warm-up) vs peft's LoRA r=16, alpha=32: the cost of the sparse part;
* ``spiel`` / ``sara`` — density 0.0115 vs peft's SHiRA r=4 (a sparse adapter with a random mask,
  ~1.15% of these weights' entries): the same kind of update at about the same parameter count
  (SpIEL outside its gradient-accumulation windows);
* ``hft`` — HFT in a stage (half of the tensors frozen) vs full fine-tuning of the same weights in
  plain torch (the paper reports ~30% less time than full fine-tuning).

Memory: the bytes autograd saves for backward during one step (deterministic; parameters and
buffers excluded), the trainable parameter count, and optionally the peak resident memory of a
separate process per side (``--rss-steps``).

    nice -n 10 python benchmarks/sparse_step.py [--steps 6] [--warmup 2] [--rss-steps 3] [--methods rosa,spiel,sara,hft]
        [--json out.json]
"""

from __future__ import annotations

import json

import _common as C

METHODS = ("rosa", "spiel", "sara", "hft")
DENSITY = 0.0115  # ≈ SHiRA r=4 on SmolLM2's block linears: 40,704 of 3,538,944 entries per block


def peftkit_model(method: str):
    import peftkit

    model = C.base_model()
    t = C.BLOCK_LINEARS
    cfg = {
        "rosa": lambda: peftkit.RoSA(r=16, alpha=32, density=0.005, support="random", target_modules=t),
        "spiel": lambda: peftkit.SpIEL(density=DENSITY, target_modules=t),
        "sara": lambda: peftkit.SaRA(quantile=DENSITY, target_modules=t),
        "hft": lambda: peftkit.HFT(target_modules=t),
    }[method]()
    return peftkit.attach(model, cfg)


def reference_model(method: str):
    model = C.base_model()
    if method == "hft":  # full fine-tuning of the same weights
        for p in model.parameters():
            p.requires_grad_(False)
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in C.BLOCK_LINEARS:
                m.weight.requires_grad_(True)
        return model
    from peft import LoraConfig, ShiraConfig, get_peft_model

    if method == "rosa":
        cfg = LoraConfig(r=16, lora_alpha=32, target_modules=C.BLOCK_LINEARS)
    else:
        cfg = ShiraConfig(r=4, target_modules=C.BLOCK_LINEARS, random_seed=0)
    return get_peft_model(model, cfg)


REFERENCE = {"rosa": "peft LoRA r=16", "spiel": "peft SHiRA r=4", "sara": "peft SHiRA r=4", "hft": "full fine-tuning"}
BUILDERS = {"peftkit": peftkit_model, "reference": reference_model}


def step_fn(lib: str, method: str, model, batch):
    step = C.train_step_fn(model, batch)  # the optimizer holds every trainable parameter
    if lib == "peftkit" and method == "hft":
        import peftkit

        peftkit.before_step(model, 0, 1000)  # stage 0: half of the deltas frozen
    return step


def rss_child(lib: str, method: str, steps: int) -> None:
    C.setup()
    print(json.dumps(C.training_peak_rss(BUILDERS[lib](method), steps,
                                         step_fn=lambda m, b: step_fn(lib, method, m, b))))


def run(method: str, steps: int, warmup: int = 2, rss_steps: int = 3) -> dict[str, float]:
    C.setup()
    models = {lib: build(method) for lib, build in BUILDERS.items()}
    trainable = {lib: sum(p.numel() for p in m.parameters() if p.requires_grad) for lib, m in models.items()}
    batch = C.token_batch(4, 128, models["peftkit"].config.vocab_size)
    fns = {lib: step_fn(lib, method, m, batch) for lib, m in models.items()}
    res = {"trainable_params_peftkit": float(trainable["peftkit"]), "trainable_params_reference": float(trainable["reference"])}
    saved = {}
    for lib, m in models.items():
        m.train()
        saved[lib] = C.saved_activation_bytes(lambda m=m: m(**batch).loss, m)
    res["saved_mb_peftkit"] = saved["peftkit"] / 2**20
    res["saved_mb_reference"] = saved["reference"] / 2**20
    res["saved_memory_ratio"] = saved["peftkit"] / saved["reference"]
    print(f"{method}: saved for backward {res['saved_mb_peftkit']:.1f} MB vs {res['saved_mb_reference']:.1f} MB "
          f"({REFERENCE[method]})", flush=True)
    if steps > 0:
        times = C.alternate(fns, steps, warmup=warmup)
        res["peftkit_step_s"] = C.median(times["peftkit"])
        res["reference_step_s"] = C.median(times["reference"])
        res["time_ratio"] = res["peftkit_step_s"] / res["reference_step_s"]
        print(f"{method}: step times {times} -> ratio {res['time_ratio']:.3f} vs {REFERENCE[method]}", flush=True)
    del models, fns
    if rss_steps > 0:
        rss = {lib: C.child_json(__file__, "--rss-child", lib, "--methods", method, "--steps", str(rss_steps))
               for lib in BUILDERS}
        res["peak_rss_mb_peftkit"] = rss["peftkit"]["peak_rss_mb"]
        res["peak_rss_mb_reference"] = rss["reference"]["peak_rss_mb"]
        res["peak_rss_ratio"] = res["peak_rss_mb_peftkit"] / res["peak_rss_mb_reference"]
    return res


def main() -> None:
    C.methods_cli(__doc__, METHODS, BUILDERS, run, rss_child,
                  lambda m: f"{m} training step vs {REFERENCE[m]}, SmolLM2-135M all block linears, batch 4x128")


if __name__ == "__main__":
    main()
