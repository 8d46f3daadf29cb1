"""CorDA: the covariance statistics, peft parity (same data → same factors and outputs; files both ways),
and the C = I reductions (IPA = PiSSA, KPA = MiLoRA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.corda import CorDA, corda_calibrate

from .models import MODELS, outputs

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _batches(inputs):
    ids = inputs["input_ids"]
    return [ids[i:i + 1] for i in range(ids.shape[0])]  # peft's hook needs one sequence per call


def test_calibration_is_the_mean_of_scaled_input_gram_matrices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    xs = [torch.randn(4, 6), torch.randn(2, 3, 6)]
    cov = corda_calibrate(model, xs, target_modules=["0", "2"])
    assert set(cov) == {"0", "2"}
    expected = torch.zeros(6, 6)
    for x in xs:
        x = x.reshape(-1, 6)
        x = x / x.max().abs()
        expected += x.t() @ x
    assert torch.allclose(cov["0"], expected / 2, atol=1e-6)
    assert cov["2"].shape == (5, 5)


def _peft_corda(model, inputs, mode, r=4, alpha=8):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method=mode))
    preprocess_corda(model, cfg, run_model=lambda: [model(b) for b in _batches(inputs)])
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_same_factors_and_outputs_as_peft(mode):
    ref, inputs, out = MODELS["llama"](0)
    ref = _peft_corda(ref, inputs, mode)
    model, _, _ = MODELS["llama"](0)
    cov = corda_calibrate(model, _batches(inputs), target_modules=TARGETS)
    peftkit.attach(model, CorDA(r=4, alpha=8, mode=mode, covariances=cov, target_modules=TARGETS))
    layers = peftkit.get_adapter(model, "default")
    assert len(layers) == 6
    ref_modules = dict(ref.named_modules())
    for path, mod in layers.items():
        theirs = ref_modules["base_model.model." + path]
        assert torch.allclose(mod.lora_A, theirs.lora_A["default"].weight, atol=1e-4), path
        assert torch.allclose(mod.lora_B, theirs.lora_B["default"].weight, atol=1e-4), path
        # the base holds the same residual W − s·B A
        assert torch.allclose(model.get_submodule(path).weight, theirs.base_layer.weight, atol=1e-5), path
    # identity at init, then the same outputs and gradients after the same perturbation
    assert torch.allclose(outputs(model, inputs, out), outputs(MODELS["llama"](0)[0], inputs, out), atol=1e-4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path, mod in layers.items():
            theirs = ref_modules["base_model.model." + path]
            for ours, t in ((mod.lora_A, theirs.lora_A["default"].weight), (mod.lora_B, theirs.lora_B["default"].weight)):
                ours.add_(0.05 * torch.randn(ours.shape, generator=g))
                t.copy_(ours)
    ya, yb = out(model(**inputs)), out(ref(**inputs))
    assert torch.allclose(ya, yb, atol=1e-4)
    ya.pow(2).mean().backward()
    yb.pow(2).mean().backward()
    for path, mod in layers.items():
        theirs = ref_modules["base_model.model." + path]
        assert torch.allclose(mod.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-3, atol=1e-6), path


def test_files_both_ways_with_peft(tmp_path):
    from peft import PeftModel

    ref, inputs, out = MODELS["llama"](0)
    ref = _peft_corda(ref, inputs, "ipm")
    ref.save_pretrained(tmp_path / "init")  # peft's starting point, needed to convert the trained adapter
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.add_(0.03)
    y_peft = outputs(ref, inputs, out)
    ref.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    # peft's converted file is a LoRA on the original base: peftkit loads it with the same outputs
    base, _, _ = MODELS["llama"](0)
    peftkit.load(base, tmp_path / "peft")
    assert torch.allclose(outputs(base, inputs, out), y_peft, atol=1e-4)

    # our CorDA adapter exported in peft's form loads in peft (onto the original base) with equal outputs
    model, _, _ = MODELS["llama"](0)
    cov = corda_calibrate(model, _batches(inputs), target_modules=TARGETS)
    peftkit.attach(model, CorDA(r=4, alpha=8, mode="kpm", covariances=cov, target_modules=TARGETS))
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(0.02)
    y = outputs(model, inputs, out)
    peftkit.save(model, tmp_path / "ours", format="hf")
    loaded = PeftModel.from_pretrained(MODELS["llama"](0)[0], tmp_path / "ours")
    assert torch.allclose(outputs(loaded, inputs, out), y, atol=1e-4)
    # and in peftkit's own format, the starting factors travel in the file (no covariances needed)
    peftkit.save(model, tmp_path / "native")
    fresh, _, _ = MODELS["llama"](0)
    peftkit.load(fresh, tmp_path / "native")
    assert torch.allclose(outputs(fresh, inputs, out), y, atol=1e-5)


@pytest.mark.parametrize("mode, init", [("ipm", "pissa"), ("kpm", "milora")])
def test_identity_covariance_reduces_to_pissa_and_milora(mode, init):
    model, _, _ = MODELS["llama"](0)
    ref, _, _ = MODELS["llama"](0)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    eye = {n: torch.eye(model.get_submodule(n).in_features) for n in names}
    peftkit.attach(model, CorDA(r=3, alpha=6, mode=mode, covariances=eye, target_modules=names))
    peftkit.attach(ref, peftkit.LoRA(r=3, alpha=6, init=init, target_modules=names))
    ours, theirs = peftkit.get_adapter(model, "default"), peftkit.get_adapter(ref, "default")
    for n in names:
        a, b = ours[n], theirs[n]
        assert torch.allclose(a.delta_matrix(), b.delta_matrix(), atol=1e-5), n  # the same s·B A
        # the same factors up to sign and the damping's balance: C' = (1 + 0.01)·I scales Σ by 1.01 and
        # V̂ᵀC'⁻¹ by 1/1.01, so A is PiSSA's A / √1.01 and B is PiSSA's B · √1.01
        root = 1.01 ** 0.5
        assert torch.allclose(a.lora_A.abs() * root, b.lora_A.abs(), atol=1e-5), n
        assert torch.allclose(a.lora_B.abs() / root, b.lora_B.abs(), atol=1e-5), n
        assert torch.allclose(model.get_submodule(n).weight, ref.get_submodule(n).weight, atol=1e-5), n


def test_bad_inputs_name_the_culprit():
    model, inputs, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match=r"covariances are needed.*corda_calibrate"):
        peftkit.attach(model, CorDA(r=2, target_modules=["q_proj"]))
    cov = corda_calibrate(model, _batches(inputs)[:1], target_modules=["q_proj"])
    with pytest.raises(peftkit.ConfigError, match="mode='ipa' is not one of 'ipm', 'kpm'"):
        peftkit.attach(model, CorDA(r=2, mode="ipa", covariances=cov, target_modules=["q_proj"]))
    with pytest.raises(peftkit.TargetError, match="v_proj: no covariance for this module"):
        peftkit.attach(model, CorDA(r=2, covariances=cov, target_modules=["q_proj", "v_proj"]))
    bad = {k: torch.eye(3) for k in cov}
    with pytest.raises(peftkit.TargetError, match="covariance is \\(3, 3\\) but the layer needs \\(32, 32\\)"):
        peftkit.attach(model, CorDA(r=2, covariances=bad, target_modules=["q_proj"]))
    with pytest.raises(peftkit.TargetError, match="rank 40 is larger"):
        peftkit.attach(model, CorDA(r=40, covariances=cov, target_modules=["q_proj"]))
    assert not peftkit.adapter_names(model)
    with pytest.raises(peftkit.ConfigError, match="no calibration input reached"):
        corda_calibrate(model, [], target_modules=["q_proj"])


def test_calibrate_uses_the_configs_targets_and_sample_count():
    model, inputs, _ = MODELS["llama"](0)
    batches = _batches(inputs)
    cfg = CorDA(r=2, calibration_samples=2, target_modules=["v_proj"]).calibrate(model, iter(batches))
    expected = corda_calibrate(model, batches[:2], target_modules=["v_proj"])
    assert set(cfg.covariances) == set(expected) == {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"}
    assert all(torch.equal(cfg.covariances[k], expected[k]) for k in expected)


def test_cli_trains_corda_calibrated_on_the_training_data(llama_dir, lm_data, tmp_path):
    from peftkit.cli.main import main

    train, _ = lm_data
    out = tmp_path / "run"
    assert main(["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", "corda", "--r", "2",
                 "--mode", "kpm", "--calibration-samples", "4", "--data", str(train), "--output", str(out),
                 "--max-steps", "1", "--batch-size", "4"]) == 0
    state = peftkit.read_adapters(out / "adapter")[0]
    assert state.method == "corda" and state.config.mode == "kpm"
    assert any(k.endswith("init_A") for k in state.tensors)  # the starting factors travel with the adapter
