from peftkit.methods.sara import SaRA

from . import Case

CASES = [
    Case("sara-llama", "llama", lambda: SaRA(quantile=0.1, target_modules="all-linear")),
    Case("sara-gpt2-conv1d-penalty", "gpt2",
         lambda: SaRA(quantile=0.2, nuclear_weight=1e-3, target_modules=["c_attn", "c_proj"])),
    Case("sara-cnn", "cnn", lambda: SaRA(quantile=0.15, target_modules=["conv1", "fc"])),
]
