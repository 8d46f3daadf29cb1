"""Prefix tuning against peft 0.21.2: same prefixes → same logits and gradients (tiny Llama with grouped-query
attention, tiny BERT), peft files load in peftkit and our export loads in peft, greedy generation with the KV cache
gives peft's tokens; plus the parameter count L·2·n·d_kv and bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import peftkit
from peftkit.methods.prefix import PrefixEncoder, PrefixTuning

from .models import MODELS
from .models import outputs as _outputs

# BERT runs through peft's FEATURE_EXTRACTION model: its SEQ_CLS model cannot pass a cache to transformers 5 encoders
CASES = [
    ("llama", "CAUSAL_LM", dict(num_virtual_tokens=4)),
    ("llama", "CAUSAL_LM", dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24)),
    ("bert", "FEATURE_EXTRACTION", dict(num_virtual_tokens=5)),
    ("bert", "FEATURE_EXTRACTION", dict(num_virtual_tokens=2, prefix_projection=True)),
]
IDS = [f"{a}-{i}" for i, (a, _, _) in enumerate(CASES)]


def _peft(arch, task, kw, seed=0):
    model, inputs, out = MODELS[arch](seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, PrefixTuningConfig(task_type=task, **kw)).eval()
    return pm, inputs, out


def _peft_call(pm, inputs, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return out(pm(**inputs))


def _encoder(model) -> PrefixEncoder:
    return next(iter(peftkit.get_adapter(model, "default").values()))


def _ours_like(pm, arch, kw):
    ours, inputs, out = MODELS[arch](0)
    peftkit.attach(ours, PrefixTuning(**kw))
    enc = _encoder(ours)
    src = pm.prompt_encoder["default"]
    with torch.no_grad():
        if kw.get("prefix_projection"):
            enc.embedding.copy_(src.embedding.weight)
            enc.transform.load_state_dict(src.transform.state_dict())
        else:
            enc.prefix.copy_(src.embedding.weight)
    return ours, inputs, out


def _peft_params(pm, kw):
    src = pm.prompt_encoder["default"]
    if kw.get("prefix_projection"):
        return [src.embedding.weight, *src.transform.parameters()]
    return [src.embedding.weight]


def _our_params(model, kw):
    enc = _encoder(model)
    return [enc.embedding, *enc.transform.parameters()] if kw.get("prefix_projection") else [enc.prefix]


@pytest.mark.parametrize("arch,task,kw", CASES, ids=IDS)
def test_same_prefix_same_outputs_and_gradients(arch, task, kw):
    pm, inputs, out = _peft(arch, task, kw)
    inputs = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
    inputs["attention_mask"][1, :3] = 0  # left padding in one row
    ref = _peft_call(pm, inputs, out)
    ours, _, _ = _ours_like(pm, arch, kw)
    base_out = _outputs(MODELS[arch](0)[0], inputs, out)
    assert not torch.allclose(ref, base_out, atol=1e-3)  # the prefix changes the model
    y = out(ours(**inputs))
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    _peft_call(pm, inputs, out).pow(2).mean().backward()
    y.pow(2).mean().backward()
    for a, b in zip(_our_params(ours, kw), _peft_params(pm, kw), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,task,kw", CASES, ids=IDS)
def test_peft_file_loads_with_same_outputs(arch, task, kw, tmp_path):
    pm, inputs, out = _peft(arch, task, kw)
    ref = _peft_call(pm, inputs, out)
    pm.save_pretrained(tmp_path)
    base, _, _ = MODELS[arch](0)
    peftkit.load(base, tmp_path)
    assert torch.allclose(_outputs(base, inputs, out), ref, atol=1e-5, rtol=1e-5)
    assert _encoder(base).config.num_virtual_tokens == kw["num_virtual_tokens"]


@pytest.mark.parametrize("arch,task,kw", CASES, ids=IDS)
def test_our_export_loads_in_peft_with_same_outputs(arch, task, kw, tmp_path):
    ours, inputs, out = MODELS[arch](0)
    peftkit.attach(ours, PrefixTuning(**kw))
    ref = _outputs(ours, inputs, out)
    peftkit.save(ours, tmp_path, format="hf")
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (hf["peft_type"], hf["task_type"]) == ("PREFIX_TUNING", task)
    base, _, _ = MODELS[arch](0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(_peft_call(pm, inputs, out), ref, atol=1e-5, rtol=1e-5)


def test_generate_with_kv_cache_equals_recomputing_with_the_prefix():
    """``generate`` (prefix in the KV cache at the first step, then one token at a time) gives the tokens of greedy
    decoding that recomputes the whole sequence with the prefix at every step. (peft 0.21.2's own ``generate`` under
    transformers 5 disagrees with its forward from the first new token, so it is not the reference here.)"""
    kw = dict(num_virtual_tokens=4)
    pm, inputs, _ = _peft("llama", "CAUSAL_LM", kw)
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.mul_(3.0)  # a prefix that changes the greedy tokens
    ours, _, _ = _ours_like(pm, "llama", kw)
    ids = inputs["input_ids"][:2, :5]
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
        with peftkit.disabled(ours):
            plain = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = _peft_call(pm, {"input_ids": seq, "attention_mask": torch.ones_like(seq)}, lambda r: r.logits)
            seq = torch.cat([seq, nxt[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)
    assert not torch.equal(got, plain)


def test_trainable_count_and_grouped_query_layout():
    """L·2·n·d_kv numbers; the tiny Llama has 2 key/value heads of 8 (d_kv = 16, not the width 32)."""
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=6))
    n = sum(p.numel() for p in peftkit.adapter_parameters(model).values())
    assert n == 2 * 2 * 6 * 16
    kv = _encoder(model).key_values(batch=3, dtype=torch.float32, device=torch.device("cpu"))
    assert len(kv) == 2 and kv[0][0].shape == (3, 2, 6, 8)
    # layer 1's values are the last quarter of each prefix row
    assert torch.equal(kv[1][1][0].permute(1, 0, 2).reshape(6, 16), _encoder(model).prefix[:, 48:])


def test_zero_init_and_disabled():
    model, inputs, out = MODELS["bert"](0)
    y0 = _outputs(model, inputs, out)
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=3, init_weights="zero"))
    assert torch.count_nonzero(_encoder(model).prefix) == 0
    with peftkit.disabled(model):
        assert torch.equal(_outputs(model, inputs, out), y0)
    peftkit.unload(model)
    assert torch.equal(_outputs(model, inputs, out), y0)


@pytest.mark.parametrize("kw,match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
    (dict(init_weights="gaussian"), "init_weights must be None"),
    (dict(encoder_hidden_size=-1), "encoder_hidden_size must be a positive integer"),
    (dict(target_modules=["q_proj"]), "input embedding"),
])
def test_bad_input(kw, match):
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.attach(model, PrefixTuning(**kw))
    assert not peftkit.adapter_names(model)


def test_two_active_prefixes_refused():
    model, inputs, _ = MODELS["llama"](0)
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=2), name="a")
    peftkit.attach(model, PrefixTuning(num_virtual_tokens=2), name="b")
    peftkit.activate(model, ["a", "b"])
    with pytest.raises(peftkit.PeftkitError, match="activate one of them"):
        model(**inputs)
