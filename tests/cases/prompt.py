from peftkit.methods.prompt import PromptTuning

from . import Case

# prompt tuning changes the sequence length: not identity at init, not mergeable, no mixed batches
_FLAGS = dict(identity_at_init=False, mergeable=False, hf=True, mixed=False)

CASES = [
    Case("prompt-llama", "llama", lambda: PromptTuning(num_virtual_tokens=4), **_FLAGS),
    Case("prompt-gpt2-text", "gpt2",
         lambda: PromptTuning(num_virtual_tokens=5, prompt_tuning_init="text", init_token_ids=[3, 14, 15]), **_FLAGS),
    Case("prompt-bert-cls", "bert", lambda: PromptTuning(num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"),
         **_FLAGS),
]
