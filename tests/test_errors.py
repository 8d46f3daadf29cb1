"""Bad input fails early with a message naming the culprit, and leaves model and files untouched."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core.site import AdapterSite

from .models import MODELS


def untouched(model) -> bool:
    return not any(isinstance(m, AdapterSite) for m in model.modules())


@pytest.mark.parametrize("r", [0, -1, 1.5])
def test_rank_must_be_positive_int(r):
    m = MODELS["llama"](0)[0]
    with pytest.raises(peftkit.ConfigError, match=r"r must be (a positive integer|an integer)"):
        peftkit.attach(m, peftkit.LoRA(r=r, target_modules=["q_proj"]))
    assert untouched(m)


def test_rank_larger_than_layer():
    m = MODELS["llama"](0)[0]
    with pytest.raises(peftkit.TargetError, match=r"k_proj: rank 20 is larger than the layer allows \(16"):
        peftkit.attach(m, peftkit.LoRA(r=20, target_modules=["q_proj", "k_proj"]))
    assert untouched(m)


def test_unsupported_layer_type():
    m = MODELS["llama"](0)[0]
    with pytest.raises(peftkit.TargetError, match="lora does not support LlamaRMSNorm"):
        peftkit.attach(m, peftkit.LoRA(target_modules=["q_proj", "input_layernorm"]))
    assert untouched(m)


def test_bad_options_name_the_option():
    with pytest.raises(peftkit.ConfigError, match="dropout"):
        peftkit.attach(MODELS["llama"](0)[0], peftkit.LoRA(dropout=1.5, target_modules=["q_proj"]))
    with pytest.raises(peftkit.ConfigError, match="did you mean 'pissa'"):
        peftkit.attach(MODELS["llama"](0)[0], peftkit.LoRA(init="pisa", target_modules=["q_proj"]))
    with pytest.raises(peftkit.ConfigError, match=r"unknown method 'lorra'.*did you mean 'lora'"):
        peftkit.get_method("lorra")


def test_unknown_adapter_name():
    m = MODELS["llama"](0)[0]
    peftkit.attach(m, peftkit.LoRA(target_modules=["q_proj"]), name="sst2")
    for call in (lambda: peftkit.activate(m, "sst"), lambda: peftkit.merge(m, "sst"), lambda: peftkit.delete(m, "sst"),
                 lambda: peftkit.save(m, "/tmp/never", name="sst"), lambda: peftkit.mixed_batch(m, ["sst"]).__enter__()):
        with pytest.raises(peftkit.AdapterNotFoundError, match=r"no adapter named 'sst'.*did you mean 'sst2'"):
            call()


def test_duplicate_name_and_bad_name():
    m = MODELS["llama"](0)[0]
    peftkit.attach(m, peftkit.LoRA(target_modules=["q_proj"]))
    with pytest.raises(peftkit.ConfigError, match="already attached"):
        peftkit.attach(m, peftkit.LoRA(target_modules=["v_proj"]))
    with pytest.raises(peftkit.ConfigError, match="adapter name"):
        peftkit.attach(m, peftkit.LoRA(target_modules=["v_proj"]), name="a.b")


def test_load_missing_path(tmp_path):
    with pytest.raises(peftkit.AdapterLoadError, match="no such adapter directory"):
        peftkit.load(MODELS["llama"](0)[0], tmp_path / "nope")
    with pytest.raises(peftkit.AdapterLoadError, match="no adapter here"):
        peftkit.load(MODELS["llama"](0)[0], tmp_path)


def saved(tmp_path, fmt="peftkit"):
    m = MODELS["llama"](0)[0]
    peftkit.attach(m, peftkit.LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    peftkit.save(m, tmp_path / "a", format=fmt)
    return tmp_path / "a"


@pytest.mark.parametrize("fmt,weights", [("peftkit", "adapter.safetensors"), ("hf", "adapter_model.safetensors")])
def test_truncated_or_corrupt_weights(tmp_path, fmt, weights):
    d = saved(tmp_path, fmt)
    data = (d / weights).read_bytes()
    (d / weights).write_bytes(data[: len(data) // 2])
    m = MODELS["llama"](0)[0]
    with pytest.raises(peftkit.AdapterLoadError, match="corrupt or truncated"):
        peftkit.load(m, d)
    assert untouched(m)
    (d / weights).write_bytes(b"\x00" * 5)
    with pytest.raises(peftkit.AdapterLoadError, match=weights):
        peftkit.load(m, d)


def test_corrupt_config(tmp_path):
    d = saved(tmp_path)
    (d / "peftkit_adapter.json").write_text("{not json")
    with pytest.raises(peftkit.AdapterLoadError, match="not valid JSON"):
        peftkit.load(MODELS["llama"](0)[0], d)


def test_adapter_for_a_different_base_names_tensor_and_shapes(tmp_path):
    d = saved(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(peftkit.AdapterLoadError) as e:
        peftkit.load(other, d)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj.lora_A" in msg and "(4, 32)" in msg and "(4, 48)" in msg
    assert msg.count("has shape") == 8  # every mismatch, not only the first
    assert untouched(other)
    with pytest.raises(peftkit.AdapterLoadError, match="not in Sequential"):
        peftkit.load(nn.Sequential(nn.Linear(2, 2)), d)


def test_hf_file_for_a_different_base(tmp_path):
    d = saved(tmp_path, "hf")
    gpt2 = MODELS["gpt2"](0)[0]
    with pytest.raises(peftkit.AdapterLoadError, match="q_proj"):
        peftkit.load(gpt2, d)
    assert untouched(gpt2)


def test_unknown_peft_type(tmp_path):
    d = saved(tmp_path, "hf")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "VBLORA"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(peftkit.AdapterLoadError, match="peft_type 'VBLORA' is not supported"):
        peftkit.load(MODELS["llama"](0)[0], d)


def test_failed_save_keeps_existing_files(tmp_path, monkeypatch):
    d = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    m = MODELS["llama"](0)[0]
    peftkit.attach(m, peftkit.LoRA(r=2, target_modules=["k_proj"]))

    import peftkit.core.files as files

    def boom(f):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        peftkit.save(m, d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # no temp files left, nothing damaged
    monkeypatch.undo()
    fresh = MODELS["llama"](0)[0]
    peftkit.load(fresh, d)
    assert set(peftkit.get_adapter(fresh, "default")) == {f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                                          for p in ("q_proj", "v_proj")}


def test_unknown_format():
    m = MODELS["llama"](0)[0]
    peftkit.attach(m, peftkit.LoRA(target_modules=["q_proj"]))
    with pytest.raises(peftkit.ConfigError, match="did you mean 'hf'"):
        peftkit.save(m, "/tmp/x", format="hf2")


def test_dtype_mismatch_is_reported(tmp_path):
    d = saved(tmp_path)
    from safetensors.torch import load_file, save_file

    t = load_file(d / "adapter.safetensors")
    key = next(iter(t))
    t[key] = t[key].to(torch.int32)
    save_file(t, d / "adapter.safetensors")
    with pytest.raises(peftkit.AdapterLoadError, match=f"{key} has dtype torch.int32"):
        peftkit.load(MODELS["llama"](0)[0], d)
