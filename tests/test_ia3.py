"""(IA)³ against peft: same vectors give the same outputs, peft files load, exports load in peft; the method's math."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from torch import nn

import peftkit
from peftkit.methods.ia3 import IA3

from .models import MODELS
from .models import outputs as _outputs


class GroupedNet(nn.Module):
    """Grouped Conv2d (feed-forward scaling must respect the groups when merged) and a Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.vol = nn.Conv3d(6, 4, 1)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.grouped(x))
        h = self.vol(h.unsqueeze(2)).squeeze(2)
        return self.out(h.mean((-1, -2)))


def grouped_net(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(seed + 1))
    return GroupedNet().eval(), {"x": x}, lambda r: r


ARCHS = {**MODELS, "grouped": grouped_net}

PEFT_CASES = [
    ("llama", {}),  # peft's defaults: k_proj, v_proj, down_proj (feed-forward)
    ("llama", dict(target_modules=["q_proj", "down_proj", "up_proj"], feedforward_modules=["up_proj"])),
    ("bert", {}),
    ("gpt2", {}),
    ("cnn", dict(target_modules=["conv1", "conv2", "fc"], feedforward_modules=["conv2", "fc"])),
    ("grouped", dict(target_modules=["grouped", "vol", "out"], feedforward_modules=["grouped"])),
]
IDS = [f"{a}-{i}" for i, (a, _) in enumerate(PEFT_CASES)]


def _ours(kw: dict) -> IA3:
    return IA3(**kw)


def _copy_from_peft(pm, ours) -> None:
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for n, p in peftkit.adapter_parameters(ours).items():
            path, leaf = n.split(".adapters.default.")
            p.copy_(theirs[f"base_model.model.{path}.{leaf}.default"])


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_same_vectors_same_outputs_and_merged_weights(arch, kw):
    model, inputs, out = ARCHS[arch](0)
    pm = get_peft_model(model, IA3Config(init_ia3_weights=False, **kw)).eval()
    ours, _, _ = ARCHS[arch](0)
    peftkit.attach(ours, _ours(kw))
    theirs = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert len(theirs) == len(peftkit.adapter_parameters(ours))
    _copy_from_peft(pm, ours)
    ref = _outputs(pm, inputs, out)
    assert torch.allclose(_outputs(ours, inputs, out), ref, atol=1e-5, rtol=1e-4)
    # merging gives peft's merged weights (rows/columns and, for output scaling, the bias)
    merged_peft = pm.merge_and_unload()
    peftkit.unload(ours, merge=True)
    mine, ref_sd = ours.state_dict(), merged_peft.state_dict()
    for k, v in ref_sd.items():
        assert torch.allclose(mine[k], v, atol=1e-6), k


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_peft_file_loads_with_same_outputs(arch, kw, tmp_path):
    model, inputs, out = ARCHS[arch](0)
    pm = get_peft_model(model, IA3Config(init_ia3_weights=False, **kw)).eval()
    ref = _outputs(pm, inputs, out)
    pm.save_pretrained(tmp_path)
    base, _, _ = ARCHS[arch](0)
    assert not torch.allclose(ref, _outputs(base, inputs, out), atol=1e-4)  # the adapter does something
    peftkit.load(base, tmp_path)
    assert torch.allclose(_outputs(base, inputs, out), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_peftkit_hf_export_loads_in_peft(arch, kw, tmp_path):
    model, inputs, out = ARCHS[arch](0)
    peftkit.attach(model, _ours(kw))
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.uniform_(0.5, 1.5)
    ours = _outputs(model, inputs, out)
    peftkit.save(model, tmp_path, format="hf")
    base, _, _ = ARCHS[arch](0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    mine = {n: p.shape for n, p in peftkit.adapter_parameters(model).items()}
    theirs = {n: p.shape for n, p in pm.named_parameters() if "ia3_l" in n}
    assert sorted(mine.values()) == sorted(theirs.values())  # same modules, same roles (shapes)
    assert torch.allclose(_outputs(pm, inputs, out), ours, atol=1e-4, rtol=1e-4)


def test_gradients_equal_peft():
    model, inputs, out = MODELS["llama"](0)
    pm = get_peft_model(model, IA3Config(init_ia3_weights=False))
    ours, _, _ = MODELS["llama"](0)
    peftkit.attach(ours, IA3())
    _copy_from_peft(pm, ours)
    for m in (pm, ours):
        out(m(**inputs)).pow(2).mean().backward()
    theirs = dict(pm.named_parameters())
    for n, p in peftkit.adapter_parameters(ours).items():
        path, leaf = n.split(".adapters.default.")
        ref = theirs[f"base_model.model.{path}.{leaf}.default"].grad
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-7), n


def test_defaults_and_shapes_follow_peft_table():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, IA3())
    layers = peftkit.get_adapter(model, "default")
    assert sorted({p.rsplit(".", 1)[-1] for p in layers}) == ["down_proj", "k_proj", "v_proj"]
    for path, layer in layers.items():
        base = model.get_submodule(path).base
        if path.endswith("down_proj"):
            assert layer.is_feedforward and layer.ia3_l.shape == (1, base.in_features)
        else:
            assert not layer.is_feedforward and layer.ia3_l.shape == (base.out_features, 1)
    # parameter count: Σ out over output-scaled modules + Σ in over feed-forward ones
    expected = sum(model.get_submodule(p).base.in_features if p.endswith("down_proj") else
                   model.get_submodule(p).base.out_features for p in layers)
    assert sum(p.numel() for p in peftkit.adapter_parameters(model).values()) == expected


