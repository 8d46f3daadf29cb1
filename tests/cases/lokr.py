from peftkit import LoKr

from . import Case

CASES = [
    Case("lokr-llama-decompose-both", "llama",
         lambda: LoKr(r=2, alpha=4, decompose_both=True, decompose_factor=4, rank_dropout=0.2, rank_dropout_scale=True,
                      target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"up_proj": 1}), hf=True),
    Case("lokr-cnn-effective-conv", "cnn",
         lambda: LoKr(r=1, alpha=4, use_effective_conv2d=True, target_modules=["conv1", "conv2", "seq", "fc"]), hf=True),
]
