from functools import cache

from peftkit.methods.sparse import SparseFT, fish_scores

from . import Case


@cache
def _llama_fish_scores() -> dict:
    from ..models import MODELS

    model, inputs, _ = MODELS["llama"](0)
    ids = inputs["input_ids"]
    batches = [{"input_ids": ids[i:i + 2], "labels": ids[i:i + 2]} for i in (0, 2)]
    scores = fish_scores(model, batches, target_modules=["q_proj", "down_proj", "embed_tokens"])
    return {k: v.clone() for k, v in scores.items()}


CASES = [
    Case("sparse-llama-magnitude", "llama", lambda: SparseFT(density=0.05, selection="magnitude", target_modules="all-linear")),
    Case("sparse-llama-fish", "llama",
         lambda: SparseFT(density=0.1, selection="fish", scores=_llama_fish_scores(),
                          target_modules=["q_proj", "down_proj", "embed_tokens"])),
    Case("sparse-bert-random", "bert", lambda: SparseFT(density=0.1, selection="random", seed=3,
                                                      target_modules=["query", "value", "dense"])),
    Case("sparse-gpt2-conv1d", "gpt2", lambda: SparseFT(density=0.05, target_modules=["c_attn", "c_proj"])),
    Case("sparse-cnn", "cnn", lambda: SparseFT(density=0.2, selection="random", target_modules=["conv1", "conv2", "seq", "fc"])),
]
