from peftkit import KRAdapter

from . import Case

CASES = [
    Case("kradapter-llama", "llama", lambda: KRAdapter(target_modules=["q_proj", "k_proj", "down_proj", "up_proj"])),
    Case("kradapter-gpt2-conv1d", "gpt2", lambda: KRAdapter(scale=1.0, target_modules=["c_attn", "c_proj"])),
]
