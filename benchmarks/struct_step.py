"""BOFT and prefix tuning training steps on SmolLM2-135M: peftkit vs peft (time and peak memory).

* BOFT: ``boft_block_size=8`` on q/v projections (peft's usual targets), one butterfly factor: on CPU
  peft 0.21.2 always computes one factor (its butterfly product needs a CUDA extension; the benchmark
  skips peft's attempt to compile it, which fails without CUDA).
* prefix tuning: 20 virtual tokens (peft's plain prefix, no projection).

Batch 4×128, AdamW, 2 threads. Steps alternate between the two models in one process; the figure is
the ratio of median step times. Memory: the bytes autograd saves for backward during one step
(deterministic; parameters excluded), and the peak resident memory of a separate process per
library doing the same steps.

    python benchmarks/struct_step.py [--method boft|prefix_tuning|all] [--steps 8] [--warmup 2] [--no-rss]
                                     [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import _common as C

METHODS = ("boft", "prefix_tuning")
BOFT_TARGETS = ["q_proj", "v_proj"]


def _no_peft_cuda_probe() -> None:
    import peft.tuners.boft.layer as boft_layer

    boft_layer.get_fbd_cuda = lambda: None  # peft's own CPU fallback, without the failing compile attempt


def peftkit_model(method: str):
    import peftkit

    model = C.base_model()
    if method == "boft":
        cfg = peftkit.BOFT(boft_block_size=8, target_modules=BOFT_TARGETS)
    else:
        cfg = peftkit.PrefixTuning(num_virtual_tokens=20)
    return peftkit.attach(model, cfg)


def peft_model(method: str):
    from peft import BOFTConfig, PrefixTuningConfig, get_peft_model

    model = C.base_model()
    if method == "boft":
        _no_peft_cuda_probe()
        cfg = BOFTConfig(boft_block_size=8, target_modules=BOFT_TARGETS)
    else:
        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)
    return get_peft_model(model, cfg)


BUILDERS = {"peftkit": peftkit_model, "peft": peft_model}


def rss_child(lib: str, method: str, steps: int) -> None:
    C.setup()
    print(json.dumps(C.training_peak_rss(BUILDERS[lib](method), steps)))


def peak_rss(lib: str, method: str, steps: int = 2) -> dict[str, float]:
    return C.child_json(__file__, "--rss-child", lib, "--method", method, "--steps", str(steps))


def run(method: str, steps: int = 8, warmup: int = 2, rss: bool = True) -> dict[str, float]:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' past_key_values deprecation (peft)
    C.setup()
    models = {lib: build(method) for lib, build in BUILDERS.items()}
    trainable = {lib: sum(p.numel() for p in m.parameters() if p.requires_grad) for lib, m in models.items()}
    assert trainable["peftkit"] == trainable["peft"], trainable  # the same adapter on both sides
    batch = C.token_batch(4, 128, models["peft"].config.vocab_size)
    fns = {lib: C.train_step_fn(m, batch) for lib, m in models.items()}
    times = C.alternate(fns, steps, warmup=warmup)
    saved = {}
    for lib, m in models.items():
        m.train()
        saved[lib] = C.saved_activation_bytes(lambda m=m: m(**batch).loss, m)
    res = {
        "trainable_params": float(trainable["peftkit"]),
        "peftkit_step_s": C.median(times["peftkit"]),
        "peft_step_s": C.median(times["peft"]),
        "saved_mb_peftkit": saved["peftkit"] / 2**20,
        "saved_mb_peft": saved["peft"] / 2**20,
    }
    res["time_ratio"] = res["peftkit_step_s"] / res["peft_step_s"]
    res["saved_memory_ratio"] = res["saved_mb_peftkit"] / res["saved_mb_peft"]
    if rss:
        peaks = {lib: peak_rss(lib, method) for lib in BUILDERS}
        res["peak_rss_mb_peftkit"] = peaks["peftkit"]["peak_rss_mb"]
        res["peak_rss_mb_peft"] = peaks["peft"]["peak_rss_mb"]
        res["peak_rss_ratio"] = res["peak_rss_mb_peftkit"] / res["peak_rss_mb_peft"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes (they load the model again)")
    ap.add_argument("--method", default="all", choices=[*METHODS, "all"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--rss-child", default=None, choices=list(BUILDERS))
    a = ap.parse_args()
    if a.rss_child:
        rss_child(a.rss_child, a.method, a.steps)
        return
    C.report_results(((m, f"{m} training step vs peft, SmolLM2-135M, batch 4x128, 2 threads",
                       run(m, a.steps, a.warmup, rss=not a.no_rss))
                      for m in (METHODS if a.method == "all" else (a.method,))), a.json)


if __name__ == "__main__":
    main()
