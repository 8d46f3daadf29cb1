"""The GGUF start-up cache (peftkit.hub.cache): keyed by package version and file hash, written atomically, and a
converted model that gives the outputs of the original."""

from __future__ import annotations

import torch

from peftkit.hub import cache

from .models import tiny_llama
from .tiny_tokenizers import llama_tok


def test_entry_is_keyed_by_version_and_content_and_written_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model.gguf"
    src.write_bytes(b"weights v1")
    assert cache.lookup(src) is None
    calls = []

    def write(d):
        calls.append(d)
        (d / "model.safetensors").write_bytes(b"converted")

    entry = cache.store(src, write)
    assert entry == cache.lookup(src) and (entry / "model.safetensors").read_bytes() == b"converted"
    assert entry.name.startswith("model-") and cache.file_digest(src) in entry.name
    assert calls[0] != entry and calls[0].parent == entry.parent  # built in a temporary sibling, then renamed
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary left
    src.write_bytes(b"weights v2")  # another file content: another entry
    assert cache.lookup(src) is None
    monkeypatch.setattr("peftkit._version.__version__", "9.9.9")  # another package version: another entry
    src.write_bytes(b"weights v1")
    assert cache.lookup(src) is None


def test_a_failed_build_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"x")

    def broken(d):
        (d / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    assert cache.store(src, broken) is None
    assert cache.lookup(src) is None and list((tmp_path / "cache" / "converted").iterdir()) == []
    monkeypatch.setenv("PEFTKIT_CACHE", "off")
    assert not cache.enabled()


def test_converted_model_gives_the_same_outputs(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _, _ = tiny_llama(0)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight
    model.eval()
    cache.save_converted(model, llama_tok(), tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 4, 7, 2, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert again.lm_head.weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()
    assert AutoTokenizer.from_pretrained(tmp_path)("hello world")["input_ids"] == llama_tok()("hello world")["input_ids"]
