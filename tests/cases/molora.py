from peftkit import MoLoRA

from . import Case

CASES = [
    Case("molora-llama", "llama", lambda: MoLoRA(r=4, alpha=8, num_experts=3, top_k=2,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]), mergeable=False),
    Case("molora-gpt2-conv1d-top1", "gpt2", lambda: MoLoRA(r=2, alpha=4, num_experts=2, top_k=1,
                                                           target_modules=["c_attn", "c_fc"]), mergeable=False),
]
