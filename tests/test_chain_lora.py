"""Chain of LoRA: the output is continuous across every fold, optimizer state is reset, T = 1 is LoRA, the
trainable count is LoRA's, the accumulated update reaches rank T·r, save/load mid-chain, peftkit.train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.chain_lora import ChainLoRA, next_link

from .models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _loss(model, inputs):
    return model(**inputs).logits.pow(2).mean()


def _layers(model, name="default"):
    return list(peftkit.get_adapter(model, name).values())


def test_output_is_continuous_across_every_fold_and_optimizer_state_is_reset():
    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, ChainLoRA(r=2, alpha=4, num_links=3, steps_per_link=2, target_modules=TARGETS))
    opt = torch.optim.AdamW(peftkit.adapter_parameters(model).values(), lr=1e-2)
    folds = 0
    for step in range(7):
        model.train()
        _loss(model, inputs).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            before = model(**inputs).logits
        links = _layers(model)[0].links()
        peftkit.after_step(model, step, 7, optimizer=opt)
        opt.zero_grad()
        with torch.no_grad():
            after = model(**inputs).logits
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
        if _layers(model)[0].links() > links:  # a fold: fresh pair, no optimizer state for it
            folds += 1
            assert step + 1 in (2, 4)
            for m in _layers(model):
                assert torch.count_nonzero(m.lora_B) == 0
                assert m.lora_A not in opt.state and m.lora_B not in opt.state
    assert folds == 2 and all(m.links() == 2 for m in _layers(model))  # the last link keeps training
    for m in _layers(model):
        assert int(opt.state[m.lora_A]["step"]) == 3  # its state restarted at the fold after step 4


def test_links_end_at_fractions_of_total_steps_without_steps_per_link():
    cfg = ChainLoRA(num_links=4, target_modules=["q_proj"])
    assert cfg.boundaries(100) == [25, 50, 75]
    with pytest.raises(peftkit.ConfigError, match="steps_per_link=N"):
        cfg.boundaries(None)


def test_one_link_trains_as_lora_and_the_trainable_count_is_loras():
    chain, inputs, _ = tiny_llama(0)
    lora, _, _ = tiny_llama(0)
    peftkit.attach(chain, ChainLoRA(r=4, alpha=8, num_links=1, target_modules=TARGETS))
    peftkit.attach(lora, peftkit.LoRA(r=4, alpha=8, target_modules=TARGETS))
    ours = peftkit.get_adapter(chain, "default")
    with torch.no_grad():
        for path, m in peftkit.get_adapter(lora, "default").items():
            ours[path].lora_A.copy_(m.lora_A)
    optimizers = [torch.optim.AdamW(peftkit.adapter_parameters(m).values(), lr=1e-2) for m in (chain, lora)]
    for step in range(4):
        for model, opt in zip((chain, lora), optimizers, strict=True):
            _loss(model, inputs).backward()
            opt.step()
            peftkit.after_step(model, step, 4, optimizer=opt)
            opt.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(chain(**inputs).logits, lora(**inputs).logits, atol=1e-5, rtol=1e-4)
    count = sum(p.numel() for p in peftkit.adapter_parameters(lora).values())
    for links in (1, 3, 6):
        model, _, _ = tiny_llama(0)
        peftkit.attach(model, ChainLoRA(r=4, alpha=8, num_links=links, target_modules=TARGETS))
        assert sum(p.numel() for p in peftkit.adapter_parameters(model).values()) == count


def test_the_accumulated_update_reaches_rank_t_times_r():
    """A rank-3 target fitted by 3 links of rank 1: the chain's update has rank 3 and fits far better than
    the best rank-1 update could."""
    torch.manual_seed(0)
    d = 8
    u, _ = torch.linalg.qr(torch.randn(d, d))
    v, _ = torch.linalg.qr(torch.randn(d, d))
    target = u[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.5])) @ v[:, :3].t()
    model = nn.Sequential(nn.Linear(d, d, bias=False))
    nn.init.zeros_(model[0].weight)
    peftkit.attach(model, ChainLoRA(r=1, alpha=1, num_links=3, target_modules=["0"]))
    opt = torch.optim.Adam(peftkit.adapter_parameters(model).values(), lr=0.05)
    x = torch.randn(256, d)
    y = x @ target.t()
    total = 450
    for step in range(total):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        peftkit.after_step(model, step, total, optimizer=opt)
        opt.zero_grad()
    layer = model[0].adapters["default"]
    assert layer.links() == 2
    delta = layer.delta_matrix().detach()
    assert int(torch.linalg.matrix_rank(delta, atol=1e-3)) == 3
    best_rank1 = (x @ (target - 3.0 * u[:, :1] @ v[:, :1].t()).t()).pow(2).mean().item()
    assert (model(x) - y).pow(2).mean().item() < 0.2 * best_rank1


@pytest.mark.parametrize("fmt", ["peftkit"])
def test_save_mid_chain_loads_with_the_same_output_and_continues(tmp_path, fmt):
    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, ChainLoRA(r=2, alpha=4, num_links=3, steps_per_link=1, target_modules=TARGETS))
    opt = torch.optim.AdamW(peftkit.adapter_parameters(model).values(), lr=1e-2)
    for step in range(2):  # link 1 trained and folded, link 2 trained one step, not folded yet
        _loss(model, inputs).backward()
        opt.step()
        if step == 0:
            peftkit.after_step(model, step, None, optimizer=opt)
        opt.zero_grad()
    with torch.no_grad():
        ref = model(**inputs).logits
    peftkit.save(model, tmp_path / "a", format=fmt)
    fresh, _, _ = tiny_llama(0)
    peftkit.load(fresh, tmp_path / "a", trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, ref, atol=1e-6, rtol=1e-6)
    assert all(m.links() == 1 for m in _layers(fresh))
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in _layers(fresh))  # the current link's pair is there
    assert next_link(fresh, "default") == 2  # the chain continues in the next slot
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(peftkit.ConfigError, match="all 3 links are used"):
        next_link(fresh, "default")


def test_hf_export_mid_chain_is_a_lora_that_peft_loads(tmp_path):
    from peft import PeftModel

    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, ChainLoRA(r=2, alpha=6, num_links=3, target_modules=["q_proj", "down_proj"],
                                    rank_pattern={"down_proj": 1}))
    for _ in range(2):  # two links with random pairs, folded; the third (current) one random too
        for m in _layers(model):
            with torch.no_grad():
                m.lora_B.normal_()
        if _layers(model)[0].links() < 2:
            next_link(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    peftkit.save(model, tmp_path, format="hf")
    base, _, _ = tiny_llama(0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    assert pm.peft_config["default"].r == 6
    with torch.no_grad():
        torch.testing.assert_close(pm(**inputs).logits, ref, atol=1e-5, rtol=1e-4)
    back, _, _ = tiny_llama(0)
    peftkit.load(back, tmp_path)
    assert type(next(iter(peftkit.get_adapter(back, "default").values())).config) is peftkit.LoRA
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, ref, atol=1e-5, rtol=1e-4)


def test_merge_mid_chain_folds_every_link_and_unmerge_restores():
    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, ChainLoRA(r=2, alpha=4, num_links=2, target_modules=["q_proj"]))
    for m in _layers(model):
        with torch.no_grad():
            m.lora_B.normal_()
    next_link(model)
    for m in _layers(model):
        with torch.no_grad():
            m.lora_B.normal_()
    with torch.no_grad():
        ref = model(**inputs).logits
        peftkit.merge(model)
        torch.testing.assert_close(model(**inputs).logits, ref, atol=1e-5, rtol=1e-4)
        with pytest.raises(peftkit.ConfigError, match="merged"):
            next_link(model)
        peftkit.unmerge(model)
        torch.testing.assert_close(model(**inputs).logits, ref, atol=1e-5, rtol=1e-4)


def test_runs_through_peftkit_train(tmp_path):
    from peftkit.train import TrainConfig, train

    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, ChainLoRA(r=2, alpha=4, num_links=2, target_modules=["q_proj", "v_proj"]))
    ids = inputs["input_ids"]
    examples = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i]} for i in range(4)]

    def collate(ex, bs, shuffle, seed):
        return [{k: torch.stack([e[k] for e in ex[i:i + bs]]) for k in ex[0]} for i in range(0, len(ex), bs)]

    train(model, TrainConfig(output=str(tmp_path / "run"), max_steps=4, batch_size=2, lr=1e-2, progress=False),
          examples, collate=collate)
    layers = _layers(model)
    assert all(m.links() == 1 for m in layers)  # the fold at 2/4 of training happened
    assert all(torch.count_nonzero(m.chain_B) > 0 and torch.count_nonzero(m.lora_B) > 0 for m in layers)


def test_bad_config_and_wrong_adapter():
    model, _, _ = tiny_llama(0)
    for kwargs, match in [(dict(num_links=0), "num_links must be a positive integer"),
                          (dict(steps_per_link=0), "steps_per_link must be a positive integer"),
                          (dict(r=40), "rank 40 is larger than the layer allows")]:
        with pytest.raises(peftkit.ConfigError, match=match):
            peftkit.attach(model, ChainLoRA(target_modules=["q_proj"], **kwargs))
    peftkit.attach(model, peftkit.LoRA(r=2, target_modules=["q_proj"]), name="plain")
    with pytest.raises(peftkit.ConfigError, match="'plain' is lora, not chain_lora"):
        next_link(model, "plain")
