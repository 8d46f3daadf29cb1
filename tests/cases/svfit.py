from peftkit.methods.svfit import SVFit

from . import Case

CASES = [
    Case("svfit-llama-energy", "llama", lambda: SVFit(target_modules=["q_proj", "v_proj", "down_proj"]), tol=1e-4),
    Case("svfit-llama-fixed-r", "llama", lambda: SVFit(r=4, rank_pattern={"down_proj": 2}, target_modules="all-linear"),
         tol=1e-4),
    Case("svfit-bert", "bert", lambda: SVFit(energy=0.9, target_modules=["query", "value", "dense"]), tol=1e-4),
    Case("svfit-gpt2-conv1d", "gpt2", lambda: SVFit(r=8, target_modules=["c_attn", "c_proj"]), tol=1e-4),
]
