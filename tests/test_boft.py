"""BOFT math against peft 0.21.2 (same weights, gradients, both file directions) and its defining properties.

peft computes butterfly factors (``boft_n_butterfly_factor > 1``) only through a CUDA extension
(``FastBlockDiag``) and falls back to one factor on CPU; the tests give peft a CPU stand-in for that
extension (block-diagonal assembly and its gradient), so peft's own permutation and product code runs.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import BOFTConfig, PeftModel, get_peft_model
from torch import nn

import peftkit
from peftkit.methods.boft import BOFT, BOFTLayer, butterfly_permutation
from peftkit.methods.oft import OFT

from .models import MODELS
from .models import outputs as _outputs


class _CpuBlockDiag:
    """What peft's ``fbd_cuda`` extension computes, on CPU: ``(N, D, H, H)`` blocks → ``(N, D·H, D·H)``."""

    @staticmethod
    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*xi.unbind(0)) for xi in x])]

    @staticmethod
    def backward(grad: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        _, d, h, _ = x.shape
        return [torch.stack([torch.stack([g[k * h:(k + 1) * h, k * h:(k + 1) * h] for k in range(d)]) for g in grad])]


@pytest.fixture(autouse=True)
def _peft_butterfly(monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _CpuBlockDiag())


PEFT_CASES = [
    ("llama", dict(boft_block_size=4, target_modules=["q_proj", "v_proj"])),
    ("llama", dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "down_proj"])),
    ("llama", dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3, target_modules=["k_proj", "up_proj"])),
    ("bert", dict(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["query", "value", "dense"])),
    ("cnn", dict(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["conv2", "fc"])),
]
IDS = [f"{a}-{i}" for i, (a, _) in enumerate(PEFT_CASES)]


def _peft(arch, kw, seed=0):
    model, inputs, out = MODELS[arch](seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, BOFTConfig(init_weights=False, **kw)).eval()
    return pm, inputs, out


def _ours_config(kw) -> BOFT:
    return BOFT(boft_block_size=kw.get("boft_block_size") or None, boft_block_num=kw.get("boft_block_num") or None,
                boft_n_butterfly_factor=kw.get("boft_n_butterfly_factor", 1), target_modules=kw["target_modules"])


def _peft_param(pm, name: str) -> nn.Parameter:
    path, leaf = name.split(".adapters.default.")
    return pm.get_parameter(f"base_model.model.{path}.{leaf}.default")


