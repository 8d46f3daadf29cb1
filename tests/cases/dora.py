from peftkit.methods.dora import DoRA

from . import Case

CASES = [
    Case("dora-llama", "llama", lambda: DoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), hf=True),
    Case("dora-llama-all-linear-rslora", "llama",
         lambda: DoRA(r=4, alpha=8, use_rslora=True, target_modules="all-linear",
                      rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3.0}), hf=True),
    Case("dora-gpt2-conv1d", "gpt2", lambda: DoRA(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]), hf=True),
    Case("dora-bert", "bert", lambda: DoRA(r=4, alpha=8, target_modules=["query", "value", "dense"]), hf=True),
    Case("dora-pissa", "llama", lambda: DoRA(r=4, alpha=8, init="pissa", target_modules=["q_proj", "up_proj"]), hf=True),
]
