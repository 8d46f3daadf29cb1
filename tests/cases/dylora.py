from peftkit.methods.dylora import DyLoRA

from . import Case

CASES = [
    Case("dylora-llama", "llama", lambda: DyLoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    Case("dylora-gpt2-conv1d-eval-rank", "gpt2", lambda: DyLoRA(r=4, alpha=8, eval_rank=2, target_modules=["c_attn", "c_fc"])),
    Case("dylora-bert", "bert", lambda: DyLoRA(r=3, alpha=6, r_min=2, target_modules=["query", "value"])),
]
