from peftkit.methods.parallel_adapter import MAM

from . import Case

# the prefix lengthens attention: not identity at init, not mergeable, no mixed batches; no peft form
_FLAGS = dict(identity_at_init=False, mergeable=False, mixed=False)

CASES = [
    Case("mam-llama", "llama", lambda: MAM(num_virtual_tokens=3, bottleneck_size=8), **_FLAGS),
    Case("mam-bert", "bert", lambda: MAM(num_virtual_tokens=2, reduction_factor=4, non_linearity="gelu"), **_FLAGS),
    Case("mam-gpt2-projection", "gpt2",
         lambda: MAM(num_virtual_tokens=2, prefix_projection=True, bottleneck_size=4, scaling=2.0), **_FLAGS),
]
