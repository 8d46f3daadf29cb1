"""OFT math against peft 0.21.2 (same weights, both file directions, gradients) and its defining properties."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import OFTConfig, PeftModel, get_peft_model

import peftkit
from peftkit.methods.oft import OFT, OFTLayer, adjust_to_divisor

from .models import MODELS
from .models import outputs as _outputs

PEFT_CASES = [
    ("llama", dict(oft_block_size=8, target_modules=["q_proj", "v_proj", "embed_tokens"])),
    ("llama", dict(r=4, oft_block_size=0, use_cayley_neumann=False, target_modules=["q_proj", "down_proj"])),
    ("llama", dict(oft_block_size=8, block_share=True, target_modules=["k_proj", "up_proj"])),
    ("llama", dict(oft_block_size=16, coft=True, eps=0.3, target_modules=["q_proj", "down_proj"])),
    ("bert", dict(oft_block_size=16, num_cayley_neumann_terms=3, target_modules=["query", "value", "dense"])),
]
IDS = [f"{a}-{i}" for i, (a, _) in enumerate(PEFT_CASES)]


def _peft(arch, kw, seed=0):
    model, inputs, out = MODELS[arch](seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, OFTConfig(init_weights=False, **kw)).eval()
    return pm, inputs, out


def _ours_config(kw) -> OFT:
    return OFT(r=kw.get("r") or None, oft_block_size=kw.get("oft_block_size") or None,
               use_cayley_neumann=kw.get("use_cayley_neumann", True),
               num_cayley_neumann_terms=kw.get("num_cayley_neumann_terms", 5), block_share=kw.get("block_share", False),
               coft=kw.get("coft", False), eps=kw.get("eps", 6e-5), target_modules=kw["target_modules"])


def _peft_param(pm, name: str) -> torch.nn.Parameter:
    """The peft parameter that peftkit's ``<path>.adapters.default.oft_R`` corresponds to."""
    path = name.split(".adapters.default.")[0]
    for leaf in ("oft_R", "oft_embedding_R"):
        try:
            return pm.get_parameter(f"base_model.model.{path}.{leaf}.default.weight")
        except AttributeError:
            continue
    raise KeyError(name)


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_same_weights_same_forward(arch, kw):
    pm, inputs, out = _peft(arch, kw)
    ref = _outputs(pm, inputs, out)
    ours, _, _ = MODELS[arch](0)
    assert not torch.allclose(ref, _outputs(ours, inputs, out), atol=1e-4)  # the peft adapter does something
    peftkit.attach(ours, _ours_config(kw))
    with torch.no_grad():
        for n, p in peftkit.adapter_parameters(ours).items():
            p.copy_(_peft_param(pm, n))
    assert torch.allclose(_outputs(ours, inputs, out), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_peft_file_loads_with_same_outputs(arch, kw, tmp_path):
    pm, inputs, out = _peft(arch, kw)
    ref = _outputs(pm, inputs, out)
    pm.save_pretrained(tmp_path)
    base, _, _ = MODELS[arch](0)
    peftkit.load(base, tmp_path)
    assert torch.allclose(_outputs(base, inputs, out), ref, atol=1e-4, rtol=1e-4)
    cfg = next(iter(peftkit.get_adapter(base, "default").values())).config
    assert (cfg.block_share, cfg.coft, cfg.use_cayley_neumann) == (
        kw.get("block_share", False), kw.get("coft", False), kw.get("use_cayley_neumann", True))


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_peftkit_hf_export_loads_in_peft(arch, kw, tmp_path):
    model, inputs, out = MODELS[arch](0)
    peftkit.attach(model, _ours_config(kw))
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.normal_(0, 0.1)
    ours = _outputs(model, inputs, out)
    peftkit.save(model, tmp_path, format="hf")
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert hf["peft_type"] == "OFT" and hf["oft_block_size"] == kw.get("oft_block_size", 0) and hf["r"] == kw.get("r", 0)
    base, _, _ = MODELS[arch](0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(_outputs(pm, inputs, out), ours, atol=1e-4, rtol=1e-4)
    # and back: the peft-loaded adapter saved again reads into peftkit unchanged
    pm.save_pretrained(tmp_path / "again")
    fresh, _, _ = MODELS[arch](0)
    peftkit.load(fresh, tmp_path / "again")
    assert torch.allclose(_outputs(fresh, inputs, out), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,kw", [PEFT_CASES[0], PEFT_CASES[1], PEFT_CASES[2]], ids=IDS[:3])
def test_gradients_equal_peft(arch, kw):
    pm, inputs, out = _peft(arch, kw)
    ours, _, _ = MODELS[arch](0)
    peftkit.attach(ours, _ours_config(kw))
    mine = peftkit.adapter_parameters(ours)
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(_peft_param(pm, n))
    for m in (pm, ours):
        out(m(**inputs)).pow(2).mean().backward()
    for n, p in mine.items():
        ref = _peft_param(pm, n).grad
        assert ref is not None and ref.abs().sum() > 0
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-7), n


def test_conv2d_matches_peft_merged_weights(tmp_path):
    """peft's unmerged Conv2d forward is not a rotation (its fold sums overlapping patches); its merge is ``W Rᵀ``."""
    pm, inputs, out = _peft("cnn", dict(oft_block_size=9, target_modules=["conv1", "conv2", "fc"]))
    pm.save_pretrained(tmp_path)
    pm.merge_adapter()
    ref = _outputs(pm, inputs, out)
    merged_w = pm.base_model.model.conv2.base_layer.weight.detach().clone()
    base, _, _ = MODELS["cnn"](0)
    assert not torch.allclose(ref, _outputs(base, inputs, out), atol=1e-4)
    peftkit.load(base, tmp_path)
    assert torch.allclose(_outputs(base, inputs, out), ref, atol=1e-5, rtol=1e-4)
    peftkit.merge(base)
    assert torch.allclose(base.conv2.base.weight, merged_w, atol=1e-6)


def _layer(model, path) -> OFTLayer:
    return peftkit.get_adapter(model, "default")[path]


def test_exact_cayley_is_orthogonal_rotation():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, OFT(oft_block_size=8, use_cayley_neumann=False, target_modules=["layers.0.self_attn.q_proj"]))
    layer = _layer(model, "model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        layer.oft_R.normal_(0, 0.5)
    r = layer.rotation().detach()
    eye = torch.eye(r.shape[0])
    assert not torch.allclose(r, eye, atol=1e-2)
    assert torch.allclose(r.T @ r, eye, atol=1e-5) and torch.allclose(r @ r.T, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(r), torch.tensor(1.0), atol=1e-4)  # a rotation, not a reflection
    # the closed form of each block: R = (I − Q)(I + Q)⁻¹ with Q the skew matrix of the upper triangle
    q = torch.zeros(8, 8)
    rows, cols = torch.triu_indices(8, 8, 1)
    q[rows, cols] = layer.oft_R[1].detach()
    q = q - q.T
    i8 = torch.eye(8)
    assert torch.allclose(r[8:16, 8:16], (i8 - q) @ torch.linalg.inv(i8 + q), atol=1e-5)
    assert torch.count_nonzero(r[:8, 8:]) == 0  # block diagonal
    x = torch.randn(5, 32)
    assert torch.allclose(layer.rotate(x).norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # lengths kept


def test_cayley_neumann_series_approximates_exact():
    errs = []
    for terms in (2, 5, 12):
        m, _, _ = MODELS["llama"](0)
        peftkit.attach(m, OFT(oft_block_size=8, num_cayley_neumann_terms=terms, target_modules=["layers.0.self_attn.q_proj"]))
        layer = _layer(m, "model.layers.0.self_attn.q_proj")
        with torch.no_grad():
            layer.oft_R.copy_(torch.randn(layer.oft_R.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        r = layer.rotation().detach()
        errs.append(float((r.T @ r - torch.eye(32)).abs().max()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5


def test_identity_at_init_and_trainable_count():
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    peftkit.attach(model, OFT(oft_block_size=8, target_modules=["q_proj", "down_proj"]))
    assert torch.equal(_outputs(model, inputs, out), y0)
    shapes = {n.split(".adapters.")[0].rsplit(".", 1)[-1]: tuple(p.shape) for n, p in peftkit.adapter_parameters(model).items()}
    assert shapes == {"q_proj": (4, 28), "down_proj": (8, 28)}  # n blocks x b(b-1)/2 upper-triangle entries


def test_merge_is_w_rotated_and_unmerge_restores_neumann():
    model, inputs, out = MODELS["llama"](0)
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    peftkit.attach(model, OFT(r=2, num_cayley_neumann_terms=4, target_modules=["down_proj"]))
    layer = _layer(model, "model.layers.0.mlp.down_proj")
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.normal_(0, 0.1)
    r = layer.rotation().detach()
    assert (r.T @ r - torch.eye(64)).abs().max() > 1e-3  # truncated series: not orthogonal, R⁻¹ ≠ Rᵀ
    y = _outputs(model, inputs, out)
    peftkit.merge(model)
    assert torch.allclose(model.model.layers[0].mlp.down_proj.base.weight, w @ r.T, atol=1e-5)
    assert torch.allclose(_outputs(model, inputs, out), y, atol=1e-5)
    peftkit.unmerge(model)
    restored = model.model.layers[0].mlp.down_proj.base.weight
    assert float((restored - w).abs().max() / w.abs().max()) <= 1e-5


def test_coft_keeps_each_block_within_eps():
    model, inputs, out = MODELS["llama"](0)
    eps = 0.2
    peftkit.attach(model, OFT(oft_block_size=8, coft=True, eps=eps, target_modules=["layers.0.self_attn.q_proj"]))
    layer = _layer(model, "model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        layer.oft_R.normal_(0, 1.0)
        layer.oft_R[0].mul_(1e-3)  # one block already inside the ball: left alone
    small = layer.oft_R[0].detach().clone()
    big_dir = layer.oft_R[1].detach().clone()
    out(model(**inputs)).sum().backward()  # projection happens in forward, in place (peft's rule)
    radius = eps / 4 ** 0.5
    norms = (2 * layer.oft_R.detach().pow(2).sum(-1)).sqrt()  # ‖Q‖_F counts each free entry twice
    assert torch.all(norms <= radius * (1 + 1e-5))
    assert torch.allclose(norms[1:], torch.full((3,), radius), rtol=1e-5)
    assert torch.equal(layer.oft_R[0].detach(), small)
    cos = torch.nn.functional.cosine_similarity(layer.oft_R[1].detach(), big_dir, dim=0)
    assert cos > 1 - 1e-6  # rescaled, not rotated
    assert layer.oft_R.grad is not None and layer.oft_R.grad.abs().sum() > 0


def test_block_share_uses_one_block():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, OFT(oft_block_size=4, block_share=True, use_cayley_neumann=False,
                              target_modules=["layers.0.mlp.down_proj"]))
    layer = _layer(model, "model.layers.0.mlp.down_proj")
    assert tuple(layer.oft_R.shape) == (1, 6)
    with torch.no_grad():
        layer.oft_R.normal_()
    r = layer.rotation().detach()
    assert r.shape == (64, 64)
    assert all(torch.equal(r[:4, :4], r[i:i + 4, i:i + 4]) for i in range(0, 64, 4))


# -- errors and options ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(r=4, oft_block_size=8), "both"),
    (dict(oft_block_size=-2), "oft_block_size must be a positive integer"),
    (dict(r=2.5), "r must be an integer"),
    (dict(oft_block_size=8, module_dropout=0.1), "module_dropout=0.1 is not supported"),
    (dict(oft_block_size=8, num_cayley_neumann_terms=0), "num_cayley_neumann_terms"),
    (dict(oft_block_size=8, eps=0), "eps must be a positive number"),
    (dict(oft_block_size=8, coft="yes"), "coft must be true or false"),
])
def test_bad_config(kw, match):
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.attach(model, OFT(target_modules=["q_proj"], **kw))


def test_default_block_size_is_peft_default():
    peft = pytest.importorskip("peft")
    assert OFT().oft_block_size == peft.OFTConfig().oft_block_size == 32 and OFT().r is None
    assert OFT(r=4).oft_block_size is None  # r alone: the block size follows from each layer


def test_block_size_not_dividing_names_layer_and_valid_sizes():
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    msg = r"q_proj: oft_block_size=12 does not divide .* 32 .*valid values: 2, 4, 8, 16, 32"
    with pytest.raises(peftkit.TargetError, match=msg):
        peftkit.attach(model, OFT(oft_block_size=12, target_modules=["q_proj"]))
    msg = r"conv1: r=5 does not divide the rotated size 27 .*3 x 3x3.*valid values: 1, 3, 9"
    with pytest.raises(peftkit.TargetError, match=msg):
        cnn, _, _ = MODELS["cnn"](0)
        peftkit.attach(cnn, OFT(r=5, target_modules=["conv1"]))
    with pytest.raises(peftkit.TargetError, match="block size 1"):
        peftkit.attach(model, OFT(r=32, target_modules=["q_proj"]))
    with pytest.raises(peftkit.TargetError, match="seq: oft does not support Conv1d"):
        cnn, _, _ = MODELS["cnn"](0)
        peftkit.attach(cnn, OFT(r=2, target_modules=["seq"]))
    assert torch.equal(_outputs(model, inputs, out), y0)  # nothing was touched


def test_adjust_to_layer_follows_peft_rule(tmp_path):
    from peft.tuners.oft.layer import OFTLayer as PeftOFTLayer

    for d in (8, 27, 32, 48, 64, 72):
        for v in range(1, d + 5):
            assert adjust_to_divisor(d, v) == PeftOFTLayer.adjust_oft_parameters(None, d, v), (d, v)
    kw = dict(oft_block_size=7, module_dropout=0.1, target_modules=["q_proj", "down_proj"])  # 7 → 8 on both
    pm, inputs, out = _peft("llama", kw)
    ref = _outputs(pm, inputs, out)
    pm.save_pretrained(tmp_path)
    base, _, _ = MODELS["llama"](0)
    with pytest.warns(UserWarning):
        peftkit.load(base, tmp_path)
    assert torch.allclose(_outputs(base, inputs, out), ref, atol=1e-5)
    assert _layer(base, "model.layers.0.mlp.down_proj").block_size == 8


def test_gpt2_conv1d_has_no_hf_form(tmp_path):
    model, _, _ = MODELS["gpt2"](0)
    peftkit.attach(model, OFT(oft_block_size=8, target_modules=["c_attn"]))
    with pytest.raises(peftkit.ConfigError, match="Conv1D"):
        peftkit.save(model, tmp_path / "a", format="hf")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_old_peft_oft_file_is_refused(tmp_path):
    pm, _, _ = _peft("llama", dict(oft_block_size=8, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    del cfg["oft_block_size"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    base, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.AdapterLoadError, match=r"peft < 0\.14"):
        peftkit.load(base, tmp_path)


def test_peftkit_format_round_trips_options(tmp_path):
    model, _, _ = MODELS["llama"](0)
    cfg = OFT(r=2, use_cayley_neumann=False, num_cayley_neumann_terms=7, block_share=True, coft=True, eps=1e-3,
              target_modules=["v_proj"], exclude_modules=["layers.1.self_attn.v_proj"])
    peftkit.attach(model, cfg)
    peftkit.save(model, tmp_path)
    fresh, _, _ = MODELS["llama"](0)
    peftkit.load(fresh, tmp_path)
    layers = peftkit.get_adapter(fresh, "default")
    assert list(layers) == ["model.layers.0.self_attn.v_proj"]
    assert next(iter(layers.values())).config.to_dict() == cfg.to_dict()
