"""VeRA, LoHa and LoKr training steps on SmolLM2-135M: peftkit vs peft (time and peak memory).

Every linear layer of the blocks (q/k/v/o/gate/up/down), batch 4×128, AdamW, 2 threads.
VeRA r=128 (the k/v projections are 192 wide; peft's default 256 would exceed them), d_initial
0.1; LoHa and LoKr r=8, alpha=16. For each method the two libraries' steps alternate in one
process and the figure is the ratio of median step times. Memory: the bytes autograd saves for
backward during one step (deterministic; parameters and buffers excluded) and the peak resident
memory of a separate process per library doing the same steps.

    nice -n 10 python benchmarks/lowrank_step.py [--steps 6] [--warmup 2] [--rss-steps 3] [--methods vera,loha,lokr]
        [--json out.json]
"""

from __future__ import annotations

import json

import _common as C

METHODS = ("vera", "loha", "lokr")


def peftkit_model(method: str):
    import peftkit

    model = C.base_model()
    cfg = {
        "vera": lambda: peftkit.VeRA(r=128, target_modules=C.BLOCK_LINEARS),
        "loha": lambda: peftkit.LoHa(r=8, alpha=16, target_modules=C.BLOCK_LINEARS),
        "lokr": lambda: peftkit.LoKr(r=8, alpha=16, target_modules=C.BLOCK_LINEARS),
    }[method]()
    return peftkit.attach(model, cfg)


def peft_model(method: str):
    from peft import LoHaConfig, LoKrConfig, VeraConfig, get_peft_model

    model = C.base_model()
    cfg = {
        "vera": lambda: VeraConfig(r=128, target_modules=C.BLOCK_LINEARS),
        "loha": lambda: LoHaConfig(r=8, alpha=16, target_modules=C.BLOCK_LINEARS),
        "lokr": lambda: LoKrConfig(r=8, alpha=16, target_modules=C.BLOCK_LINEARS),
    }[method]()
    return get_peft_model(model, cfg)


BUILDERS = {"peftkit": peftkit_model, "peft": peft_model}


def rss_child(lib: str, method: str, steps: int) -> None:
    C.setup()
    print(json.dumps(C.training_peak_rss(BUILDERS[lib](method), steps)))


def peak_rss(lib: str, method: str, steps: int) -> dict[str, float]:
    return C.child_json(__file__, "--rss-child", lib, "--methods", method, "--steps", str(steps))


def run(method: str, steps: int, warmup: int = 2, rss_steps: int = 3) -> dict[str, float]:
    C.setup()
    models = {lib: build(method) for lib, build in BUILDERS.items()}
    trainable = {lib: sum(p.numel() for p in m.parameters() if p.requires_grad) for lib, m in models.items()}
    assert trainable["peftkit"] == trainable["peft"], trainable  # the same method, the same parameters
    batch = C.token_batch(4, 128, models["peft"].config.vocab_size)
    fns = {lib: C.train_step_fn(m, batch) for lib, m in models.items()}
    times = C.alternate(fns, steps, warmup=warmup)
    res = {
        "trainable_params": float(trainable["peftkit"]),
        "peftkit_step_s": C.median(times["peftkit"]),
        "peft_step_s": C.median(times["peft"]),
    }
    res["time_ratio"] = res["peftkit_step_s"] / res["peft_step_s"]
    print(f"{method}: step times {times} -> ratio {res['time_ratio']:.3f}", flush=True)
    saved = {}
    for lib, m in models.items():
        m.train()
        saved[lib] = C.saved_activation_bytes(lambda m=m: m(**batch).loss, m)
    res["saved_mb_peftkit"] = saved["peftkit"] / 2**20
    res["saved_mb_peft"] = saved["peft"] / 2**20
    res["saved_memory_ratio"] = res["saved_mb_peftkit"] / res["saved_mb_peft"]
    print(f"{method}: saved for backward {res['saved_mb_peftkit']:.1f} MB vs {res['saved_mb_peft']:.1f} MB", flush=True)
    del models, fns
    if rss_steps > 0:  # --rss-steps 0 skips the two peak-memory processes (a loaded machine)
        rss = {lib: peak_rss(lib, method, rss_steps) for lib in BUILDERS}
        res["peak_rss_mb_peftkit"] = rss["peftkit"]["peak_rss_mb"]
        res["peak_rss_mb_peft"] = rss["peft"]["peak_rss_mb"]
        res["peak_rss_ratio"] = res["peak_rss_mb_peftkit"] / res["peak_rss_mb_peft"]
    return res


def main() -> None:
    C.methods_cli(__doc__, METHODS, BUILDERS, run, rss_child,
                  lambda m: f"{m} training step, SmolLM2-135M all block linears, batch 4x128")


if __name__ == "__main__":
    main()
