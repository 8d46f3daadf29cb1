"""DoRA math against peft (forward, gradients, files both ways) and its defining properties."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftkit
from peftkit.methods.dora import DoRA, DoRALayer

from .models import MODELS
from .models import outputs as _outputs

PEFT_CASES = [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"],
                   rank_pattern={"k_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 5})),
    ("gpt2", dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"])),
    ("bert", dict(r=4, lora_alpha=16, target_modules=["query", "value", "output.dense"])),
]
IDS = [f"{a}-{i}" for i, (a, _) in enumerate(PEFT_CASES)]


def _ours_config(kw) -> DoRA:
    return DoRA(r=kw["r"], alpha=kw["lora_alpha"], use_rslora=kw.get("use_rslora", False), target_modules=kw["target_modules"],
                rank_pattern=kw.get("rank_pattern", {}), alpha_pattern=kw.get("alpha_pattern", {}),
                dropout=kw.get("lora_dropout", 0.0))


def _peft_key(name: str) -> str:
    path, leaf = name.split(".adapters.default.")
    return f"base_model.model.{path}.{leaf}.default.weight"


def _twins(arch, kw, seed=0):
    """A peft DoRA model with random factors and a peftkit DoRA model holding the same tensors."""
    model, inputs, out = MODELS[arch](seed)
    torch.manual_seed(seed + 10)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, use_dora=True, **kw))
    ours, _, _ = MODELS[arch](seed)
    peftkit.attach(ours, _ours_config(kw))
    theirs = dict(pm.named_parameters())
    mine = peftkit.adapter_parameters(ours)
    assert len(mine) == sum(p.requires_grad for p in pm.parameters())
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(theirs[_peft_key(n)])
            if n.endswith("lora_magnitude_vector"):
                p.mul_(1.0 + 0.1 * torch.randn_like(p))  # move m away from its init so it matters
                theirs[_peft_key(n)].copy_(p)
    return pm, ours, inputs, out, mine, theirs


@pytest.mark.parametrize("arch,kw", [PEFT_CASES[0], PEFT_CASES[2], PEFT_CASES[3]], ids=["llama", "gpt2", "bert"])
def test_gradients_equal_peft(arch, kw):
    pm, ours, inputs, out, mine, theirs = _twins(arch, kw)
    for m in (pm, ours):
        m.eval()  # no dropout in the tiny models
        out(m(**inputs)).pow(2).mean().backward()
    kinds = set()
    for n, p in mine.items():
        ref = theirs[_peft_key(n)].grad
        assert ref is not None and p.grad is not None, n
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-7), n
        kinds.add(n.rsplit(".", 1)[-1])
    assert kinds == {"lora_A", "lora_B", "lora_magnitude_vector"}


def test_training_dropout_matches_peft():
    """With dropout active peft runs ``(g − 1) W dropout(x)``; same RNG stream gives the same output and gradients."""
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"])
    pm, ours, inputs, out, mine, theirs = _twins("llama", kw)
    results = []
    for m in (pm, ours):
        m.train()
        torch.manual_seed(123)
        y = out(m(**inputs))
        y.pow(2).mean().backward()
        results.append(y.detach())
    assert torch.allclose(results[1], results[0], atol=1e-5, rtol=1e-4)
    for n, p in mine.items():
        assert torch.allclose(p.grad, theirs[_peft_key(n)].grad, rtol=1e-4, atol=1e-7), n


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_same_forward_as_peft_and_peft_file_loads(arch, kw, tmp_path):
    pm, ours, inputs, out, _, _ = _twins(arch, kw)
    pm.eval()
    ref = _outputs(pm, inputs, out)
    base, _, _ = MODELS[arch](0)
    assert not torch.allclose(ref, _outputs(base, inputs, out), atol=1e-3)  # the adapter does something
    assert torch.allclose(_outputs(ours, inputs, out), ref, atol=1e-5, rtol=1e-4)  # same tensors, same forward
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    peftkit.load(base, tmp_path)
    mods = peftkit.get_adapter(base, "default")
    assert all(isinstance(m, DoRALayer) for m in mods.values())
    assert torch.allclose(_outputs(base, inputs, out), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,kw", PEFT_CASES, ids=IDS)
def test_peftkit_hf_export_loads_in_peft(arch, kw, tmp_path):
    model, inputs, out = MODELS[arch](0)
    peftkit.attach(model, _ours_config(kw))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.2)
    ours = _outputs(model, inputs, out)
    peftkit.save(model, tmp_path, format="hf")
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert hf["peft_type"] == "LORA" and hf["use_dora"] is True
    base, _, _ = MODELS[arch](0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(_outputs(pm, inputs, out), ours, atol=1e-4, rtol=1e-4)


def test_pissa_export_loads_in_peft(tmp_path):
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, DoRA(r=4, alpha=8, init="pissa", target_modules=["q_proj", "up_proj"]))
    torch.manual_seed(4)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    ours = _outputs(model, inputs, out)
    peftkit.save(model, tmp_path, format="hf")
    base, _, _ = MODELS["llama"](0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(_outputs(pm, inputs, out), ours, atol=1e-4, rtol=1e-4)


def _one_layer(arch="llama", target="layers.0.mlp.down_proj", **kw) -> tuple[torch.nn.Module, DoRALayer, object]:
    model, _, _ = MODELS[arch](0)
    peftkit.attach(model, DoRA(target_modules=[target], **{"r": 4, "alpha": 8, **kw}))
    (path, layer), = peftkit.get_adapter(model, "default").items()
    return model, layer, model.get_submodule(path)


@pytest.mark.parametrize("arch,target", [("llama", "layers.0.mlp.down_proj"), ("gpt2", "h.0.attn.c_attn")])
def test_fast_norm_equals_dense_norm_float64(arch, target):
    model, layer, site = _one_layer(arch, target)
    model.double()
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_(0, 0.5)
    w = layer.matrix(site.base)
    dense = torch.linalg.vector_norm(w + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    assert layer.lora_A.dtype == torch.float64
    assert torch.allclose(layer.weight_norm(site.base, site), dense, rtol=1e-12, atol=1e-12)
    assert torch.allclose(layer.weight_norm(site.base), layer.dense_weight_norm(site.base), rtol=1e-12)


def test_norm_never_negative_under_cancellation():
    _, layer, site = _one_layer()
    with torch.no_grad():  # B A = −W/s on the first rows: the exact norm is 0 there
        w = layer.matrix(site.base)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        layer.lora_A.copy_(vh[:4])
        layer.lora_B.copy_(-(u[:, :4] * s[:4]) / layer.scaling)
        site.base.weight.copy_(u[:, :4] @ torch.diag(s[:4]) @ vh[:4])
    n = layer.weight_norm(site.base, site)
    assert torch.isfinite(n).all() and (n >= 0).all() and n.max() < 1e-3


def test_identity_at_init_and_magnitude_is_weight_norm():
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    w = model.model.layers[1].self_attn.v_proj.weight.detach().clone()
    peftkit.attach(model, DoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    layer = peftkit.get_adapter(model, "default")["model.layers.1.self_attn.v_proj"]
    assert torch.allclose(layer.lora_magnitude_vector, w.norm(dim=1), rtol=1e-6)
    assert torch.allclose(_outputs(model, inputs, out), y0, atol=1e-6)


def test_merged_rows_have_norm_m_and_merge_equals_unmerged():
    model, inputs, out = MODELS["gpt2"](0)
    peftkit.attach(model, DoRA(r=4, alpha=8, target_modules=["c_attn", "c_fc"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peftkit.adapter_parameters(model).items():
            if n.endswith("lora_magnitude_vector"):
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
            else:
                p.add_(torch.randn_like(p) * 0.2)
    y = _outputs(model, inputs, out)
    originals = {p: s.base.weight.detach().clone() for p, s in peftkit.core.model.iter_sites(model)}
    peftkit.merge(model)
    for path, site in peftkit.core.model.iter_sites(model):
        layer = site.adapters["default"]
        rows = layer.matrix(site.base).norm(dim=1)  # Conv1D: rows of the (out, in) view
        assert torch.allclose(rows, layer.lora_magnitude_vector, rtol=1e-5), path
    assert torch.allclose(_outputs(model, inputs, out), y, atol=1e-5)
    peftkit.unmerge(model)
    for path, site in peftkit.core.model.iter_sites(model):
        assert torch.allclose(site.base.weight, originals[path], atol=1e-6), path
    assert torch.allclose(_outputs(model, inputs, out), y, atol=1e-5)


def test_cached_base_norm_follows_the_base_weight():
    """Merging another adapter, editing the weight in place, or .to() recompute ‖W‖²."""
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, DoRA(r=4, alpha=8, target_modules=["q_proj"]), name="d")
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=["q_proj"]), name="l")
    torch.manual_seed(2)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.3)
    site = model.model.layers[0].self_attn.q_proj
    layer = site.adapters["d"]
    peftkit.activate(model, "d")

    def check():
        _outputs(model, inputs, out)  # fills the cache
        assert torch.allclose(layer.weight_norm(site.base, site), layer.dense_weight_norm(site.base), rtol=1e-5)

    check()
    peftkit.merge(model, "l")  # changes W through .data; the site's merged list changes
    check()
    peftkit.unmerge(model)
    check()
    with torch.no_grad():
        site.base.weight.mul_(1.5)  # in-place edit bumps the version counter
    check()
    model.double()
    check()
    assert layer._w_sq.dtype == torch.float64


def test_stacked_with_lora_is_additive_on_base_output():
    """Stacked after LoRA, DoRA's change is computed from the pure base output (rows equal their sum)."""
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=["v_proj"]), name="l")
    peftkit.attach(model, DoRA(r=4, alpha=8, target_modules=["v_proj"]), name="d")
    torch.manual_seed(5)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.3)
    site = model.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        base = site.base(x)
        peftkit.activate(model, "l")
        dl = site(x) - base
        peftkit.activate(model, "d")
        dd = site(x) - base
        peftkit.activate(model, ["l", "d"])
        both = site(x)
    assert torch.allclose(both, base + dl + dd, atol=1e-5)


