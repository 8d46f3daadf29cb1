"""Serving many LoRA adapters in one batch on SmolLM2-135M: peftkit ``mixed_batch`` vs a single adapter and vs peft.

8 LoRA adapters (r=16, all block linears) on one base; a batch of 16 rows × 64 tokens where
row i uses adapter i mod 8. Forward passes under ``torch.no_grad`` (inference), alternating:

* peftkit, one adapter active for the whole batch (the cost floor);
* peftkit, ``peftkit.mixed_batch(model, names)``;
* peft, ``model(..., adapter_names=names)``.

    python benchmarks/mixed_batch.py [--steps 10] [--json out.json]
"""

from __future__ import annotations

import _common as C
import torch

N_ADAPTERS, ROWS, LENGTH = 8, 16, 64


def _randomise(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build():
    from peft import LoraConfig, get_peft_model

    import peftkit

    pk = C.base_model()
    for i in range(N_ADAPTERS):
        peftkit.attach(pk, peftkit.LoRA(r=16, alpha=32, target_modules=C.BLOCK_LINEARS), name=f"a{i}")
        _randomise(peftkit.adapter_parameters(pk, f"a{i}").values(), i)
    pe = get_peft_model(C.base_model(), LoraConfig(r=16, lora_alpha=32, target_modules=C.BLOCK_LINEARS), adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        pe.add_adapter(f"a{i}", LoraConfig(r=16, lora_alpha=32, target_modules=C.BLOCK_LINEARS))
    for i in range(N_ADAPTERS):
        _randomise([p for n, p in pe.named_parameters() if f".a{i}." in n and "lora_" in n], i)
    return pk.eval(), pe.eval()


def run(steps: int = 10) -> dict[str, float]:
    import peftkit

    C.setup()
    pk, pe = build()
    batch = C.token_batch(ROWS, LENGTH, pk.config.vocab_size)
    batch.pop("labels")
    names = [f"a{i % N_ADAPTERS}" for i in range(ROWS)]

    def single() -> None:
        peftkit.activate(pk, "a0")
        with torch.no_grad():
            pk(**batch)

    def mixed() -> None:
        with torch.no_grad(), peftkit.mixed_batch(pk, names):
            pk(**batch)

    def peft_mixed() -> None:
        with torch.no_grad():
            pe(**batch, adapter_names=names)

    times = C.alternate({"single": single, "mixed": mixed, "peft_mixed": peft_mixed}, steps)
    res = {f"{k}_s": C.median(v) for k, v in times.items()}
    res["mixed_over_single"] = res["mixed_s"] / res["single_s"]
    res["mixed_over_peft"] = res["mixed_s"] / res["peft_mixed_s"]
    return res


def main() -> None:
    C.cli(__doc__, run, f"mixed batch {ROWS}x{LENGTH} over {N_ADAPTERS} LoRA adapters, SmolLM2-135M r=16", steps=10)


if __name__ == "__main__":
    main()
