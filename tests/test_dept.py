"""DePT: the budget identity, AB = 0 and m′ = 0 is the base, the position update formula, the prompt as in
prompt tuning, generation with a cache, the two learning-rate groups and bad input."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.site import AdapterSite
from peftkit.methods.dept import DePT, dept_budget, dept_param_groups

from .models import tiny_llama


def _randomise(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _layer(model, name="default"):
    return next(iter(peftkit.get_adapter(model, name).values()))


def test_budget_identity_matches_a_longer_prompt():
    """d = 32, s = 16, r = 2: s·r + r·d = 96 = 3·d, so m′ = 3 has the budget of a prompt of m = 6 tokens."""
    dept_model, _, _ = tiny_llama(0)
    prompt_model, _, _ = tiny_llama(0)
    cfg = DePT(num_virtual_tokens=3, r=2, max_positions=16)
    peftkit.attach(dept_model, cfg)
    peftkit.attach(prompt_model, peftkit.PromptTuning(num_virtual_tokens=6))
    count = sum(p.numel() for p in peftkit.adapter_parameters(dept_model).values())
    m, d = 6, 32
    assert count == dept_budget(cfg, d) == 3 * d + 16 * 2 + 2 * d == m * d
    assert count == sum(p.numel() for p in peftkit.adapter_parameters(prompt_model).values())


def test_no_prompt_and_zero_update_is_the_base_model_then_the_formula():
    model, inputs, _ = tiny_llama(0)
    with torch.no_grad():
        base = model(**inputs).logits
        emb = model.get_input_embeddings()(inputs["input_ids"])
    peftkit.attach(model, DePT(num_virtual_tokens=0, r=2, max_positions=6))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)  # B = 0: AB = 0
    layer = _layer(model)
    _randomise([layer.lora_embedding_B])
    ab = layer.lora_embedding_A @ layer.lora_embedding_B  # (s, d); positions 6..8 of the 9 get no update
    expected_embeds = emb + torch.cat([ab, ab.new_zeros(3, 32)])
    with torch.no_grad():
        got = model(**inputs).logits
        with peftkit.disabled(model):
            ref = model(inputs_embeds=expected_embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)


def test_the_prompt_lengthens_the_input_as_prompt_tuning_does():
    dept_model, inputs, _ = tiny_llama(0)
    prompt_model, _, _ = tiny_llama(0)
    peftkit.attach(dept_model, DePT(num_virtual_tokens=4, r=2, max_positions=16))
    peftkit.attach(prompt_model, peftkit.PromptTuning(num_virtual_tokens=4))
    with torch.no_grad():
        _layer(dept_model).prompt_embeddings.copy_(_layer(prompt_model).prompt_embeddings)
        got = dept_model(**inputs, labels=inputs["input_ids"])
        ref = prompt_model(**inputs, labels=inputs["input_ids"])
    assert got.logits.shape == (4, 9 + 4, 96)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=1e-4)  # AB = 0 at init
    torch.testing.assert_close(got.loss, ref.loss)


def test_generate_with_a_cache_equals_without():
    """With a cache only the new token reaches the model: its position is counted from the cache length."""
    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, DePT(num_virtual_tokens=3, r=2, max_positions=12))
    _randomise(peftkit.adapter_parameters(model).values(), seed=4)
    ids = inputs["input_ids"][:2]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    cached = model.generate(use_cache=True, **kw)
    plain = model.generate(use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.scores, plain.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_param_groups_give_the_two_parts_their_learning_rates():
    model, _, _ = tiny_llama(0)
    peftkit.attach(model, DePT(num_virtual_tokens=2, r=2, max_positions=8))
    layer = _layer(model)
    groups = dept_param_groups(model, lr_prompt=3e-1, lr_lowrank=1e-4)
    assert [g["lr"] for g in groups] == [3e-1, 1e-4]
    assert groups[0]["params"] == [layer.prompt_embeddings]
    assert groups[1]["params"] == [layer.lora_embedding_A, layer.lora_embedding_B]
    torch.optim.AdamW(groups)
    with pytest.raises(peftkit.ConfigError, match="lr_lowrank must be a positive number"):
        dept_param_groups(model, 1e-2, 0)
    other, _, _ = tiny_llama(0)
    peftkit.attach(other, peftkit.LoRA(r=2, target_modules=["q_proj"]))
    with pytest.raises(peftkit.ConfigError, match="no DePT adapter is attached"):
        dept_param_groups(other, 1e-2, 1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_virtual_tokens=-1), r"num_virtual_tokens must be an integer >= 0"),
    (dict(r=20, max_positions=8), r"r=20 is above max_positions=8"),
    (dict(r=40, max_positions=64), r"r=40 is above the embedding width 32"),
    (dict(target_modules=["q_proj"]), r"DePT goes on the model's input embedding"),
])
def test_bad_config_is_refused_before_the_model_is_touched(kwargs, match):
    model, _, _ = tiny_llama(0)
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.attach(model, DePT(**kwargs))
    assert not any(isinstance(m, AdapterSite) for m in model.modules())


def test_peftkit_train_gives_the_low_rank_part_its_own_rate(tmp_path):
    """lowrank_lr reaches the optimizer through the param_groups hook: at a vanishing rate A and B stay put
    while the prompt trains at the run's rate."""
    from peftkit.core.hooks import param_groups
    from peftkit.train import TrainConfig, train

    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, DePT(num_virtual_tokens=2, r=2, max_positions=16, lowrank_lr=1e-30))
    layer = _layer(model)
    groups = param_groups(model, list(peftkit.adapter_parameters(model).values()), 1e-2)
    assert [(g["lr"], len(g["params"])) for g in groups] == [(1e-2, 1), (1e-30, 2)]
    p0, a0 = layer.prompt_embeddings.detach().clone(), layer.lora_embedding_A.detach().clone()
    ids = inputs["input_ids"]
    examples = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i]} for i in range(4)]

    def collate(ex, bs, shuffle, seed):
        return [{k: torch.stack([e[k] for e in ex[i:i + bs]]) for k in ex[0]} for i in range(0, len(ex), bs)]

    train(model, TrainConfig(output=str(tmp_path / "run"), max_steps=2, batch_size=2, lr=1e-2, progress=False),
          examples, collate=collate)
    assert (layer.prompt_embeddings - p0).abs().max() > 1e-3
    assert (layer.lora_embedding_A - a0).abs().max() < 1e-20
    assert layer.lora_embedding_B.abs().max() < 1e-20
    with pytest.raises(peftkit.ConfigError, match="lowrank_lr must be a positive number"):
        peftkit.attach(tiny_llama(0)[0], DePT(lowrank_lr=0.0))
