"""Shared fixtures: tiny models saved as Hugging Face directories and small data files (the command-line tests)."""

from __future__ import annotations

import json

import pytest

from .models import tiny_bert, tiny_llama
from .tiny_tokenizers import WORDS, bert_tok, llama_tok


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    model, _, _ = tiny_llama()
    tok = llama_tok()
    model.config.vocab_size = model.get_input_embeddings().num_embeddings
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    model, _, _ = tiny_bert()
    model.save_pretrained(d)
    bert_tok().save_pretrained(d)
    return d


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def lm_data(tmp_path):
    rows = [{"prompt": f"what is {a}", "completion": f"{b} {a}"} for a, b in zip(WORDS[:12], WORDS[12:24], strict=True)]
    return _jsonl(tmp_path / "train.jsonl", rows), _jsonl(tmp_path / "eval.jsonl", rows[:4])
