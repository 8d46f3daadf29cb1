from peftkit.methods.adalora import AdaLoRA

from . import Case

CASES = [
    Case("adalora-llama", "llama",
         lambda: AdaLoRA(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj", "down_proj"]), hf=True),
    Case("adalora-gpt2-conv1d", "gpt2",
         lambda: AdaLoRA(init_r=4, target_r=2, total_step=10, target_modules=["c_attn", "c_fc"]), hf=True),
    Case("adalora-bert", "bert",
         lambda: AdaLoRA(init_r=3, target_r=1, total_step=10, target_modules=["query", "value"]), hf=True),
    Case("adalora-cnn", "cnn",
         lambda: AdaLoRA(init_r=2, target_r=1, total_step=10, target_modules=["conv1", "conv2", "fc"]), hf=True),
]
