"""Adapter merges: equal to peft's add_weighted_adapter on the same factors (every combination type), exact
factor-space algebra, different ranks, bad input refused by name."""

from __future__ import annotations

import pytest
import torch

from peftkit.core.adapter_state import AdapterState
from peftkit.core.errors import ConfigError
from peftkit.merging import lowrank
from peftkit.merging.adapters import merge_states
from peftkit.merging.registry import MaskSource
from peftkit.methods.lora import LoRA
from tests.models import tiny_llama

peft = pytest.importorskip("peft")
PREFIX = "base_model.model."


def _peft_model(ranks=(4, 4), alphas=(8, 6)):
    from peft import LoraConfig, get_peft_model

    model, _, _ = tiny_llama()
    torch.manual_seed(0)
    cfg = [LoraConfig(r=r, lora_alpha=a, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
           for r, a in zip(ranks, alphas, strict=True)]
    pm = get_peft_model(model, cfg[0], adapter_name="a")
    pm.add_adapter("b", cfg[1])
    return pm


def _lora_modules(pm):
    from peft.tuners.lora import LoraLayer

    return [(n[len(PREFIX):], m) for n, m in pm.named_modules() if isinstance(m, LoraLayer)]


def _state(pm, adapter):
    cfg = pm.peft_config[adapter]
    tensors, layers = {}, {}
    for path, m in _lora_modules(pm):
        tensors[f"{path}.lora_A"] = m.lora_A[adapter].weight.detach().clone()
        tensors[f"{path}.lora_B"] = m.lora_B[adapter].weight.detach().clone()
        layers[path] = {"kind": "linear", "shape": list(m.base_layer.weight.shape)}
    config = LoRA(r=cfg.r, alpha=float(cfg.lora_alpha), target_modules=list(layers))
    return AdapterState(name=adapter, config=config, targets=list(layers), tensors=tensors, shared={}, layers=layers,
                        base={"class": "LlamaForCausalLM", "name_or_path": None, "parameters": 1})


def _peft_result(pm, name):
    return {path: (m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach()) for path, m in _lora_modules(pm)}


W = [0.8, -0.5]


def _record_masks(monkeypatch):
    """Record the random masks peft's DARE draws (its new adapter's init consumes the global RNG first,
    so a seed alone cannot line the two up; passing the masks can)."""
    import peft.utils.merge_utils as mu

    masks = []
    real = torch.bernoulli

    def recording(*args, **kwargs):
        m = real(*args, **kwargs)
        masks.append(m.clone())
        return m

    monkeypatch.setattr(mu.torch, "bernoulli", recording)
    return masks


@pytest.mark.parametrize("ctype,method,options", [
    ("linear", "task_arithmetic", {}),
    ("ties", "ties", {"density": 0.5}),
    ("dare_linear", "dare_linear", {"density": 0.6, "seed": 4}),
    ("dare_ties", "dare_ties", {"density": 0.6, "seed": 4}),
    ("magnitude_prune", "magnitude_prune", {"density": 0.5}),
])
def test_factor_space_equals_peft(ctype, method, options, monkeypatch):
    pm = _peft_model()
    states = [_state(pm, "a"), _state(pm, "b")]
    masks = _record_masks(monkeypatch)
    pm.add_weighted_adapter(["a", "b"], W, "m", combination_type=ctype, density=options.get("density"))
    merged = merge_states(states, method, W, options, space="factors", masks=MaskSource(masks=masks) if masks else None)
    assert merged.config.scale_for("x") == 1.0
    for path, (A, B) in _peft_result(pm, "m").items():
        torch.testing.assert_close(merged.tensors[f"{path}.lora_A"], A)
        torch.testing.assert_close(merged.tensors[f"{path}.lora_B"], B)


def test_cat_equals_peft_and_is_exact_with_different_ranks():
    pm = _peft_model(ranks=(4, 6), alphas=(8, 3))
    states = [_state(pm, "a"), _state(pm, "b")]
    pm.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")
    merged = merge_states(states, "task_arithmetic", W)  # linear method: concatenation by default
    for path, (A, B) in _peft_result(pm, "m").items():
        torch.testing.assert_close(merged.tensors[f"{path}.lora_A"], A)
        torch.testing.assert_close(merged.tensors[f"{path}.lora_B"], B)
        exact = sum(w * s.config.scale_for(path) * s.tensors[f"{path}.lora_B"] @ s.tensors[f"{path}.lora_A"]
                    for w, s in zip(W, states, strict=True))
        torch.testing.assert_close(B @ A, exact)
    assert merged.config.rank_for(path) == 10


@pytest.mark.parametrize("ctype,method,options", [
    ("svd", "task_arithmetic", {}),
    ("ties_svd", "ties", {"density": 0.5}),
    ("dare_linear_svd", "dare_linear", {"density": 0.6, "seed": 2}),
    ("dare_ties_svd", "dare_ties", {"density": 0.6, "seed": 2}),
    ("magnitude_prune_svd", "magnitude_prune", {"density": 0.4}),
])
def test_delta_space_equals_peft_svd_types(ctype, method, options, monkeypatch):
    pm = _peft_model(ranks=(4, 6), alphas=(8, 3))
    states = [_state(pm, "a"), _state(pm, "b")]
    masks = _record_masks(monkeypatch)
    pm.add_weighted_adapter(["a", "b"], W, "m", combination_type=ctype, svd_rank=5, density=options.get("density"))
    merged = merge_states(states, method, W, options, rank=5, space="delta",
                          masks=MaskSource(masks=masks) if masks else None)
    for path, (A, B) in _peft_result(pm, "m").items():
        ours = merged.tensors[f"{path}.lora_B"] @ merged.tensors[f"{path}.lora_A"]
        torch.testing.assert_close(ours, B @ A, atol=1e-5, rtol=1e-4)
        assert merged.tensors[f"{path}.lora_A"].shape == A.shape


def test_truncate_from_factors_equals_dense_svd():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(10, 40, generator=g), torch.randn(30, 10, generator=g)
    a, b = lowrank.truncate(A, B, 4)
    ra, rb = lowrank.svd_factors(B @ A, 4)
    torch.testing.assert_close(b @ a, rb @ ra, atol=1e-4, rtol=1e-4)
    a, b = lowrank.truncate(A, B, 10)  # full rank: exact
    torch.testing.assert_close(b @ a, B @ A, atol=1e-4, rtol=1e-4)


def test_concat_then_truncate_matches_peft_svd():
    pm = _peft_model(ranks=(4, 6), alphas=(8, 3))
    states = [_state(pm, "a"), _state(pm, "b")]
    pm.add_weighted_adapter(["a", "b"], W, "m", combination_type="svd", svd_rank=3)
    merged = merge_states(states, "task_arithmetic", W, rank=3)  # concat + QR truncation, no dense ΔW
    for path, (A, B) in _peft_result(pm, "m").items():
        ours = merged.tensors[f"{path}.lora_B"] @ merged.tensors[f"{path}.lora_A"]
        torch.testing.assert_close(ours, B @ A, atol=1e-5, rtol=1e-4)


def test_more_methods_run_in_delta_space_and_keep_shapes():
    pm = _peft_model()
    states = [_state(pm, "a"), _state(pm, "b")]
    for method, opts, w in [("breadcrumbs", {"density": 0.8, "gamma": 0.05}, W), ("della", {"seed": 0}, W),
                            ("pcb", {}, None), ("model_stock", {}, None), ("slerp", {"t": 0.3}, None)]:
        merged = merge_states(states, method, w, opts, rank=4)
        for path in states[0].layers:
            assert merged.tensors[f"{path}.lora_A"].shape == states[0].tensors[f"{path}.lora_A"].shape


def test_bad_inputs_are_refused_by_name():
    pm = _peft_model()
    a, b = _state(pm, "a"), _state(pm, "b")
    with pytest.raises(ConfigError, match="'b' was trained on a different base model"):
        merge_states([a, b.replace(base={"class": "GPT2LMHeadModel"})])
    path = next(iter(a.layers))
    odd = b.replace(layers={**b.layers, path: {"kind": "linear", "shape": [7, 7]}})
    with pytest.raises(ConfigError, match=f"module {path}: base weight shape"):
        merge_states([a, odd])
    from peftkit.methods.ia3 import IA3

    with pytest.raises(ConfigError, match="'b' is a 'ia3' adapter"):
        merge_states([a, b.replace(config=IA3())])
    with pytest.raises(ConfigError, match="space='concat' is exact only for linear"):
        merge_states([a, b], "ties", space="concat")
    with pytest.raises(ConfigError, match="did you mean 'delta'"):
        merge_states([a, b], space="detla")
    with pytest.raises(ConfigError, match="3 weights for 2"):
        merge_states([a, b], weights=[1, 1, 1])
