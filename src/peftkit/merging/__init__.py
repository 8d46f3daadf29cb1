"""Merging adapters and checkpoints, and extracting LoRA from full fine-tunes.

* :func:`merge_adapters` — adapters in, a new adapter out (factor space for LoRA where exact);
* :func:`merge_checkpoints` — safetensors checkpoints merged lazily, tensor by tensor;
* :func:`extract_lora` — a LoRA from ``W_ft − W_0`` by truncated SVD, with per-layer errors;
* :func:`learn_coefficients` — aTLAS-style per-tensor coefficients learned on validation batches;
* :data:`MERGE_METHODS` / :func:`merge_method` — the registry of typed merge methods.
"""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .api import merge_adapters, run_spec
from .atlas import learn_coefficients
from .checkpoint import merge_checkpoints
from .extract import LayerReport, extract_lora
from .registry import MERGE_METHODS, MaskSource, MergeOptions, get_merge_method, make_options, merge_method

__all__ = [
    "MERGE_METHODS",
    "LayerReport",
    "MaskSource",
    "MergeOptions",
    "extract_lora",
    "get_merge_method",
    "learn_coefficients",
    "make_options",
    "merge_adapters",
    "merge_checkpoints",
    "merge_method",
    "run_spec",
]
