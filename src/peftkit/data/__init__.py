"""Training data: read records from files, tokenize them for causal LM or classification, batch them.

    from peftkit.data import load_records, build_causal_lm_examples, batches
    records = load_records("gsm8k/train.jsonl", columns={"prompt": "question", "completion": "answer"})
    examples = build_causal_lm_examples(records, tokenizer, max_length=512)
    for batch in batches(examples, batch_size=8, pad_id=tokenizer.pad_token_id, shuffle=True, seed=0): ...

Bad input (missing file or column, malformed line, unknown label) raises :class:`peftkit.ConfigError`.
"""

from .answers import extract_answer, normalize_number
from .batching import batches, collate, pad_count
from .causal import IGNORE_INDEX, DroppedExamplesWarning, build_causal_lm_examples
from .classification import build_classification_examples
from .prompts import PROMPT_FORMATS, apply_prompt_format, check_prompt_format, prompt_ids
from .records import load_records, rename_columns

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_FORMATS",
    "DroppedExamplesWarning",
    "apply_prompt_format",
    "batches",
    "build_causal_lm_examples",
    "build_classification_examples",
    "check_prompt_format",
    "collate",
    "extract_answer",
    "load_records",
    "normalize_number",
    "pad_count",
    "prompt_ids",
    "rename_columns",
]
