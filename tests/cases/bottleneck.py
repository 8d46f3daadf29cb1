from peftkit.methods.bottleneck import Bottleneck

from . import Case

CASES = [
    Case("bottleneck-houlsby-llama", "llama", lambda: Bottleneck(placement="houlsby", non_linearity="silu"),
         mergeable=False),
    Case("bottleneck-pfeiffer-llama", "llama", lambda: Bottleneck(placement="pfeiffer", reduction_factor=8),
         mergeable=False),
    Case("bottleneck-parallel-llama", "llama", lambda: Bottleneck(placement="parallel", scaling=4.0, bottleneck_size=4),
         mergeable=False),
    Case("bottleneck-houlsby-bert", "bert", lambda: Bottleneck(placement="houlsby", non_linearity="gelu"),
         mergeable=False),
    Case("bottleneck-houlsby-gpt2", "gpt2", lambda: Bottleneck(placement="houlsby", non_linearity="tanh"),
         mergeable=False),
    Case("bottleneck-parallel-gpt2", "gpt2", lambda: Bottleneck(placement="parallel", dropout=0.1, reduction_factor=4),
         mergeable=False),
]
