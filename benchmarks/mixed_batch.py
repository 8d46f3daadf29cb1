"""Serving many LoRA adapters in one batch on SmolLM2-135M: peftkit ``mixed_batch`` vs a single adapter and vs peft.

8 LoRA adapters (r=16, all block linears) on one base; row i of a batch of 16 uses adapter i mod 8.
Forward passes under ``torch.no_grad`` (inference), alternating:

* peftkit, one adapter active for the whole batch (the cost floor);
* peftkit, ``peftkit.mixed_batch(model, names)``;
* peft, ``model(..., adapter_names=names)``;

in two shapes: a prefill (16 rows × 64 new tokens, no cache) and a decode step (16 rows × 1 new
token over a 64-token key/value cache, the shape of almost every forward of a serving engine).

    python benchmarks/mixed_batch.py [--steps 10] [--json out.json]
"""

from __future__ import annotations

import contextlib

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
    res.update(_decode(pk, pe, batch["input_ids"], names, steps * 4))
    return res


def _decode(pk, pe, ids, names, steps: int) -> dict[str, float]:
    """One decode step (16 rows × 1 token over a 64-token cache), peftkit single / mixed and peft mixed."""
    import peftkit

    caches = {}
    with torch.no_grad(), peftkit.mixed_batch(pk, names):
        caches["pk"] = pk(input_ids=ids, use_cache=True).past_key_values
    with torch.no_grad():
        caches["pe"] = pe(input_ids=ids, use_cache=True, adapter_names=names).past_key_values
    new = ids[:, -1:]
    mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)

    def step(which, ctx, **kw):
        model = pk if which == "pk" else pe
        with torch.no_grad(), ctx:
            model(input_ids=new, attention_mask=mask, past_key_values=caches[which], use_cache=True, **kw)
        caches[which].crop(-1)  # drop the token again: every step sees the same 64-token cache

    def single() -> None:
        peftkit.activate(pk, "a0")
        step("pk", contextlib.nullcontext())

    times = C.alternate({"decode_single": single,
                         "decode_mixed": lambda: step("pk", peftkit.mixed_batch(pk, names)),
                         "decode_peft_mixed": lambda: step("pe", contextlib.nullcontext(), adapter_names=names)},
                        steps)
    res = {f"{k}_s": C.median(v) for k, v in times.items()}
    res["decode_mixed_over_single"] = res["decode_mixed_s"] / res["decode_single_s"]
    res["decode_mixed_over_peft"] = res["decode_mixed_s"] / res["decode_peft_mixed_s"]
    return res


def main() -> None:
    C.cli(__doc__, run, f"mixed batch {ROWS}x{LENGTH} over {N_ADAPTERS} LoRA adapters, SmolLM2-135M r=16", steps=10)


if __name__ == "__main__":
    main()
