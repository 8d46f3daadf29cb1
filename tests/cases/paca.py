from peftkit.methods.paca import PaCA

from . import Case

CASES = [
    Case("paca-llama", "llama", lambda: PaCA(r=4, target_modules="all-linear")),
    Case("paca-llama-pattern", "llama", lambda: PaCA(r=4, seed=3, rank_pattern={"down_proj": 8},
                                                     target_modules=["q_proj", "v_proj", "down_proj"])),
    Case("paca-bert", "bert", lambda: PaCA(r=2, target_modules=["query", "value", "dense"])),
    Case("paca-cnn-fc", "cnn", lambda: PaCA(r=2, target_modules=["fc"])),
    Case("paca-gpt2-conv1d", "gpt2", lambda: PaCA(r=4, target_modules=["c_attn", "c_proj", "c_fc"])),
]
