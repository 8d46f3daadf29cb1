from peftkit.methods.hft import HFT

from . import Case

CASES = [
    Case("hft-llama", "llama", lambda: HFT(target_modules="all-linear")),
    Case("hft-gpt2-conv1d", "gpt2", lambda: HFT(stage_steps=2, target_modules=["c_attn", "c_fc"])),
    Case("hft-cnn", "cnn", lambda: HFT(target_modules=["conv1", "conv2", "seq", "fc"])),
]
