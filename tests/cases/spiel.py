from peftkit.methods.spiel import SpIEL

from . import Case

CASES = [
    Case("spiel-llama", "llama", lambda: SpIEL(density=0.05, target_modules="all-linear")),
    Case("spiel-gpt2-conv1d", "gpt2", lambda: SpIEL(density=0.1, update_every=4, accumulation_steps=2,
                                                    target_modules=["c_attn", "c_fc"])),
    Case("spiel-cnn", "cnn", lambda: SpIEL(density=0.2, target_modules=["conv1", "seq", "fc"])),
]
