from peftkit.methods.qat_lora import L4Q, LRQAT

from . import Case

# The layer computes the fake-quantized base at init, not the base (identity_at_init=False);
# merge writes the on-grid weight into the dense base (mergeable); no peft form.
CASES = [
    Case("l4q-llama-all-linear", "llama", lambda: L4Q(r=4, alpha=8, bits=4, target_modules="all-linear"),
         identity_at_init=False),
    Case("l4q-gpt2-conv1d-groups", "gpt2", lambda: L4Q(r=2, alpha=4, bits=3, group_size=16,
                                                       target_modules=["c_attn", "c_fc"]), identity_at_init=False),
    Case("lrqat-llama", "llama", lambda: LRQAT(r=4, alpha=8, bits=4, target_modules=["q_proj", "v_proj", "down_proj"]),
         identity_at_init=False),
    Case("lrqat-bert-int-phi-checkpoint", "bert", lambda: LRQAT(r=2, alpha=4, bits=8, group_size=8, phi_format="int",
                                                                checkpoint=True, target_modules=["query", "dense"]),
         identity_at_init=False),
]
