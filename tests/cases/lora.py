from peftkit import LoRA

from . import Case

CASES = [
    Case("lora-llama", "llama", lambda: LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), hf=True),
    Case("lora-llama-all-linear-rslora", "llama",
         lambda: LoRA(r=4, alpha=8, use_rslora=True, target_modules="all-linear",
                      rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3.0}), hf=True),
    Case("lora-llama-embedding", "llama", lambda: LoRA(r=4, alpha=4, target_modules=["embed_tokens"]), hf=True),
    Case("lora-bert", "bert", lambda: LoRA(r=4, alpha=8, target_modules=["query", "value", "dense"]), hf=True),
    Case("lora-gpt2-conv1d", "gpt2", lambda: LoRA(r=4, alpha=8, target_modules=["c_attn", "c_proj"]), hf=True),
    Case("lora-cnn", "cnn", lambda: LoRA(r=2, alpha=4, target_modules=["conv1", "conv2", "seq", "fc"]), hf=True),
    Case("lora-gaussian", "llama", lambda: LoRA(r=4, alpha=8, init="gaussian", target_modules=["q_proj"]), hf=True),
    Case("pissa", "llama", lambda: LoRA(r=4, alpha=8, init="pissa", target_modules=["q_proj", "up_proj"]), hf=True),
    Case("milora", "llama", lambda: LoRA(r=4, alpha=4, init="milora", target_modules=["k_proj", "o_proj"]), hf=True),
    Case("pissa-niter", "gpt2", lambda: LoRA(r=4, alpha=8, init="pissa_niter_4", target_modules=["c_fc"]), hf=True),
]