def test_explicit_targets_take_the_model_types_feedforward_default():
    """As peft: feedforward_modules=None uses the model type's table even with explicit targets."""
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, IA3(target_modules=["q_proj", "down_proj"]))
    flags = {p.rsplit(".", 1)[-1]: m.is_feedforward for p, m in peftkit.get_adapter(model, "default").items()}
    assert flags == {"q_proj": False, "down_proj": True}
    cnn, _, _ = MODELS["cnn"](0)  # no model type: no feed-forward module
    peftkit.attach(cnn, IA3(target_modules=["conv1", "fc"]))
    assert not any(m.is_feedforward for m in peftkit.get_adapter(cnn, "default").values())


def test_scaling_semantics():
    """Output scaling multiplies the layer output (bias included); input scaling multiplies the layer input."""
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, IA3(target_modules=["layers.0.self_attn.v_proj", "layers.0.mlp.down_proj"],
                              feedforward_modules=["down_proj"]))
    v = model.model.layers[0].self_attn.v_proj
    d = model.model.layers[0].mlp.down_proj
    torch.manual_seed(0)
    with torch.no_grad():
        for site in (v, d):
            site.adapters["default"].ia3_l.uniform_(0.5, 1.5)
        x = torch.randn(2, 3, 32)
        lv = v.adapters["default"].ia3_l.reshape(-1)
        assert torch.allclose(v(x), v.base(x) * lv, atol=1e-6)
        h = torch.randn(2, 3, 64)
        ld = d.adapters["default"].ia3_l.reshape(-1)
        assert torch.allclose(d(h), d.base(h * ld), atol=1e-6)


def test_unmerge_restores_weights_even_with_zero_scales():
    model, inputs, out = MODELS["bert"](0)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.attach(model, IA3())
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.uniform_(0.5, 1.5)
            p.view(-1)[:3] = 0.0  # these rows/columns are wiped out by merging
            p.view(-1)[3] = 1e-30  # and these underflow
    y = _outputs(model, inputs, out)
    peftkit.merge(model)
    assert torch.allclose(_outputs(model, inputs, out), y, atol=1e-5)
    peftkit.unmerge(model)
    peftkit.unload(model)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, ref_state[k], rtol=1e-6, atol=0), k


def test_random_init_is_not_identity():
    model, inputs, out = MODELS["gpt2"](0)
    y0 = _outputs(model, inputs, out)
    peftkit.attach(model, IA3(init_ia3_weights=False))
    assert not torch.allclose(_outputs(model, inputs, out), y0, atol=1e-3)


def test_bad_configs_are_named():
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match="feedforward_modules entry 'up_proj'"):
        peftkit.attach(model, IA3(target_modules=["q_proj"], feedforward_modules=["up_proj"]))
    with pytest.raises(peftkit.TargetError, match=r"feedforward_modules pattern 'mlp\.up_proj' matches none"):
        peftkit.attach(model, IA3(target_modules=["re:.*q_proj"], feedforward_modules=["mlp.up_proj"]))
    with pytest.raises(peftkit.ConfigError, match="init_ia3_weights"):
        peftkit.attach(model, IA3(target_modules=["q_proj"], init_ia3_weights="yes"))
    with pytest.raises(peftkit.TargetError, match=r"embed_tokens: .*Embedding"):
        peftkit.attach(model, IA3(target_modules=["embed_tokens"]))
    cnn, _, _ = MODELS["cnn"](0)
    with pytest.raises(peftkit.TargetError, match=r"seq: .*Conv1d"):
        peftkit.attach(cnn, IA3(target_modules=["seq"]))
    with pytest.raises(peftkit.ConfigError, match="no default"):
        peftkit.attach(cnn, IA3())
    assert peftkit.adapter_names(model) == [] and peftkit.adapter_names(cnn) == []


def test_peftkit_file_keeps_feedforward_roles(tmp_path):
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, IA3(target_modules=["k_proj", "down_proj"]))  # roles resolved from the model type
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.uniform_(0.5, 1.5)
    y = _outputs(model, inputs, out)
    peftkit.save(model, tmp_path)
    cnn, _, _ = MODELS["cnn"](0)
    peftkit.attach(cnn, IA3(target_modules=["conv1"]))  # the same class used on another model type in between
    fresh, _, _ = MODELS["llama"](0)
    peftkit.load(fresh, tmp_path)
    assert torch.allclose(_outputs(fresh, inputs, out), y, atol=1e-6)
