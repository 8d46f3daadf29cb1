"""PaCA vs LoRA: activation bytes kept for backward on SmolLM2-135M (deterministic, no timing).

PaCA and LoRA of the same rank on every linear layer of the blocks (q/k/v/o/gate/up/down), one
forward pass with the loss on a batch of 2×128 tokens. Counted with saved-tensor hooks, each
storage once, parameters and buffers excluded: the whole model, and the part saved inside the
adapted linear layers (the rest — attention, norms, activations — is the same for both).
peft's LoRA is measured too, as the reference library.

    python benchmarks/paca_memory.py [--r 8] [--rows 2] [--length 128] [--json out.json]
"""

from __future__ import annotations

import _common as C
import torch


def saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], inside: type | None) -> tuple[int, int]:
    """(all saved activation bytes, those saved while a module of class ``inside`` runs)."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    depth = [0]
    seen: dict[int, tuple[int, bool]] = {}
    handles = []
    if inside is not None:
        for m in model.modules():
            if isinstance(m, inside):
                handles.append(m.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1)))
                handles.append(m.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in resident:
            seen.setdefault(st.data_ptr(), (st.nbytes(), depth[0] > 0))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        del loss
    finally:
        for h in handles:
            h.remove()
    return sum(b for b, _ in seen.values()), sum(b for b, ins in seen.values() if ins)


def run(r: int, rows: int, length: int) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    import peftkit
    from peftkit.core.site import AdapterSite

    C.setup()
    batch = C.token_batch(rows, length, 49152)
    paca = peftkit.attach(C.base_model(), peftkit.PaCA(r=r, target_modules=C.BLOCK_LINEARS))
    total_paca, lin_paca = saved_bytes(paca.train(), batch, AdapterSite)
    del paca
    lora = peftkit.attach(C.base_model(), peftkit.LoRA(r=r, alpha=2 * r, target_modules=C.BLOCK_LINEARS))
    total_lora, lin_lora = saved_bytes(lora.train(), batch, AdapterSite)
    del lora
    ref = get_peft_model(C.base_model(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=C.BLOCK_LINEARS))
    total_peft, lin_peft = saved_bytes(ref.train(), batch, LoraLayer)
    mb = 1024.0 ** 2
    return {
        "paca_total_MB": total_paca / mb,
        "lora_total_MB": total_lora / mb,
        "peft_lora_total_MB": total_peft / mb,
        "paca_linears_MB": lin_paca / mb,
        "lora_linears_MB": lin_lora / mb,
        "peft_lora_linears_MB": lin_peft / mb,
        "total_ratio_paca_over_lora": total_paca / total_lora,
        "linears_ratio_paca_over_lora": lin_paca / lin_lora,
        "total_ratio_paca_over_peft_lora": total_paca / total_peft,
    }


if __name__ == "__main__":
    C.cli(__doc__, run, "PaCA / LoRA saved activation bytes, SmolLM2-135M", r=8, rows=2, length=128)
