from peftkit import ChainLoRA

from . import Case

# hf: written as the equivalent peft LoRA of rank num_links·r (read back as a plain LoRA)

CASES = [
    Case("chain-lora-llama", "llama", lambda: ChainLoRA(r=4, alpha=8, num_links=3, steps_per_link=2,
                                                        target_modules=["q_proj", "v_proj", "down_proj"]), hf=True),
    Case("chain-lora-gpt2-conv1d", "gpt2", lambda: ChainLoRA(r=2, alpha=4, num_links=2, target_modules=["c_attn"]), hf=True),
]
