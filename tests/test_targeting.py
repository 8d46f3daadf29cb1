"""Target patterns: names, suffixes, globs, regexes, classes, all-linear, excludes; errors name the culprit."""

from __future__ import annotations

import pytest
from torch import nn

import peftkit
from peftkit.core.targeting import resolve_targets

from .models import MODELS


def targets(model, pats, exclude=None):
    return resolve_targets(model, pats, exclude)


def llama():
    return MODELS["llama"](0)[0]


def test_suffix_exact_glob_regex_and_class():
    m = llama()
    assert targets(m, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert targets(m, ["model.layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    assert targets(m, ["layers.1.*.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    assert targets(m, ["re:.*\\.0\\.mlp\\.(up|down)_proj"]) == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert len(targets(m, [nn.Embedding])) == 1
    assert targets(m, ["LlamaRMSNorm"])[0] == "model.layers.0.input_layernorm"


def test_all_linear_skips_the_output_head():
    m = llama()
    t = targets(m, "all-linear")
    assert len(t) == 14 and "lm_head" not in t
    bert = MODELS["bert"](0)[0]
    assert "classifier" not in targets(bert, "all-linear")
    gpt2 = MODELS["gpt2"](0)[0]
    assert len(targets(gpt2, "all-linear")) == 8  # Conv1D layers count as linear


def test_exclude_modules():
    m = llama()
    t = targets(m, "all-linear", exclude=["re:.*mlp.*", "layers.0.self_attn.k_proj"])
    assert len(t) == 7 and all("mlp" not in n for n in t)


def test_pattern_matching_nothing_is_named_with_suggestions_even_if_others_match():
    m = llama()
    with pytest.raises(peftkit.TargetError) as e:
        peftkit.attach(m, peftkit.LoRA(target_modules=["q_proj", "v_prj"]))
    msg = str(e.value)
    assert "'v_prj'" in msg and "v_proj" in msg and "'q_proj'" not in msg
    assert not any(isinstance(x, peftkit.core.site.AdapterSite) for x in m.modules())  # untouched


def test_pattern_far_from_every_name_lists_the_layer_names():
    with pytest.raises(peftkit.TargetError) as e:
        peftkit.attach(MODELS["bert"](0)[0], peftkit.LoRA(target_modules=["qkv"]))
    msg = str(e.value)
    assert "layers are named" in msg and "query" in msg and "classifier" in msg and "encoder" not in msg


def test_bad_regex_is_reported():
    with pytest.raises(peftkit.ConfigError, match="regular expression"):
        targets(llama(), ["re:(unclosed"])


def test_second_adapter_targets_existing_sites():
    m = llama()
    peftkit.attach(m, peftkit.LoRA(target_modules=["q_proj"]), name="a")
    peftkit.attach(m, peftkit.LoRA(target_modules=["q_proj", "v_proj"]), name="b")
    site = m.model.layers[0].self_attn.q_proj
    assert list(site.adapters) == ["a", "b"]
    assert isinstance(site.base, nn.Linear)


def test_default_targets_by_model_type():
    m = llama()
    peftkit.attach(m, peftkit.LoRA())
    assert set(peftkit.get_adapter(m, "default")) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    }


def test_no_targets_and_no_default():
    with pytest.raises(peftkit.ConfigError, match="target_modules"):
        peftkit.attach(nn.Sequential(nn.Linear(2, 2)), peftkit.LoRA())
