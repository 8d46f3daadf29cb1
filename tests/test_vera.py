"""VeRA math: bases bit-identical to peft's from the seed, forward/gradient parity, files both ways, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model

import peftkit
from peftkit.methods.vera import kaiming_bases

from .lycoris_helpers import assert_same_forward_and_gradients
from .models import MODELS
from .models import outputs as _outputs

TARGETS = ["q_proj", "v_proj", "down_proj", "up_proj"]  # 32×32, 16×32, 32×64, 64×32: the bases are 64 wide


def shared_of(model, name: str = "default"):
    layer = next(iter(peftkit.get_adapter(model, name).values()))
    return layer.shared


def randomize(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_bases_are_bit_identical_to_peft_and_shared_by_all_layers():
    model, _, _ = MODELS["llama"](0)
    pm = get_peft_model(model, VeraConfig(r=8, projection_prng_key=7, target_modules=TARGETS))
    ours, _, _ = MODELS["llama"](0)
    peftkit.attach(ours, peftkit.VeRA(r=8, projection_prng_key=7, target_modules=TARGETS))
    shared = shared_of(ours)
    assert torch.equal(shared.vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, pm.base_model.vera_B["default"])
    assert shared.vera_A.shape == (8, 64) and shared.vera_B.shape == (64, 8)
    layers = peftkit.get_adapter(ours, "default").values()
    assert all(layer.shared is shared for layer in layers)  # one object, not a copy per layer
    a, b = kaiming_bases(8, 64, 64, 7)
    assert torch.equal(a, shared.vera_A) and torch.equal(b, shared.vera_B)


def test_trainable_vectors_and_identity_at_init():
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    peftkit.attach(model, peftkit.VeRA(r=8, d_initial=0.5, target_modules=TARGETS))
    assert torch.equal(_outputs(model, inputs, out), y0)
    for path, layer in peftkit.get_adapter(model, "default").items():
        out_f = layer.out_features
        assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {
            "vera_lambda_d": (8,), "vera_lambda_b": (out_f,)}, path
        assert torch.all(layer.vera_lambda_d == 0.5) and torch.count_nonzero(layer.vera_lambda_b) == 0
    assert not any(b.requires_grad for b in shared_of(model).buffers())


def test_forward_and_gradients_equal_peft():
    model, inputs, out = MODELS["llama"](0)
    pm = get_peft_model(model, VeraConfig(r=8, init_weights=False, target_modules=TARGETS))
    randomize(pm)  # peft's own vectors; copied into ours below
    ours, _, _ = MODELS["llama"](0)
    peftkit.attach(ours, peftkit.VeRA(r=8, target_modules=TARGETS))
    assert_same_forward_and_gradients(pm, ours, inputs, out)


def test_delta_weight_formula():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, peftkit.VeRA(r=4, target_modules=["v_proj"]))
    randomize(model)
    layer = peftkit.get_adapter(model, "default")["model.layers.0.self_attn.v_proj"]
    a, b = layer.shared.vera_A[:, :32], layer.shared.vera_B[:16]
    expected = torch.diag(layer.vera_lambda_b) @ b @ torch.diag(layer.vera_lambda_d) @ a
    assert torch.allclose(layer.delta_weight(model.model.layers[0].self_attn.v_proj.base), expected, atol=1e-6)


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_file_loads_with_same_outputs(save_projection, tmp_path):
    model, inputs, out = MODELS["llama"](0)
    pm = get_peft_model(model, VeraConfig(r=8, projection_prng_key=3, save_projection=save_projection,
                                          init_weights=False, target_modules=TARGETS))
    randomize(pm)
    pm.eval()
    ref = _outputs(pm, inputs, out)
    pm.save_pretrained(tmp_path)
    base, _, _ = MODELS["llama"](0)
    peftkit.load(base, tmp_path)
    assert torch.allclose(_outputs(base, inputs, out), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,targets,save_projection", [("llama", TARGETS, True), ("llama", TARGETS, False),
                                                           ("gpt2", ["c_attn", "c_fc"], True)])
def test_hf_export_loads_in_peft(arch, targets, save_projection, tmp_path):
    model, inputs, out = MODELS[arch](0)
    peftkit.attach(model, peftkit.VeRA(r=8, projection_prng_key=5, save_projection=save_projection,
                                       target_modules=targets))
    randomize(model)
    ours = _outputs(model, inputs, out)
    peftkit.save(model, tmp_path, format="hf")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["projection_prng_key"] == 5 and cfg["save_projection"] is save_projection
    base, _, _ = MODELS[arch](0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(_outputs(pm, inputs, out), ours, atol=1e-5, rtol=1e-4)


def test_bases_saved_once_and_regenerated_bit_identically(tmp_path):
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, peftkit.VeRA(r=8, projection_prng_key=11, target_modules=TARGETS))
    randomize(model)
    y = _outputs(model, inputs, out)
    peftkit.save(model, tmp_path / "a")
    state = peftkit.read_adapters(tmp_path / "a")[0]
    assert set(state.shared) == {"vera_A", "vera_B"}
    assert not any("vera_A" in k or "vera_B" in k for k in state.tensors)  # not per layer
    fresh, _, _ = MODELS["llama"](0)
    peftkit.load(fresh, tmp_path / "a")
    a, b = kaiming_bases(8, 64, 64, 11)
    assert torch.equal(shared_of(fresh).vera_A, a) and torch.equal(shared_of(fresh).vera_B, b)
    assert torch.allclose(_outputs(fresh, inputs, out), y, atol=1e-6)


def test_rank_above_the_smallest_layer_is_refused_naming_it():
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.TargetError, match=r"v_proj.*r=17.*16") as err:
        peftkit.attach(model, peftkit.VeRA(r=17, target_modules=TARGETS))
    assert "r <= 16" in str(err.value)
    with pytest.raises(peftkit.ConfigError, match="dropout"):
        peftkit.attach(model, peftkit.VeRA(r=4, dropout=1.0, target_modules=TARGETS))
    with pytest.raises(peftkit.ConfigError, match="projection_prng_key"):
        peftkit.attach(model, peftkit.VeRA(r=4, projection_prng_key="seven", target_modules=TARGETS))
    assert peftkit.adapter_names(model) == []
