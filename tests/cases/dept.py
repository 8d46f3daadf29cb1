from peftkit import DePT

from . import Case

# the prompt lengthens the input: not identity at init, not mergeable, no mixed batches; no peft form
_FLAGS = dict(identity_at_init=False, mergeable=False, mixed=False)

CASES = [
    Case("dept-llama", "llama", lambda: DePT(num_virtual_tokens=3, r=2, max_positions=16), **_FLAGS),
    Case("dept-gpt2-short-s", "gpt2", lambda: DePT(num_virtual_tokens=2, r=2, max_positions=5), **_FLAGS),
    Case("dept-bert-cls", "bert", lambda: DePT(num_virtual_tokens=2, r=3, max_positions=32), **_FLAGS),
    Case("dept-llama-no-prompt", "llama", lambda: DePT(num_virtual_tokens=0, r=2, max_positions=16),
         mergeable=False, mixed=False),
]
