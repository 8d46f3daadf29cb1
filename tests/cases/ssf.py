from peftkit.methods.ssf import SSF

from . import Case

CASES = [
    Case("ssf-llama-default", "llama", lambda: SSF()),
    Case("ssf-bert-layernorm", "bert", lambda: SSF(target_modules=["query", "dense", "LayerNorm"])),
    Case("ssf-gpt2-conv1d", "gpt2", lambda: SSF(target_modules=["c_attn", "c_fc", "ln_1"])),
    Case("ssf-cnn-conv", "cnn", lambda: SSF(target_modules=["conv1", "conv2", "seq", "fc"])),
]
