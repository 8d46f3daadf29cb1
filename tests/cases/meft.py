from peftkit.methods.meft import MEFT

from . import Case

# MEFT starts at the PLM plus a λ-scaled skip from two layers back (λ = 0 would not be invertible), so the
# output at init differs from the base by O(λ): identity_at_init is False here and tests/test_meft.py checks
# the exact start instead. Not mergeable (no weight form), no mixed batches, no peft form.
_FLAGS = dict(identity_at_init=False, mergeable=False, mixed=False)

CASES = [
    Case("meft1-llama", "llama", lambda: MEFT(variant=1, bottleneck_size=4), **_FLAGS),
    Case("meft2-llama", "llama", lambda: MEFT(variant=2, bottleneck_size=4), **_FLAGS),
    Case("meft1-bert", "bert", lambda: MEFT(variant=1, bottleneck_size=4), **_FLAGS),
    Case("meft3-llama", "llama", lambda: MEFT(variant=3, bottleneck_size=4), **_FLAGS),
    Case("meft3-bert", "bert", lambda: MEFT(variant=3, bottleneck_size=4), **_FLAGS),
    Case("meft2-bert-plain", "bert", lambda: MEFT(variant=2, reversible_layers=0, non_linearity="relu"), **_FLAGS),
]
