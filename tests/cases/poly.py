from peftkit import Poly

from . import Case

# n_tasks=1: every row is task 0, so the contract's plain calls need no task ids; mixed batches work
CASES = [
    Case("poly-llama", "llama", lambda: Poly(r=4, n_skills=3, target_modules=["q_proj", "v_proj", "down_proj"]),
         mergeable=False, hf=True),
    Case("mhr-bert", "bert", lambda: Poly(r=2, n_skills=2, n_splits=4, target_modules=["query", "value"]),
         mergeable=False, hf=True),
]
