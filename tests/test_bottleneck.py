"""Bottleneck adapters (Houlsby 2019, Pfeiffer 2020, He et al. 2022): peft has none, so the papers' defining properties.

* serial: ``y ← y + W_up f(W_down y)`` right after the targeted sub-layer, before the residual add;
* parallel: ``y ← y + s · W_up f(W_down x)`` from the sub-layer's input;
* ``W_up = 0`` at init (identity), parameter count ``d_in·h + h + h·d_out + d_out`` per adapter,
  not mergeable, default targets per placement and model family.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.core.site import AdapterSite
from peftkit.methods.bottleneck import Bottleneck

from .models import MODELS


def untouched(model) -> bool:
    return not any(isinstance(m, AdapterSite) for m in model.modules())


def randomize(model, name: str | None = None, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def targets(model, name: str = "default") -> list[str]:
    return list(peftkit.get_adapter(model, name))


class ToyBlock(nn.Module):
    """A pre-norm transformer-style block: attention-like mixing + FFN, each with a residual."""

    def __init__(self, d: int = 12, inner: int = 24) -> None:
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.up = nn.Linear(d, inner)
        self.down = nn.Linear(inner, d)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(torch.tanh(self.mix(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(x)
        return h + self.down(F.gelu(self.up(h)))


class ToyMLPBlock(nn.Module):
    def __init__(self, d: int = 12, inner: int = 24) -> None:
        super().__init__()
        self.up = nn.Linear(d, inner)
        self.down = nn.Linear(inner, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = ToyMLPBlock()
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.mlp(x))


def adapter_fn(mod, act):
    """The hand-written adapter ``v ↦ W_up act(W_down v + b_down) + b_up`` from a built adapter's tensors."""
    d, u = mod.adapter_down, mod.adapter_up
    return lambda v: F.linear(act(F.linear(v, d.weight, d.bias)), u.weight, u.bias)


def test_serial_adapter_sits_after_the_sublayer_before_the_residual():
    torch.manual_seed(0)
    block = ToyBlock().eval()
    x = torch.randn(5, 12)
    peftkit.attach(block, Bottleneck(placement="houlsby", bottleneck_size=3, non_linearity="relu",
                                     target_modules=["o_proj", "down"]))
    randomize(block)
    a_att = adapter_fn(block.o_proj.adapters["default"], torch.relu)
    a_ffn = adapter_fn(block.down.adapters["default"], torch.relu)
    base = block.o_proj.base, block.down.base
    with torch.no_grad():
        att = base[0](torch.tanh(block.mix(x)))
        h = x + (att + a_att(att))
        ffn = base[1](F.gelu(block.up(h)))
        ref = h + (ffn + a_ffn(ffn))
        assert torch.allclose(block(x), ref, atol=1e-6)
        # and it is not the pre-sub-layer variant nor the post-residual variant
        wrong = h + ffn + a_ffn(h + ffn)
        assert not torch.allclose(block(x), wrong, atol=1e-3)


def test_parallel_adapter_reads_the_block_input_and_scales_linearly():
    torch.manual_seed(0)
    x = torch.randn(6, 12)
    outs = {}
    for s in (1.0, 4.0, -2.5):
        net = ToyNet().eval()
        torch.manual_seed(0)
        net.load_state_dict(ToyNet().state_dict())
        peftkit.attach(net, Bottleneck(placement="parallel", scaling=s, bottleneck_size=4, non_linearity="gelu",
                                       target_modules=["mlp"]))
        randomize(net, seed=3)
        site = net.mlp
        mod = site.adapters["default"]
        assert (mod.adapter_down.in_features, mod.adapter_up.out_features) == (12, 12)
        with torch.no_grad():
            ref = site.base(x) + s * adapter_fn(mod, F.gelu)(x)
            assert torch.allclose(site(x), ref, atol=1e-6)
            outs[s] = site(x) - site.base(x)
    assert outs[1.0].abs().max() > 1e-3
    assert torch.allclose(outs[4.0], 4.0 * outs[1.0], atol=1e-5)
    assert torch.allclose(outs[-2.5], -2.5 * outs[1.0], atol=1e-5)


