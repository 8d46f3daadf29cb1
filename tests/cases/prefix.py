from peftkit.methods.prefix import PrefixTuning

from . import Case

# prefixes lengthen attention: not identity at init, not mergeable, no mixed batches
_FLAGS = dict(identity_at_init=False, mergeable=False, hf=True, mixed=False)

CASES = [
    Case("prefix-llama", "llama", lambda: PrefixTuning(num_virtual_tokens=4), **_FLAGS),
    Case("prefix-llama-projection", "llama",
         lambda: PrefixTuning(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24), **_FLAGS),
    Case("prefix-bert", "bert", lambda: PrefixTuning(num_virtual_tokens=5), **_FLAGS),
]
