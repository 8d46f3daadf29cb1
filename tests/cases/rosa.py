from functools import cache

from peftkit.methods.rosa import RoSA
from peftkit.methods.sparse import fish_scores

from . import Case


@cache
def _llama_scores() -> dict:
    from ..models import MODELS

    model, inputs, _ = MODELS["llama"](0)
    ids = inputs["input_ids"]
    scores = fish_scores(model, [{"input_ids": ids, "labels": ids}], target_modules=["q_proj", "v_proj"])
    return {k: v.clone() for k, v in scores.items()}


CASES = [
    Case("rosa-llama-gradient", "llama", lambda: RoSA(r=4, alpha=8, density=0.05, target_modules="all-linear")),
    Case("rosa-llama-scores", "llama", lambda: RoSA(r=2, density=0.1, support="scores", scores=_llama_scores(),
                                                    target_modules=["q_proj", "v_proj"])),
    Case("rosa-gpt2-conv1d", "gpt2", lambda: RoSA(r=2, density=0.05, support="magnitude", target_modules=["c_attn", "c_proj"])),
]