def test_block_width_comes_from_first_and_last_linear_and_tuple_outputs_are_adapted():
    class TupleBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 10)
            self.b = nn.Linear(10, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))), "extra"

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blk = TupleBlock()

        def forward(self, x):
            return self.blk(x)

    net = Net()
    x = torch.randn(3, 6)
    peftkit.attach(net, Bottleneck(placement="parallel", bottleneck_size=2, target_modules=["blk"]))
    randomize(net)
    mod = net.blk.adapters["default"]
    assert (mod.adapter_down.in_features, mod.hidden, mod.adapter_up.out_features) == (6, 2, 8)
    y, extra = net(x)
    assert extra == "extra"
    assert torch.allclose(y, net.blk.base(x)[0] + adapter_fn(mod, torch.relu)(x), atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_identity_at_init_and_zero_up_projection(arch, placement):
    model, inputs, out = MODELS[arch](0)
    with torch.no_grad():
        y0 = out(model(**inputs))
    peftkit.attach(model, Bottleneck(placement=placement))
    for mod in peftkit.get_adapter(model, "default").values():
        assert not mod.adapter_up.weight.any() and not mod.adapter_up.bias.any()
        assert mod.adapter_down.weight.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(out(model(**inputs)), y0)


EXPECTED_TARGETS = {
    ("llama", "houlsby"): ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                           "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"],
    ("llama", "pfeiffer"): ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
    ("llama", "parallel"): ["model.layers.0.mlp", "model.layers.1.mlp"],
    ("bert", "houlsby"): ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
                          "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"],
    ("bert", "pfeiffer"): ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"],
    ("bert", "parallel"): ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"],
    ("gpt2", "houlsby"): ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                          "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"],
    ("gpt2", "pfeiffer"): ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"],
    ("gpt2", "parallel"): ["transformer.h.0.mlp", "transformer.h.1.mlp"],
}

# (d_in, h, d_out) of every adapter with the default reduction factor 16 (tiny models: width 32, llama/bert FFN 64)
EXPECTED_SHAPES = {
    ("llama", "houlsby"): [(32, 2, 32)] * 4, ("llama", "pfeiffer"): [(32, 2, 32)] * 2,
    ("llama", "parallel"): [(32, 2, 32)] * 2,
    ("bert", "houlsby"): [(32, 2, 32)] * 4, ("bert", "pfeiffer"): [(32, 2, 32)] * 2,
    ("bert", "parallel"): [(32, 2, 64)] * 2,
    ("gpt2", "houlsby"): [(32, 2, 32)] * 4, ("gpt2", "pfeiffer"): [(32, 2, 32)] * 2,
    ("gpt2", "parallel"): [(32, 2, 32)] * 2,
}


@pytest.mark.parametrize("arch,placement", list(EXPECTED_TARGETS), ids=[f"{a}-{p}" for a, p in EXPECTED_TARGETS])
def test_default_targets_and_parameter_count(arch, placement):
    model = MODELS[arch](0)[0]
    peftkit.attach(model, Bottleneck(placement=placement))
    assert targets(model) == EXPECTED_TARGETS[(arch, placement)]
    shapes = [(m.adapter_down.in_features, m.hidden, m.adapter_up.out_features)
              for m in peftkit.get_adapter(model, "default").values()]
    assert shapes == EXPECTED_SHAPES[(arch, placement)]
    expected = sum(d * h + h + h * o + o for d, h, o in shapes)
    n = sum(p.numel() for p in peftkit.adapter_parameters(model).values())
    assert n == expected
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected


def test_parameter_count_with_bottleneck_size():
    model = MODELS["llama"](0)[0]
    peftkit.attach(model, Bottleneck(placement="pfeiffer", bottleneck_size=5))
    # two adapters on 32-wide down_proj outputs: 2 · (32·5 + 5 + 5·32 + 32)
    assert sum(p.numel() for p in peftkit.adapter_parameters(model).values()) == 2 * (32 * 5 + 5 + 5 * 32 + 32)


