from peftkit import NOLA

from . import Case

CASES = [
    Case("nola-llama", "llama", lambda: NOLA(r=4, alpha=8, num_basis_a=8, num_basis_b=6,
                                             target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2})),
    Case("nola-gpt2-conv1d", "gpt2", lambda: NOLA(r=2, num_basis_a=4, num_basis_b=4, seed=3, target_modules=["c_attn"])),
]
