from peftkit import ChainLoRA

from . import Case

CASES = [
    Case("chain-lora-llama", "llama", lambda: ChainLoRA(r=4, alpha=8, num_links=3, steps_per_link=2,
                                                        target_modules=["q_proj", "v_proj", "down_proj"])),
    Case("chain-lora-gpt2-conv1d", "gpt2", lambda: ChainLoRA(r=2, alpha=4, num_links=2, target_modules=["c_attn"])),
]