def test_merge_is_refused_and_names_the_adapter():
    model = MODELS["gpt2"](0)[0]
    peftkit.attach(model, Bottleneck(non_linearity="gelu"), name="ad")
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.NotMergeableError, match=r"adapter 'ad' \(bottleneck.*non-linearity 'gelu'"):
        peftkit.merge(model)
    with pytest.raises(peftkit.NotMergeableError, match="'ad'"):
        peftkit.unload(model, merge=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dropout_follows_train_and_eval_mode():
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, Bottleneck(placement="parallel", dropout=0.5, bottleneck_size=8))
    randomize(model)
    with torch.no_grad():
        a, b = out(model(**inputs)), out(model(**inputs))
        assert torch.equal(a, b)  # eval model: dropout off
        model.train()
        torch.manual_seed(0)
        c = out(model(**inputs))
        assert not torch.allclose(c, a, atol=1e-4)


def test_only_adapters_train_and_base_is_unchanged_by_a_step():
    model, inputs, out = MODELS["bert"](0)
    peftkit.attach(model, Bottleneck(placement="houlsby"))
    randomize(model, std=0.1)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out(model(**inputs)).pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if ".adapters." not in n)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(reduction_factor=4, bottleneck_size=8), "give reduction_factor or bottleneck_size, not both"),
    (dict(reduction_factor=0), "reduction_factor must be a positive number, got 0"),
    (dict(bottleneck_size=0), "bottleneck_size must be a positive integer, got 0"),
    (dict(placement="houlsbi"), r"placement='houlsbi' is not one of .*did you mean 'houlsby'"),
    (dict(non_linearity="swish"), r"non_linearity='swish' is not one of"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(scaling="4"), "scaling must be a number"),
])
def test_bad_options(kw, msg):
    m = MODELS["llama"](0)[0]
    with pytest.raises(peftkit.ConfigError, match=msg):
        peftkit.attach(m, Bottleneck(**kw))
    assert untouched(m)


def test_reduction_factor_too_large_for_layer():
    m = MODELS["llama"](0)[0]
    with pytest.raises(peftkit.TargetError, match=r"o_proj: reduction_factor 64 leaves no hidden unit for width 32"):
        peftkit.attach(m, Bottleneck(reduction_factor=64, target_modules=["o_proj"]))
    assert untouched(m)


def test_block_without_linear_and_conv_are_refused():
    m = MODELS["llama"](0)[0]
    with pytest.raises(peftkit.TargetError, match=r"input_layernorm: cannot tell the input/output width of LlamaRMSNorm"):
        peftkit.attach(m, Bottleneck(target_modules=["o_proj", "input_layernorm"]))
    assert untouched(m)
    cnn = MODELS["cnn"](0)[0]
    msg = "conv1: bottleneck adapters need a linear layer or a block of them, not Conv2d"
    with pytest.raises(peftkit.TargetError, match=msg):
        peftkit.attach(cnn, Bottleneck(bottleneck_size=2, target_modules=["conv1"]))
    assert untouched(cnn)


def test_no_default_targets_for_unknown_family():
    cnn = MODELS["cnn"](0)[0]
    with pytest.raises(peftkit.ConfigError, match="target_modules is empty and there is no default"):
        peftkit.attach(cnn, Bottleneck())
    assert untouched(cnn)


def test_config_round_trips_through_dict():
    cfg = Bottleneck(placement="parallel", scaling=4.0, bottleneck_size=16, non_linearity="silu", target_modules=["mlp"])
    d = cfg.to_dict()
    assert d["method"] == "bottleneck" and d["placement"] == "parallel" and d["scaling"] == 4.0
    back = peftkit.get_method("bottleneck").from_dict(d)
    assert back == cfg
    assert back.default_targets["llama"] == ["mlp"]