def test_mixed_batch_does_not_use_lora_gathered_path():
    assert DoRALayer.gathered_output is None


def test_refuses_convolutions_and_embeddings():
    model, _, _ = MODELS["cnn"](0)
    with pytest.raises(peftkit.TargetError, match=r"conv1: dora supports only nn.Linear.*Conv2d"):
        peftkit.attach(model, DoRA(target_modules=["conv1", "fc"]))
    assert not any(isinstance(m, peftkit.core.site.AdapterSite) for m in model.modules())
    llama, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.TargetError, match="Embedding"):
        peftkit.attach(llama, DoRA(target_modules=["embed_tokens"]))


def test_bad_options():
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match="r must be a positive integer"):
        peftkit.attach(model, DoRA(r=0, target_modules=["q_proj"]))
    with pytest.raises(peftkit.ConfigError, match="dropout"):
        peftkit.attach(model, DoRA(dropout=1.5, target_modules=["q_proj"]))
    with pytest.raises(peftkit.TargetError, match="rank 64 is larger"):
        peftkit.attach(model, DoRA(r=64, target_modules=["q_proj"]))


def test_lora_file_is_not_read_as_dora_and_back(tmp_path):
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, peftkit.LoRA(r=4, target_modules=["q_proj"]), name="l")
    peftkit.attach(model, DoRA(r=4, target_modules=["q_proj"]), name="d")
    peftkit.save(model, tmp_path / "l", name="l", format="hf")
    peftkit.save(model, tmp_path / "d", name="d", format="hf")
    fresh, _, _ = MODELS["llama"](0)
    peftkit.load(fresh, tmp_path / "l", name="l")
    peftkit.load(fresh, tmp_path / "d", name="d")
    assert type(peftkit.get_adapter(fresh, "l")["model.layers.0.self_attn.q_proj"]).__name__ == "LoRALayer"
    assert isinstance(peftkit.get_adapter(fresh, "d")["model.layers.0.self_attn.q_proj"], DoRALayer)


def test_saved_state_holds_no_cache():
    model, layer, site = _one_layer()
    x = torch.randn(2, 64)
    site(x)
    peftkit.merge(model)
    assert layer._w_sq is not None or layer._merge_norm is not None
    assert set(layer.state_dict()) == {"lora_A", "lora_B", "lora_magnitude_vector"}
