"""HFT (Half Fine-Tuning, Hui et al. 2024): peft has none, so the defining properties.

In every stage exactly half of the targeted weight tensors is frozen (per block, odd blocks in
turns); the frozen half is bitwise unchanged by optimizer steps (AdamW with weight decay); the
learned deltas survive stage switches; merging ``W + Δ`` equals the unmerged model; the schedule
runs through ``peftkit.train``.
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.methods.hft import HFT, block_of, frozen_half

from .sparse_helpers import base_state, llama, llama_loss, train_tiny


def frozen_paths(model) -> set[str]:
    return {p for p, m in peftkit.get_adapter(model, "default").items() if not m.delta.requires_grad}


def test_exactly_half_frozen_in_every_stage_and_per_block():
    model, _inputs, _ = llama()
    peftkit.attach(model, HFT(stage_steps=2, target_modules="all-linear"))
    mods = peftkit.get_adapter(model, "default")
    assert len(mods) == 14 and not frozen_paths(model)  # no hook called yet: all train
    seen = []
    for step in range(0, 12, 2):
        peftkit.before_step(model, step, 100)
        frozen = frozen_paths(model)
        assert len(frozen) == 7
        for block in ("model.layers.0", "model.layers.1"):
            n = sum(block_of(p) == block for p in frozen)
            assert n in (3, 4)  # 7 tensors per block: 3 or 4 of them, the two blocks in turns
        seen.append(frozen)
    assert len({frozenset(s) for s in seen}) > 1  # stages draw different halves
    assert frozen_half(list(mods), 0, 3) == frozen_half(list(mods), 0, 3)  # reproducible
    peftkit.before_step(model, 1, 100)
    assert frozen_paths(model) == seen[0]  # steps 0 and 1 are one stage


def test_even_blocks_freeze_exactly_half_of_each():
    paths = [f"h.{b}.{n}" for b in range(3) for n in ("q", "k", "v", "o")]
    for stage in range(5):
        frozen = frozen_half(paths, 1, stage)
        for b in range(3):
            assert sum(p.startswith(f"h.{b}.") for p in frozen) == 2
    assert block_of("model.layers.12.mlp.up_proj") == "model.layers.12" and block_of("fc") == ""


def test_frozen_half_bitwise_unchanged_and_stage_switch_keeps_deltas():
    model, inputs, _out = llama()
    peftkit.attach(model, HFT(stage_steps=2, target_modules="all-linear"))
    mods = peftkit.get_adapter(model, "default")
    opt = torch.optim.AdamW(peftkit.adapter_parameters(model).values(), lr=1e-2, weight_decay=0.1)
    loss_fn = llama_loss(model, inputs)
    before = base_state(model)
    snapshots = []
    for step in range(4):
        peftkit.before_step(model, step, 10, opt)
        frozen = frozen_paths(model)
        snap = {p: m.delta.detach().clone() for p, m in mods.items()}
        loss_fn(step).backward()
        peftkit.after_backward(model, step, 10, opt)
        opt.step()
        peftkit.after_step(model, step, 10, opt)
        opt.zero_grad()
        for p, m in mods.items():
            if p in frozen:
                assert torch.equal(m.delta, snap[p]), p
            else:
                assert not torch.equal(m.delta, snap[p]), p
        snapshots.append((frozen, {p: m.delta.detach().clone() for p, m in mods.items()}))
    # stage 0 (steps 0, 1) learned deltas; stage 1 froze another half: theirs are exactly what stage 0 left
    frozen1, end = snapshots[3]
    _, end0 = snapshots[1]
    for p in frozen1:
        assert torch.equal(end[p], end0[p])
    assert any(torch.count_nonzero(end0[p]) > 0 for p in frozen1)
    assert all(torch.equal(before[k], v) for k, v in base_state(model).items())


def test_merge_equals_base_plus_delta(tmp_path):
    model, inputs, out = llama()
    peftkit.attach(model, HFT(stage_steps=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    train_tiny(model, inputs, tmp_path / "run", steps=3)
    mods = peftkit.get_adapter(model, "default")
    assert all(m.delta.requires_grad for m in mods.values())  # every delta trainable again after the last step
    with torch.no_grad():
        y = out(model(**inputs))
    expected = {p: model.get_submodule(p).base.weight.detach() + m.delta.detach() for p, m in mods.items()}
    peftkit.merge(model)
    for p in mods:
        assert torch.equal(model.get_submodule(p).base.weight, expected[p])
    with torch.no_grad():
        assert torch.allclose(out(model(**inputs)), y, atol=1e-5)
    loaded = peftkit.load(llama()[0], tmp_path / "run" / "adapter")
    with torch.no_grad():
        assert torch.allclose(out(loaded(**inputs)), y, atol=1e-5)


@pytest.mark.parametrize("kw,culprit", [(dict(stage_steps=0), "stage_steps"), (dict(seed=1.5), "seed")])
def test_bad_input_named_before_the_model_is_touched(kw, culprit):
    model, _, _ = llama()
    with pytest.raises(peftkit.ConfigError, match=culprit):
        peftkit.attach(model, HFT(target_modules="all-linear", **kw))
    assert not peftkit.adapter_names(model)


def test_a_single_target_is_refused():
    model, _, _ = llama()
    with pytest.raises(peftkit.ConfigError, match="at least two"):
        peftkit.attach(model, HFT(target_modules=["model.layers.0.self_attn.q_proj"]))
    assert not peftkit.adapter_names(model)
