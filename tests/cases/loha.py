from peftkit import LoHa

from . import Case

CASES = [
    Case("loha-llama-patterns", "llama",
         lambda: LoHa(r=4, alpha=6, rank_dropout=0.2, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3.0}), hf=True),
    Case("loha-cnn-effective-conv", "cnn",
         lambda: LoHa(r=2, alpha=4, use_effective_conv2d=True, target_modules=["conv1", "conv2", "seq", "fc"]), hf=True),
]
