"""Prompt tuning against peft 0.21.2: same prompt → same logits/loss/gradients, files both ways, generate; inits; errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from torch import nn

import peftkit
from peftkit.core.site import AdapterSite
from peftkit.methods.prompt import PromptTuning

from .models import MODELS

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _prompt(model) -> nn.Parameter:
    (p,) = peftkit.adapter_parameters(model).values()
    return p


def _pair(arch: str, n: int = 4, seed: int = 3):
    """A peft prompt-tuned model and a peftkit one holding the same prompt embeddings."""
    model, inputs, out = MODELS[arch](0)
    torch.manual_seed(seed)
    pm = get_peft_model(model, PromptTuningConfig(task_type=TASK[arch], num_virtual_tokens=n)).eval()
    ours, _, _ = MODELS[arch](0)
    peftkit.attach(ours, PromptTuning(num_virtual_tokens=n))
    with torch.no_grad():
        _prompt(ours).copy_(pm.prompt_encoder["default"].embedding.weight)
    return pm, ours, inputs, out


def _labels(arch: str, inputs: dict) -> torch.Tensor:
    if arch == "bert":
        return torch.tensor([0, 2, 1, 2])
    labels = inputs["input_ids"].clone()
    labels[:, :2] = -100
    return labels


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_forward_and_loss_equal_peft(arch):
    pm, ours, inputs, _ = _pair(arch)
    inputs = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
    inputs["attention_mask"][1, :3] = 0  # a left-padded row
    if arch != "llama":  # bert extends them with zeros, gpt2 (causal LM) drops them, as peft
        inputs["token_type_ids"] = torch.randint(0, 2, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    labels = _labels(arch, inputs)
    with torch.no_grad():
        ref = pm(**inputs, labels=labels)
        got = ours(**inputs, labels=labels)
    assert got.logits.shape == ref.logits.shape  # causal LMs: logits include the virtual positions, as in peft
    assert torch.allclose(got.logits, ref.logits, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got.loss, ref.loss, atol=1e-6)  # -100 labels for the virtual tokens
    base, _, _ = MODELS[arch](0)
    with torch.no_grad():
        y0 = base(**inputs).logits
    assert not torch.allclose(got.logits[:, -y0.shape[1]:] if arch != "bert" else got.logits, y0, atol=1e-6)


def test_gradient_equals_peft_and_reaches_only_the_prompt():
    pm, ours, inputs, _ = _pair("llama")
    labels = _labels("llama", inputs)
    pm(**inputs, labels=labels).loss.backward()
    ours(**inputs, labels=labels).loss.backward()
    ref = pm.prompt_encoder["default"].embedding.weight.grad
    assert torch.allclose(_prompt(ours).grad, ref, atol=1e-7, rtol=1e-4)
    assert _prompt(ours).grad.abs().sum() > 0
    assert all(p.grad is None for n, p in ours.named_parameters() if ".adapters." not in n)


def test_positional_input_ids_and_inputs_embeds():
    _pm, ours, inputs, _ = _pair("llama")
    ids = inputs["input_ids"]
    with torch.no_grad():
        by_kw = ours(input_ids=ids).logits
        assert torch.allclose(ours(ids).logits, by_kw)
        embeds = ours.get_input_embeddings()(ids)
        assert torch.allclose(ours(inputs_embeds=embeds).logits, by_kw, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_file_loads_with_same_outputs(arch, tmp_path):
    pm, _, inputs, out = _pair(arch)
    with torch.no_grad():
        ref = out(pm(**inputs))
    pm.save_pretrained(tmp_path)
    fresh, _, _ = MODELS[arch](0)
    peftkit.load(fresh, tmp_path)
    with torch.no_grad():
        assert torch.allclose(out(fresh(**inputs)), ref, atol=1e-4)
    assert peftkit.get_method("prompt_tuning") is PromptTuning


def test_peft_seq_cls_file_with_a_trained_head_loads_with_same_outputs(tmp_path):
    pm, _, inputs, out = _pair("bert")
    with torch.no_grad():  # peft's SEQ_CLS trains and saves a copy of the classifier (modules_to_save)
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        ref = out(pm(**inputs))
    pm.save_pretrained(tmp_path)
    fresh, _, _ = MODELS["bert"](0)
    peftkit.load(fresh, tmp_path)
    assert isinstance(fresh.classifier, AdapterSite)  # the head's copy travels with the prompt
    with torch.no_grad():
        assert torch.allclose(out(fresh(**inputs)), ref, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_hf_export_loads_in_peft(arch, tmp_path):
    model, inputs, out = MODELS[arch](0)
    peftkit.attach(model, PromptTuning(num_virtual_tokens=5))
    with torch.no_grad():
        ours = out(model(**inputs))
    peftkit.save(model, tmp_path, format="hf")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 5 and cfg["token_dim"] == 32
    assert cfg["num_layers"] == 2 and cfg["num_attention_heads"] == 4 and cfg["num_transformer_submodules"] == 1
    # a classifier is written as FEATURE_EXTRACTION: peft's SEQ_CLS would want a trained head in the file
    assert cfg["task_type"] == ("FEATURE_EXTRACTION" if arch == "bert" else "CAUSAL_LM")
    base, _, _ = MODELS[arch](0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(out(pm(**inputs)), ours, atol=1e-5)
    fresh, _, _ = MODELS[arch](0)
    peftkit.load(fresh, tmp_path)  # and back: the task is inferred from the model again
    assert peftkit.get_adapter(fresh, "default")
    assert next(iter(peftkit.get_adapter(fresh, "default").values())).config.task_type == TASK[arch]


def _greedy(model, ids, mask, steps=5):
    """Greedy decoding by full forwards without a cache: the reference semantics of prompt-tuned generation."""
    scores = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        scores.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids, scores


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_equals_peft_greedy(arch):
    # peft 0.21.2's own generate is broken with transformers 5.x (it reads ``past_key_values`` where
    # transformers now passes ``cache``, so it re-inserts the virtual tokens at every step); its forward is
    # the reference: greedy decoding with peft's forward, no cache.
    pm, ours, inputs, _ = _pair(arch)
    ids = inputs["input_ids"][:3]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left-padded rows
    mask[2, :1] = 0
    ref_ids, ref_scores = _greedy(pm, ids, mask)
    gen = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                        output_scores=True, return_dict_in_generate=True)
    assert torch.equal(gen.sequences, ref_ids)
    for got, ref in zip(gen.scores, ref_scores, strict=True):
        assert torch.allclose(got, ref, atol=1e-4)


def test_generate_inserts_virtual_tokens_at_the_first_step_only():
    _pm, ours, inputs, _ = _pair("llama", n=4)
    ids = inputs["input_ids"][:2]
    seen = []
    hook = ours.register_forward_pre_hook(  # runs after the adapter's hook: sees what the model gets
        lambda m, a, k: seen.append((k["inputs_embeds"].shape[1] if k.get("inputs_embeds") is not None
                                     else k["input_ids"].shape[1], k["attention_mask"].shape[1])), with_kwargs=True)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    hook.remove()
    L = ids.shape[1]
    assert seen == [(4 + L, 4 + L), (1, 4 + L + 1), (1, 4 + L + 2)]


def test_disabled_and_unload_give_the_base_model():
    model, inputs, out = MODELS["llama"](0)
    with torch.no_grad():
        y0 = out(model(**inputs))
        peftkit.attach(model, PromptTuning(num_virtual_tokens=3))
        assert out(model(**inputs)).shape[1] == y0.shape[1] + 3
        with peftkit.disabled(model):
            assert torch.equal(out(model(**inputs)), y0)
        peftkit.unload(model)
        assert not model._forward_pre_hooks
        assert torch.equal(out(model(**inputs)), y0)


def test_inactive_adapter_does_nothing_and_stacks_with_lora_on_the_embedding():
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, peftkit.LoRA(r=2, alpha=2, target_modules=["embed_tokens"]), name="lora")
    peftkit.attach(model, PromptTuning(num_virtual_tokens=3), name="prompt")
    with torch.no_grad():
        peftkit.activate(model, "lora")
        y_lora = out(model(**inputs))
        assert y_lora.shape[1] == inputs["input_ids"].shape[1]  # the prompt adapter is not active
        peftkit.activate(model, ["lora", "prompt"])
        both = out(model(**inputs))
        embeds = model.get_input_embeddings()(inputs["input_ids"])  # LoRA-adapted embeddings
        P = _prompt_of(model, "prompt").expand(embeds.shape[0], -1, -1)
        mask = torch.cat([torch.ones(embeds.shape[0], 3, dtype=torch.long), inputs["attention_mask"]], 1)
        with peftkit.disabled(model):
            ref = out(model(inputs_embeds=torch.cat([P, embeds], 1), attention_mask=mask))
    assert torch.allclose(both, ref, atol=1e-5)


def _prompt_of(model, name):
    (p,) = peftkit.adapter_parameters(model, name).values()
    return p


# -- initialisation ------------------------------------------------------------------------------
@pytest.mark.parametrize("n,expected", [(7, [5, 7, 9, 5, 7, 9, 5]), (2, [5, 7]), (3, [5, 7, 9])])
def test_text_init_repeats_or_truncates_the_token_rows(n, expected):
    model, _, _ = MODELS["llama"](0)
    table = model.model.embed_tokens.weight.detach().clone()
    peftkit.attach(model, PromptTuning(num_virtual_tokens=n, prompt_tuning_init="TEXT", init_token_ids=[5, 7, 9]))
    assert torch.equal(_prompt(model).detach(), table[expected])


class _FakeTokenizer:
    name_or_path = "local/fake-tokenizer"

    def __call__(self, text):
        return {"input_ids": [1] + [ord(c) % 90 for c in text]}  # a BOS id, as real tokenizers add


def test_text_init_with_a_tokenizer_object(tmp_path):
    model, _, _ = MODELS["gpt2"](0)
    table = model.transformer.wte.weight.detach().clone()
    cfg = PromptTuning(num_virtual_tokens=4, prompt_tuning_init="text", prompt_tuning_init_text="abcdef",
                       tokenizer=_FakeTokenizer())
    assert cfg.tokenizer_name_or_path == "local/fake-tokenizer" and "tokenizer" not in cfg.to_dict()
    peftkit.attach(model, cfg)
    ids = [1, ord("a") % 90, ord("b") % 90, ord("c") % 90]
    assert torch.equal(_prompt(model).detach(), table[ids])
    peftkit.save(model, tmp_path)  # the resolved ids are saved: reloading needs no tokenizer
    saved = json.loads((tmp_path / "peftkit_adapter.json").read_text())["config"]
    assert saved["init_token_ids"] == ids and saved["prompt_tuning_init"] == "TEXT"
    fresh, _, _ = MODELS["gpt2"](0)
    peftkit.load(fresh, tmp_path)
    assert torch.equal(_prompt(fresh), _prompt(model))


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_random_inits_draw_as_peft(init):
    model, _, _ = MODELS["llama"](0)
    torch.manual_seed(7)
    pm = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init=init))
    ours, _, _ = MODELS["llama"](0)
    torch.manual_seed(7)
    peftkit.attach(ours, PromptTuning(num_virtual_tokens=6, prompt_tuning_init=init.lower()))
    assert torch.equal(_prompt(ours).detach(), pm.prompt_encoder["default"].embedding.weight.detach())


def test_random_init_is_standard_normal():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, PromptTuning(num_virtual_tokens=64))
    p = _prompt(model).detach()
    assert abs(p.mean().item()) < 0.05 and abs(p.std().item() - 1) < 0.05


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens"),
    (dict(prompt_tuning_init="TEXT"), "prompt_tuning_init_text"),
    (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello"), "tokenizer"),
    (dict(prompt_tuning_init="words"), "prompt_tuning_init"),
    (dict(prompt_tuning_init="TEXT", init_token_ids=[]), "init_token_ids"),
    (dict(task_type="SEQ_2_SEQ_LM"), "SEQ_2_SEQ_LM"),
])
def test_bad_config(kwargs, match):
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.attach(model, PromptTuning(**kwargs))
    assert not any(isinstance(m, AdapterSite) for m in model.modules())


@pytest.mark.parametrize("arch,target,match", [
    ("llama", ["lm_head"], "input embedding"),
    ("gpt2", ["wpe"], "position/token-type"),
    ("bert", ["token_type_embeddings"], "position/token-type"),
])
def test_target_that_is_not_the_input_embedding(arch, target, match):
    model, _, _ = MODELS[arch](0)
    with pytest.raises(peftkit.TargetError, match=match):
        peftkit.attach(model, PromptTuning(num_virtual_tokens=2, target_modules=target))
    assert not any(isinstance(m, AdapterSite) for m in model.modules())


def test_other_embedding_is_refused_and_the_model_left_as_it_was():
    model, inputs, out = MODELS["llama"](0)
    model.extra = nn.Embedding(10, 32)
    with torch.no_grad():
        y0 = out(model(**inputs))
    with pytest.raises(peftkit.TargetError, match="not the model's input embedding"):
        peftkit.attach(model, PromptTuning(num_virtual_tokens=2, target_modules=["extra"]))
    assert not any(isinstance(m, AdapterSite) for m in model.modules()) and not model._forward_pre_hooks
    assert peftkit.adapter_names(model) == []
    with torch.no_grad():
        assert torch.equal(out(model(**inputs)), y0)


def test_text_ids_outside_the_vocabulary():
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.TargetError, match="outside the vocabulary"):
        peftkit.attach(model, PromptTuning(num_virtual_tokens=2, prompt_tuning_init="TEXT", init_token_ids=[1, 500]))


def test_not_mergeable_and_not_mixable():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, PromptTuning(num_virtual_tokens=2))
    with pytest.raises(peftkit.NotMergeableError, match="no weight to fold into"):
        peftkit.merge(model)
    with pytest.raises(peftkit.PeftkitError, match="mixed batch"):
        with peftkit.mixed_batch(model, ["default", None, None, None]):
            pass
