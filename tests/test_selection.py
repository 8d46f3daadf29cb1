"""BitFit (biases only) and LayerNorm tuning (peft's LN_TUNING): defining properties and peft parity."""

from __future__ import annotations

import pytest
import torch
from peft import LNTuningConfig, PeftModel, get_peft_model
from torch import nn

import peftkit
from peftkit.methods.selection import HEAD_PATTERN, BitFit, LayerNormTuning

from .models import MODELS
from .models import outputs as _outputs


def _perturb(model, scale: float = 0.2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# -- BitFit --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,head", [("bert", "classifier"), ("gpt2", None), ("cnn", "head")])
def test_bitfit_trains_exactly_the_biases(arch, head):
    model, _, _ = MODELS[arch](0)
    biased = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    if head:
        assert head in biased
        biased = {n: m for n, m in biased.items() if n != head and not n.startswith(head + ".")}
    peftkit.attach(model, BitFit())
    layers = peftkit.get_adapter(model, "default")
    assert set(layers) == set(biased)
    params = peftkit.adapter_parameters(model)
    assert all(n.endswith(".bias_delta") for n in params)
    assert sum(p.numel() for p in params.values()) == sum(m.bias.numel() for m in biased.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)


def test_bitfit_gradients_are_the_bias_gradients():
    """Training Δb is training b: the gradient of Δb equals the gradient of the bias in the plain model."""
    ref, inputs, out = MODELS["cnn"](0)
    model, _, _ = MODELS["cnn"](0)
    peftkit.attach(model, BitFit())
    for m in (ref, model):
        m.train()
        out(m(**inputs)).pow(2).mean().backward()
    for path, layer in peftkit.get_adapter(model, "default").items():
        assert torch.allclose(layer.bias_delta.grad, ref.get_submodule(path).bias.grad, rtol=1e-5, atol=1e-8), path


def test_bitfit_output_equals_base_with_shifted_bias():
    model, inputs, out = MODELS["gpt2"](0)
    ref, _, _ = MODELS["gpt2"](0)
    peftkit.attach(model, BitFit())
    _perturb(model)
    with torch.no_grad():
        for path, layer in peftkit.get_adapter(model, "default").items():
            ref.get_submodule(path).bias.add_(layer.bias_delta)
    assert torch.allclose(_outputs(model, inputs, out), _outputs(ref, inputs, out), atol=1e-5)
    peftkit.merge(model)  # merging writes exactly b + Δb, weights untouched
    for path in peftkit.get_adapter(model, "default"):
        site, r = model.get_submodule(path), ref.get_submodule(path)
        assert torch.equal(site.base.bias, r.bias) and torch.equal(site.base.weight, r.weight)


class Gate(nn.Module):
    """A layer whose bias is not added to its output: BitFit runs it with the bias replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(self.bias)


class GateNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.gate = Gate()
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gate(self.inp(x)))


def test_bitfit_on_a_layer_with_a_nonadditive_bias():
    torch.manual_seed(0)
    model = GateNet()
    x = torch.randn(4, 4)
    peftkit.attach(model, BitFit(target_modules=["gate"]), name="a")
    peftkit.attach(model, BitFit(target_modules=["gate"]), name="b")
    layers = {n: peftkit.get_adapter(model, n)["gate"] for n in "ab"}
    with torch.no_grad():
        layers["a"].bias_delta.normal_()
        layers["b"].bias_delta.normal_()
        base_b = model.gate.base.bias.clone()
        expect = {n: model.out(model.inp(x) * torch.tanh(base_b + layers[n].bias_delta)) for n in "ab"}
        for n in "ab":
            peftkit.activate(model, n)
            assert torch.allclose(model(x), expect[n], atol=1e-6)
        with peftkit.mixed_batch(model, ["a", "b", None, "b"]):
            ym = model(x)
        assert torch.allclose(ym[[0, 1, 3]], torch.stack([expect["a"][0], expect["b"][1], expect["b"][3]]), atol=1e-6)
        peftkit.activate(model, "a")
        peftkit.merge(model)
        assert torch.allclose(model(x), expect["a"], atol=1e-6)


def test_bitfit_errors_and_config_round_trip():
    llama, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.TargetError, match="'all-bias' matches no module of LlamaForCausalLM"):
        peftkit.attach(llama, BitFit())
    with pytest.raises(peftkit.TargetError, match=r"q_proj: Linear has no bias parameter"):
        peftkit.attach(llama, BitFit(target_modules=["q_proj"]))
    cfg = BitFit(exclude_modules="pooler.dense")
    assert cfg.exclude_modules == ["pooler.dense", HEAD_PATTERN]
    again = peftkit.get_method("bitfit").from_dict(cfg.to_dict())
    assert again == cfg
    explicit = BitFit(target_modules="all-bias")
    assert peftkit.get_method("bitfit").from_dict(explicit.to_dict()) == explicit
    assert BitFit(target_modules=["dense"]).exclude_modules is None  # explicit targets: nothing added
    bert, _, _ = MODELS["bert"](0)
    peftkit.attach(bert, BitFit(exclude_modules="pooler.dense"))
    paths = list(peftkit.get_adapter(bert, "default"))
    assert not any(p.startswith(("bert.pooler", "classifier")) for p in paths) and paths


# -- LayerNorm tuning --------------------------------------------------------------------------------
LN_CASES = [
    ("llama", {}),  # peft's defaults: input_layernorm, post_attention_layernorm, norm
    ("gpt2", {}),
    ("bert", dict(target_modules=["LayerNorm"])),
    ("cnn", dict(target_modules=["norm"])),  # BatchNorm2d: copies of weight, bias and running statistics
]
LN_IDS = [a for a, _ in LN_CASES]


def _copy_ln_from_peft(pm, ours) -> None:
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for n, p in peftkit.adapter_parameters(ours).items():
            path, leaf = n.split(".adapters.default.")
            p.copy_(theirs[f"base_model.model.{path}.ln_tuning_layers.default.{leaf}"])


def _perturb_peft(pm) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ln_tuning_layers" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("arch,kw", LN_CASES, ids=LN_IDS)
def test_ln_tuning_same_parameters_same_outputs(arch, kw):
    model, inputs, out = MODELS[arch](0)
    pm = get_peft_model(model, LNTuningConfig(**kw)).eval()
    _perturb_peft(pm)
    ours, _, _ = MODELS[arch](0)
    peftkit.attach(ours, LayerNormTuning(**kw))
    theirs = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert len(theirs) == len(peftkit.adapter_parameters(ours))
    _copy_ln_from_peft(pm, ours)
    assert torch.allclose(_outputs(ours, inputs, out), _outputs(pm, inputs, out), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,kw", LN_CASES, ids=LN_IDS)
def test_ln_tuning_peft_file_loads_with_same_outputs(arch, kw, tmp_path):
    model, inputs, out = MODELS[arch](0)
    pm = get_peft_model(model, LNTuningConfig(**kw)).eval()
    _perturb_peft(pm)
    ref = _outputs(pm, inputs, out)
    pm.save_pretrained(tmp_path)
    base, _, _ = MODELS[arch](0)
    assert not torch.allclose(ref, _outputs(base, inputs, out), atol=1e-4)
    peftkit.load(base, tmp_path)
    assert torch.allclose(_outputs(base, inputs, out), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,kw", LN_CASES, ids=LN_IDS)
def test_ln_tuning_hf_export_loads_in_peft(arch, kw, tmp_path):
    model, inputs, out = MODELS[arch](0)
    peftkit.attach(model, LayerNormTuning(**kw))
    _perturb(model, 0.3)
    ours = _outputs(model, inputs, out)
    peftkit.save(model, tmp_path, format="hf")
    base, _, _ = MODELS[arch](0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(_outputs(pm, inputs, out), ours, atol=1e-4, rtol=1e-4)


def test_ln_tuning_gradients_equal_peft():
    model, inputs, out = MODELS["llama"](0)
    pm = get_peft_model(model, LNTuningConfig())
    _perturb_peft(pm)
    ours, _, _ = MODELS["llama"](0)
    peftkit.attach(ours, LayerNormTuning())
    _copy_ln_from_peft(pm, ours)
    for m in (pm, ours):
        out(m(**inputs)).pow(2).mean().backward()
    theirs = dict(pm.named_parameters())
    for n, p in peftkit.adapter_parameters(ours).items():
        path, leaf = n.split(".adapters.default.")
        ref = theirs[f"base_model.model.{path}.ln_tuning_layers.default.{leaf}"].grad
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-7), n


def test_ln_tuning_default_selects_every_norm_and_only_norm_parameters_train():
    model, _, _ = MODELS["bert"](0)  # bert is not in peft's table: every norm layer
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    peftkit.attach(model, LayerNormTuning())
    assert set(peftkit.get_adapter(model, "default")) == set(norms)
    params = peftkit.adapter_parameters(model)
    assert sum(p.numel() for p in params.values()) == sum(p.numel() for m in norms.values() for p in m.parameters())
    llama, _, _ = MODELS["llama"](0)  # the RMSNorm class is found by name on a plain reading too
    peftkit.attach(llama, LayerNormTuning(target_modules="all-norm"))
    assert len(peftkit.get_adapter(llama, "default")) == 5


def test_ln_tuning_merge_writes_copies_and_unmerge_restores():
    model, inputs, out = MODELS["cnn"](0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.attach(model, LayerNormTuning())
    layer = peftkit.get_adapter(model, "default")["norm"]
    _perturb(model)
    with torch.no_grad():
        layer.running_mean.add_(0.5)
    y = _outputs(model, inputs, out)
    peftkit.merge(model)
    assert torch.equal(model.norm.base.weight, layer.weight) and torch.equal(model.norm.base.running_mean, layer.running_mean)
    assert torch.allclose(_outputs(model, inputs, out), y, atol=1e-6)
    peftkit.unmerge(model)
    peftkit.unload(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ln_tuning_training_updates_the_copys_running_statistics():
    model, inputs, _ = MODELS["cnn"](0)
    peftkit.attach(model, LayerNormTuning())
    base_mean = model.norm.base.running_mean.clone()
    copy = peftkit.get_adapter(model, "default")["norm"]
    model.train()
    model(**inputs)
    assert torch.equal(model.norm.base.running_mean, base_mean)
    assert not torch.equal(copy.running_mean, base_mean) and int(copy.num_batches_tracked) == 1


def test_ln_tuning_errors():
    llama, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.TargetError, match=r"layers.0.mlp: .*parameters in submodules"):
        peftkit.attach(llama, LayerNormTuning(target_modules=["layers.0.mlp"]))
    with pytest.raises(peftkit.TargetError, match="act_fn"):
        peftkit.attach(llama, LayerNormTuning(target_modules=["layers.0.mlp.act_fn"]))
    assert peftkit.adapter_names(llama) == []