def _ours_like(pm, arch, kw):
    ours, inputs, out = MODELS[arch](0)
    peftkit.attach(ours, _ours_config(kw))
    with torch.no_grad():
        for n, p in peftkit.adapter_parameters(ours).items():
            p.copy_(_peft_param(pm, n))
    return ours, inputs, out


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_same_weights_same_forward_and_gradients(arch, kw):
    pm, inputs, out = _peft(arch, kw)
    ref = _outputs(pm, inputs, out)
    ours, _, _ = _ours_like(pm, arch, kw)
    assert not torch.allclose(ref, _outputs(MODELS[arch](0)[0], inputs, out), atol=1e-4)  # peft's adapter acts
    assert torch.allclose(_outputs(ours, inputs, out), ref, atol=1e-5, rtol=1e-5)
    out(pm(**inputs)).pow(2).mean().backward()
    out(ours(**inputs)).pow(2).mean().backward()
    for n, p in peftkit.adapter_parameters(ours).items():
        g = _peft_param(pm, n).grad
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_peft_file_loads_with_same_outputs(arch, kw, tmp_path):
    pm, inputs, out = _peft(arch, kw)
    ref = _outputs(pm, inputs, out)
    pm.save_pretrained(tmp_path)
    base, _, _ = MODELS[arch](0)
    peftkit.load(base, tmp_path)
    assert torch.allclose(_outputs(base, inputs, out), ref, atol=1e-5, rtol=1e-5)
    cfg = next(iter(peftkit.get_adapter(base, "default").values())).config
    assert cfg.boft_n_butterfly_factor == kw.get("boft_n_butterfly_factor", 1)


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_our_export_loads_in_peft_with_same_outputs(arch, kw, tmp_path):
    ours, inputs, out = MODELS[arch](0)
    peftkit.attach(ours, _ours_config(kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(ours).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ref = _outputs(ours, inputs, out)
    peftkit.save(ours, tmp_path, format="hf")
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert hf["peft_type"] == "BOFT"
    base, _, _ = MODELS[arch](0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(_outputs(pm, inputs, out), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_merged_weights_match_peft(arch, kw):
    pm, _, _ = _peft(arch, kw)
    ours, _, _ = _ours_like(pm, arch, kw)
    peftkit.merge(ours)
    merged = pm.merge_and_unload()
    for path in peftkit.get_adapter(ours, "default"):
        ours_w = ours.get_submodule(path).weight
        assert torch.allclose(ours_w, merged.get_submodule(path).weight, atol=1e-5), path


# -- defining properties ---------------------------------------------------------------------
def _layer(model) -> BOFTLayer:
    return next(iter(peftkit.get_adapter(model, "default").values()))


def test_m_is_orthogonal_and_identity_at_init():
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    peftkit.attach(model, BOFT(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["q_proj"]))
    layer = _layer(model)
    assert torch.equal(layer.dense(), torch.eye(32))
    assert torch.equal(_outputs(model, inputs, out), y0)
    with torch.no_grad():
        layer.boft_R.normal_(0, 0.5)
    m = layer.dense().double()
    assert torch.allclose(m @ m.t(), torch.eye(32, dtype=torch.float64), atol=1e-6)
    assert not torch.allclose(m, torch.eye(32, dtype=torch.float64), atol=1e-2)
    # three factors of 4-blocks reach 16 features: M is not block diagonal at the block size
    assert m[:4, 4:16].abs().sum() > 0


def test_butterfly_reach_and_sparsity():
    """Factor i mixes features b·2^{i−1} apart; m factors give a block-diagonal M with blocks of b·2^{m−1}."""
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, BOFT(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"]))
    layer = _layer(model)
    with torch.no_grad():
        layer.boft_R.normal_(0, 0.5)
    m = layer.dense()
    support = m.abs() > 1e-7
    block = torch.block_diag(*[torch.ones(8, 8, dtype=torch.bool)] * 4)  # b·2^{m−1} = 8
    assert not (support & ~block).any()
    assert support.sum() > 4 * 16  # more than block-diagonal 4x4 blocks
    assert torch.equal(butterfly_permutation(16, 4, 1), torch.tensor([0, 1, 4, 5, 2, 3, 6, 7,
                                                                        8, 9, 12, 13, 10, 11, 14, 15]))


def test_one_factor_equals_oft_exact_cayley():
    """m = 1 is block-diagonal OFT: with Q = (A − Aᵀ)/2 in OFT's triangle, both give the same outputs."""
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, BOFT(boft_block_size=8, target_modules=["q_proj", "v_proj"]))
    oft_model, _, _ = MODELS["llama"](0)
    peftkit.attach(oft_model, OFT(oft_block_size=8, use_cayley_neumann=False, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    oft_layers = peftkit.get_adapter(oft_model, "default")
    with torch.no_grad():
        for path, layer in peftkit.get_adapter(model, "default").items():
            layer.boft_R.copy_(torch.randn(layer.boft_R.shape, generator=g) * 0.3)
            q = 0.5 * (layer.boft_R[0] - layer.boft_R[0].transpose(-2, -1))
            o = oft_layers[path]
            o.oft_R.copy_(q[:, o.rows, o.cols])
    assert torch.allclose(_outputs(model, inputs, out), _outputs(oft_model, inputs, out), atol=1e-6)


def test_parameter_count():
    """m·n·b² rotation numbers plus out scales per layer."""
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, BOFT(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "down_proj"]))
    n = sum(p.numel() for p in peftkit.adapter_parameters(model).values())
    q = 2 * (32 // 4) * 16 + 32  # q_proj: d = 32, out = 32
    down = 2 * (64 // 4) * 16 + 32  # down_proj: d = 64, out = 32
    assert n == 2 * (q + down)  # two decoder layers


def test_multiplicative_dropout_only_in_training():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, BOFT(boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.5, target_modules=["q_proj"]))
    layer = _layer(model)
    with torch.no_grad():
        layer.boft_R.normal_(0, 0.5)
    model.eval()
    full = layer.blocks()
    model.train()
    torch.manual_seed(0)
    dropped = layer.blocks()
    eye = torch.eye(4)
    identity = [(f, k) for f in range(2) for k in range(8) if torch.allclose(dropped[f, k], eye)]
    assert len(identity) == 4 and len({f for f, _ in identity}) == 1  # ⌊0.5·8⌋ blocks of one factor
    changed = [(f, k) for f in range(2) for k in range(8) if not torch.equal(dropped[f, k], full[f, k])]
    assert sorted(changed) == sorted(identity)


# -- bad input ---------------------------------------------------------------------------------
def test_block_size_that_does_not_divide_names_layer_and_valid_sizes():
    model, _, _ = MODELS["llama"](0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.TargetError, match=r"q_proj.*boft_block_size=5 .*rotated size 32.*valid boft_block_size "
                                                  r"values: 2, 4, 8, 16, 32"):
        peftkit.attach(model, BOFT(boft_block_size=5, target_modules=["q_proj"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(peftkit.TargetError, match=r"boft_block_num=2 .*boft_n_butterfly_factor=3.*valid boft_block_num "
                                                  r"values: 4, 8, 16$"):
        peftkit.attach(model, BOFT(boft_block_num=2, boft_n_butterfly_factor=3, target_modules=["q_proj"]))


@pytest.mark.parametrize("kw,match", [
    (dict(boft_block_size=4, boft_block_num=8), "not both"),
    (dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor must be a positive integer"),
    (dict(boft_dropout=1.0), r"boft_dropout must be in \[0, 1\)"),
    (dict(boft_block_size=-2), "boft_block_size must be a positive integer"),
])
def test_bad_values(kw, match):
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.attach(model, BOFT(target_modules=["q_proj"], **kw))


def test_grouped_conv_and_conv1d_export_refused(tmp_path):
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(peftkit.TargetError, match="groups=2"):
        peftkit.attach(conv, BOFT(boft_block_size=2, target_modules=["0"]))
    gpt2, _, _ = MODELS["gpt2"](0)
    peftkit.attach(gpt2, BOFT(boft_block_size=8, target_modules=["c_attn"]))
    with pytest.raises(peftkit.ConfigError, match="Conv1D"):
        peftkit.save(gpt2, tmp_path / "x", format="hf")
    assert not (tmp_path / "x").exists()


def test_default_block_size_is_peft_default():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, BOFT(target_modules=["q_proj"]))
    assert _layer(model).block_size == 4
