"""End to end on a tiny model: merged adapters install and load like any other, IA3 merges, aTLAS coefficients."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError
from tests.models import tiny_llama


def _randomise(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in peftkit.get_adapter(model, name).values():
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _two_loras():
    model, inputs, out = tiny_llama()
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    peftkit.attach(model, peftkit.LoRA(r=2, alpha=2, target_modules=["q_proj", "o_proj"]), "b")
    _randomise(model, "a", 1)
    _randomise(model, "b", 2)
    return model, inputs, out


def test_merged_adapter_reproduces_both_adapters_and_round_trips(tmp_path):
    model, inputs, out = _two_loras()
    peftkit.activate(model, ["a", "b"])  # stacked additive LoRAs: W + ΔW_a + ΔW_b
    with torch.no_grad():
        both = out(model(**inputs))
    states = [peftkit.extract(model, n) for n in ("a", "b")]
    merged = peftkit.merge_adapters(states, "task_arithmetic", [1.0, 1.0], output=tmp_path / "m")
    assert merged.config.rank_for("model.layers.0.self_attn.q_proj") == 6  # 4 + 2: exact concatenation
    assert merged.config.rank_for("model.layers.0.self_attn.v_proj") == 4
    peftkit.load(model, tmp_path / "m")  # the merged adapter, alone
    with torch.no_grad():
        torch.testing.assert_close(out(model(**inputs)), both, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="already exists"):
        peftkit.merge_adapters(states, output=tmp_path / "m")
    # a lower requested rank: the best approximation, never worse than dropping an adapter
    low = peftkit.merge_adapters(states, rank=3, name="low")
    peftkit.install(model, low)
    assert low.config.rank_for("model.layers.0.self_attn.q_proj") == 3


def test_merge_adapters_reads_folders_in_either_format(tmp_path):
    model, _, _ = _two_loras()
    peftkit.save(model, tmp_path / "a", "a")
    peftkit.save(model, tmp_path / "b", "b", format="hf")
    merged = peftkit.merge_adapters([tmp_path / "a", tmp_path / "b"], "ties", [1.0, 0.5], {"density": 0.5}, rank=4)
    assert merged.config.method == "lora" and len(merged.targets) == 6


def test_ia3_merges_its_vectors_around_one():
    model, _, _ = tiny_llama()
    peftkit.attach(model, peftkit.IA3(), "x")
    peftkit.attach(model, peftkit.IA3(), "y")
    sx, sy = peftkit.extract(model, "x"), peftkit.extract(model, "y")
    key = next(iter(sx.tensors))
    sx.tensors[key] = torch.full_like(sx.tensors[key], 1.5)
    sy.tensors[key] = torch.full_like(sy.tensors[key], 0.8)
    merged = peftkit.merge_adapters([sx, sy], weights=[1.0, 1.0])
    torch.testing.assert_close(merged.tensors[key], torch.full_like(sx.tensors[key], 1.3))  # 1 + 0.5 - 0.2
    peftkit.install(model, merged)


def test_learned_coefficients_recover_the_target_mix():
    model, inputs, out = _two_loras()
    states = [peftkit.extract(model, n) for n in ("a", "b")]
    target_state = peftkit.merge_adapters(states, weights=[0.9, 0.2], name="target")
    for n in ("a", "b"):
        peftkit.delete(model, n)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    peftkit.install(model, target_state)
    with torch.no_grad():
        target = out(model(**inputs))
    peftkit.delete(model, "target")

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(out(m(**batch)), target)

    start, _ = peftkit.learn_coefficients(model, states, loss_fn, [inputs], steps=1, lr=1e-9, init=[0.5, 0.5])
    learned, coeffs = peftkit.learn_coefficients(model, states, loss_fn, [inputs], steps=20, lr=0.1, init=[0.5, 0.5])
    assert peftkit.adapter_names(model) == [] and flags == {n: p.requires_grad for n, p in model.named_parameters()}

    def loss_of(state):
        peftkit.install(model, state, name="probe")
        with torch.no_grad():
            v = float(loss_fn(model, inputs))
        peftkit.delete(model, "probe")
        return v

    assert loss_of(learned) < 0.05 * loss_of(start)
    q = coeffs["model.layers.0.self_attn.q_proj"]
    assert q[0] == pytest.approx(0.9, abs=0.2) and q[1] == pytest.approx(0.2, abs=0.2)  # from 0.5, 0.5
    assert coeffs["model.layers.0.self_attn.v_proj"][1] == 0.0  # adapter b does not touch v_proj


def test_extract_lora_recovers_a_low_rank_fine_tune():
    base, inputs, out = tiny_llama()
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, mod in ft.named_modules():
            if n.endswith(("q_proj", "v_proj")):
                out_f, in_f = mod.weight.shape
                mod.weight += torch.randn(out_f, 2, generator=g) @ torch.randn(2, in_f, generator=g) * 0.1
        expected = out(ft(**inputs))
    state, report = peftkit.extract_lora(base, ft.state_dict(), rank=2, target_modules=["q_proj", "v_proj"])
    assert len(report) == 4 and all(r.rank == 2 and r.relative_error < 1e-5 for r in report)
    peftkit.install(base, state)
    with torch.no_grad():
        torch.testing.assert_close(out(base(**inputs)), expected, atol=1e-4, rtol=1e-4)
    _, rep1 = peftkit.extract_lora(peftkit.unload(base), ft.state_dict(), rank=1, target_modules=["q_proj"])
    assert all(0 < r.relative_error < 1 for r in rep1)
    _, rep_e = peftkit.extract_lora(base, ft.state_dict(), energy=0.999, target_modules=["q_proj"])
    assert all(r.rank == 2 for r in rep_e)
    with pytest.raises(ConfigError, match="exactly one of rank"):
        peftkit.extract_lora(base, ft.state_dict(), rank=2, energy=0.9)
    with pytest.raises(ConfigError, match=r"no tensor 'x\.model\.layers\.0\.self_attn\.q_proj\.weight'"):
        peftkit.extract_lora(base, ft.state_dict(), rank=2, target_modules=["q_proj"], key_prefix="x.")


def test_peftkit_merge_is_still_the_fold_function():
    import peftkit.merging.registry

    assert callable(peftkit.merge) and peftkit.merge.__module__ == "peftkit.core.api"
