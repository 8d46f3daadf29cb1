from peftkit.methods.sorsa import SORSA

from . import Case

CASES = [
    Case("sorsa-llama", "llama", lambda: SORSA(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), tol=1e-4),
    Case("sorsa-llama-pattern", "llama", lambda: SORSA(r=4, gamma=0.0, rank_pattern={"up_proj": 2},
                                                       target_modules=["o_proj", "up_proj"]), tol=1e-4),
    Case("sorsa-bert", "bert", lambda: SORSA(r=3, target_modules=["query", "value", "dense"]), tol=1e-4),
    Case("sorsa-gpt2-conv1d", "gpt2", lambda: SORSA(r=4, target_modules=["c_attn", "c_fc"]), tol=1e-4),
]
