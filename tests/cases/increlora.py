from peftkit.methods.increlora import IncreLoRA

from . import Case

CASES = [
    Case("increlora-llama", "llama",
         lambda: IncreLoRA(init_r=2, target_r=3, max_r=4, total_step=10, delta_t=2,
                           target_modules=["q_proj", "v_proj", "down_proj"])),
    Case("increlora-gpt2-conv1d", "gpt2",
         lambda: IncreLoRA(init_r=1, target_r=2, max_r=3, total_step=10, target_modules=["c_attn", "c_fc"])),
    Case("increlora-cnn", "cnn", lambda: IncreLoRA(init_r=1, target_r=2, max_r=2, total_step=4, delta_t=1,
                                                  target_modules=["conv1", "fc"])),
]
