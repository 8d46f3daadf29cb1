"""Sparse fine-tuning: peft has none, so the defining properties.

A fixed set of ``round(density · numel)`` entries per weight is trained (indices + values),
chosen by magnitude, at random (seeded) or by FISH (Sung et al., 2021: largest accumulated
squared gradients); merging adds the values at the indices exactly; only the selected
entries get gradients; the saved file holds indices and values only.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit.core.model import iter_sites
from peftkit.core.site import AdapterSite
from peftkit.methods.sparse import SparseFT, fish_scores

from .models import MODELS


def untouched(model) -> bool:
    return not any(isinstance(m, AdapterSite) for m in model.modules())


def randomize(model, name: str | None = None, seed: int = 0, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def weights_of(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)}


class Small(nn.Module):
    def __init__(self, out: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(8, out)
        self.head = nn.Linear(out, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


def test_number_of_entries_per_layer():
    model = MODELS["llama"](0)[0]
    w = weights_of(model)
    peftkit.attach(model, SparseFT(density=0.05, target_modules=["q_proj", "k_proj", "down_proj", "embed_tokens"]))
    mods = peftkit.get_adapter(model, "default")
    assert len(mods) == 7
    for path, mod in mods.items():
        numel = w[path].numel()
        assert mod.indices.dtype == torch.int64 and mod.indices.shape == mod.values.shape
        assert mod.values.numel() == round(0.05 * numel)
    # q_proj 32x32 -> round(51.2) = 51; k_proj 16x32 -> round(25.6) = 26; embed 96x32 -> round(153.6) = 154
    assert mods["model.layers.0.self_attn.q_proj"].values.numel() == 51
    assert mods["model.layers.0.self_attn.k_proj"].values.numel() == 26
    assert mods["model.embed_tokens"].values.numel() == 154
    # a tiny density still trains one entry per layer; density 1 trains them all
    m2 = MODELS["llama"](0)[0]
    peftkit.attach(m2, SparseFT(density=1e-9, target_modules=["q_proj"]))
    assert all(m.values.numel() == 1 for m in peftkit.get_adapter(m2, "default").values())
    m3 = Small()
    peftkit.attach(m3, SparseFT(density=1.0, target_modules=["fc"]))
    assert torch.equal(m3.fc.adapters["default"].indices, torch.arange(128))


def test_state_is_exactly_indices_and_values():
    model = MODELS["gpt2"](0)[0]
    peftkit.attach(model, SparseFT(density=0.1, target_modules=["c_fc"]))
    mod = model.transformer.h[0].mlp.c_fc.adapters["default"]
    assert set(mod.state_dict()) == {"indices", "values"}
    assert [n for n, _ in mod.named_parameters()] == ["values"]
    assert not mod.values.any()
    idx = mod.indices
    assert bool((idx[1:] > idx[:-1]).all())  # sorted, unique
    assert int(idx.min()) >= 0 and int(idx.max()) < mod.numel


def test_magnitude_picks_the_largest_entries():
    model = MODELS["gpt2"](0)[0]
    w = weights_of(model)
    peftkit.attach(model, SparseFT(density=0.1, selection="magnitude", target_modules=["c_attn", "c_proj"]))
    for path, mod in peftkit.get_adapter(model, "default").items():
        a = w[path].abs().reshape(-1)
        chosen = torch.zeros(a.numel(), dtype=torch.bool)
        chosen[mod.indices] = True
        assert a[chosen].min() >= a[~chosen].max(), path
        assert torch.equal(mod.indices, torch.topk(a, mod.indices.numel()).indices.sort().values)


def _indices(model) -> dict[str, torch.Tensor]:
    return {p: m.indices.clone() for p, m in peftkit.get_adapter(model, "default").items()}


def test_random_selection_is_reproducible_and_seed_dependent():
    def pick(seed):
        m = MODELS["bert"](0)[0]
        peftkit.attach(m, SparseFT(density=0.1, selection="random", seed=seed, target_modules=["query", "value"]))
        return _indices(m)

    a, a2, b = pick(1), pick(1), pick(2)
    assert all(torch.equal(a[k], a2[k]) for k in a)
    assert all(not torch.equal(a[k], b[k]) for k in a)
    # layers of the same shape get different subsets
    assert not torch.equal(a["bert.encoder.layer.0.attention.self.query"], a["bert.encoder.layer.0.attention.self.value"])
    # and the choice is not the magnitude one
    m = MODELS["bert"](0)[0]
    peftkit.attach(m, SparseFT(density=0.1, selection="magnitude", target_modules=["query", "value"]))
    assert not all(torch.equal(a[k], v) for k, v in _indices(m).items())


def _batches():
    ids = MODELS["llama"](0)[1]["input_ids"]
    return [{"input_ids": ids[i:i + 1], "labels": ids[i:i + 1]} for i in range(3)]


def test_fish_scores_are_accumulated_squared_gradients():
    model = MODELS["llama"](0)[0]
    grads_before = [p.grad for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    scores = fish_scores(model, _batches(), target_modules=["q_proj", "up_proj"])
    assert list(scores) == [f"model.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.q_proj", "mlp.up_proj")]
    assert [p.grad for p in model.parameters()] == grads_before
    assert [p.requires_grad for p in model.parameters()] == flags
    # direct computation: one backward per batch, square, sum
    ref = MODELS["llama"](0)[0]
    acc = {n: torch.zeros_like(ref.get_submodule(n).weight) for n in scores}
    for batch in _batches():
        ref.zero_grad()
        ref(**batch).loss.backward()
        for n in acc:
            acc[n] += ref.get_submodule(n).weight.grad ** 2
    for n in scores:
        assert torch.allclose(scores[n], acc[n], rtol=1e-5, atol=1e-12), n
        assert scores[n].abs().sum() > 0
    # the FISH mask: the top-k accumulated squared gradients of each layer
    peftkit.attach(model, SparseFT(density=0.1, selection="fish", scores=scores, target_modules=["q_proj", "up_proj"]))
    for path, mod in peftkit.get_adapter(model, "default").items():
        k = round(0.1 * acc[path].numel())
        assert torch.equal(mod.indices, torch.topk(acc[path].reshape(-1), k).indices.sort().values)
        chosen = torch.zeros(acc[path].numel(), dtype=torch.bool)
        chosen[mod.indices] = True
        assert acc[path].reshape(-1)[chosen].min() >= acc[path].reshape(-1)[~chosen].max()
    # and differs from the magnitude mask
    m2 = MODELS["llama"](0)[0]
    peftkit.attach(m2, SparseFT(density=0.1, target_modules=["q_proj", "up_proj"]))
    assert not all(torch.equal(v, _indices(model)[k]) for k, v in _indices(m2).items())


def test_fish_scores_with_custom_loss():
    model = Small()
    x = torch.randn(4, 8)
    scores = fish_scores(model, [x[:2], x[2:]], loss_fn=lambda m, b: m(b).pow(2).sum(), target_modules=["fc"])
    ref = Small()
    ref.load_state_dict(model.state_dict())
    g = sum(torch.autograd.grad(ref(b).pow(2).sum(), ref.fc.weight)[0] ** 2 for b in (x[:2], x[2:]))
    assert torch.allclose(scores["fc"], g)


def test_merge_is_exact_and_unmerge_restores():
    model, inputs, out = MODELS["cnn"](0)
    w0 = weights_of(model)
    peftkit.attach(model, SparseFT(density=0.2, selection="random", target_modules=["conv1", "seq", "fc"]))
    randomize(model, std=0.5)
    with torch.no_grad():
        y = out(model(**inputs))
    peftkit.merge(model)
    for path, mod in peftkit.get_adapter(model, "default").items():
        merged = model.get_submodule(path).base.weight.detach().reshape(-1)
        ref = w0[path].reshape(-1)
        touched = torch.zeros(ref.numel(), dtype=torch.bool)
        touched[mod.indices] = True
        assert torch.equal(merged[mod.indices], ref[mod.indices] + mod.values.detach())  # bitwise
        assert torch.equal(merged[~touched], ref[~touched])  # untouched elsewhere
        assert torch.equal(mod.delta_weight(model.get_submodule(path).base).reshape(-1)[~touched],
                           torch.zeros(int((~touched).sum())))
    with torch.no_grad():
        assert torch.allclose(out(model(**inputs)), y, atol=1e-5)
    peftkit.unmerge(model)
    for path in peftkit.get_adapter(model, "default"):
        assert torch.allclose(model.get_submodule(path).base.weight, w0[path], atol=1e-6)


def test_gradients_reach_only_the_selected_entries():
    model, inputs, out = MODELS["gpt2"](0)
    full, _, _ = MODELS["gpt2"](0)
    peftkit.attach(model, SparseFT(density=0.1, target_modules=["c_attn", "mlp.c_proj"]))
    randomize(model)
    # full fine-tuning of the same effective weights, for the reference gradient
    with torch.no_grad():
        for path, mod in peftkit.get_adapter(model, "default").items():
            w = full.get_submodule(path).weight
            w.view(-1)[mod.indices] += mod.values
    model.train(), full.train()
    torch.manual_seed(0)
    out(model(**inputs)).pow(2).mean().backward()
    torch.manual_seed(0)
    out(full(**inputs)).pow(2).mean().backward()
    for path, mod in peftkit.get_adapter(model, "default").items():
        g_full = full.get_submodule(path).weight.grad.reshape(-1)
        assert torch.allclose(mod.values.grad, g_full[mod.indices], rtol=1e-4, atol=1e-7), path
        assert model.get_submodule(path).base.weight.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)


def test_training_never_modifies_the_frozen_weight():
    model, inputs, out = MODELS["llama"](0)
    w0 = weights_of(model)
    peftkit.attach(model, SparseFT(density=0.05, target_modules="all-linear"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        out(model(**inputs)).pow(2).mean().backward()
        opt.step()
    for path, mod in peftkit.get_adapter(model, "default").items():
        assert torch.equal(model.get_submodule(path).base.weight, w0[path])
        assert mod.values.abs().sum() > 0


def test_two_sparse_adapters_stack():
    model, inputs, _ = MODELS["cnn"](0)
    peftkit.attach(model, SparseFT(density=0.3, selection="random", seed=1, target_modules=["fc"]), name="a")
    peftkit.attach(model, SparseFT(density=0.3, selection="random", seed=2, target_modules=["fc"]), name="b")
    randomize(model, seed=4)
    peftkit.activate(model, ["a", "b"])
    with torch.no_grad():
        y = model(**inputs)
        a, b = model.fc.adapters["a"], model.fc.adapters["b"]
        w = model.fc.base.weight.detach().clone().reshape(-1)
        w.index_add_(0, a.indices, a.values)
        w.index_add_(0, b.indices, b.values)
        h = torch.relu(model.norm(model.conv1(inputs["x"])))
        h = torch.relu(model.conv2(h))
        h = model.seq(h.flatten(2)).mean(-1)
        ref = model.head(torch.relu(nn.functional.linear(h, w.view(16, 8), model.fc.base.bias)))
    assert torch.allclose(y, ref, atol=1e-6)


def test_saved_file_holds_indices_and_values_only(tmp_path):
    model = MODELS["llama"](0)[0]
    peftkit.attach(model, SparseFT(density=0.01, target_modules="all-linear"))
    randomize(model)
    peftkit.save(model, tmp_path / "s")
    tensors = load_file(str(tmp_path / "s" / "adapter.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"indices", "values"}
    k = sum(t.numel() for n, t in tensors.items() if n.endswith(".values"))
    numels = [site.base.weight.numel() for _, site in iter_sites(model)]
    assert len(numels) == 14
    assert k == sum(round(0.01 * n) for n in numels)
    dense = sum(numels)
    size = (tmp_path / "s" / "adapter.safetensors").stat().st_size
    assert size < 12 * k + 8192  # 8-byte index + 4-byte value per entry, plus the header
    assert size < dense * 4 / 10  # well under a tenth of the dense fp32 weights (mostly the JSON header here)


def test_fish_adapter_saves_without_scores_and_loads_from_indices(tmp_path):
    model, inputs, out = MODELS["llama"](0)
    scores = fish_scores(model, _batches(), target_modules=["o_proj"])
    cfg = SparseFT(density=0.1, selection="fish", scores=scores, target_modules=["o_proj"])
    assert "scores" not in cfg.to_dict() and "scores" not in repr(cfg)
    peftkit.attach(model, cfg)
    randomize(model)
    with torch.no_grad():
        y = out(model(**inputs))
    peftkit.save(model, tmp_path / "f")
    meta = json.loads((tmp_path / "f" / "peftkit_adapter.json").read_text())
    assert meta["config"]["selection"] == "fish" and "scores" not in meta["config"]
    fresh = MODELS["llama"](0)[0]
    peftkit.load(fresh, tmp_path / "f")
    with torch.no_grad():
        assert torch.allclose(out(fresh(**inputs)), y, atol=1e-6)
    assert all(torch.equal(a.indices, b.indices) for a, b in
               zip(peftkit.get_adapter(fresh, "default").values(), peftkit.get_adapter(model, "default").values(), strict=True))


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(density=0), r"density must be in \(0, 1\], got 0"),
    (dict(density=1.5), r"density must be in \(0, 1\], got 1.5"),
    (dict(selection="magnitud"), r"selection='magnitud' is not one of .*did you mean 'magnitude'"),
    (dict(selection="fish"), "selection='fish' needs scores; compute them with .*fish_scores"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_bad_options(kw, msg):
    m = MODELS["llama"](0)[0]
    with pytest.raises(peftkit.ConfigError, match=msg):
        peftkit.attach(m, SparseFT(target_modules=["q_proj"], **kw))
    assert untouched(m)


def test_fish_scores_must_cover_every_target():
    m = MODELS["llama"](0)[0]
    scores = fish_scores(m, _batches()[:1], target_modules=["q_proj"])
    with pytest.raises(peftkit.TargetError, match=r"v_proj: no FISH score for this module"):
        peftkit.attach(m, SparseFT(selection="fish", scores=scores, target_modules=["q_proj", "v_proj"]))
    assert untouched(m)
    with pytest.raises(peftkit.ConfigError, match="batches is empty"):
        fish_scores(m, [], target_modules=["q_proj"])
    with pytest.raises(peftkit.ConfigError, match=r"returned no \.loss"):
        fish_scores(m, [{"input_ids": _batches()[0]["input_ids"]}], target_modules=["q_proj"])


def test_unsupported_layer():
    m = MODELS["llama"](0)[0]
    with pytest.raises(peftkit.TargetError, match="sparse does not support LlamaRMSNorm"):
        peftkit.attach(m, SparseFT(target_modules=["q_proj", "input_layernorm"]))
    assert untouched(m)


def test_load_onto_a_wrong_shape_fails_naming_the_tensor(tmp_path):
    src = Small(out=16)
    peftkit.attach(src, SparseFT(density=0.25, target_modules=["fc"]))
    peftkit.save(src, tmp_path / "a")
    other = Small(out=12)
    msg = r"tensor fc.indices has shape \(32,\) in the file but the model needs \(24,\)"
    with pytest.raises(peftkit.AdapterLoadError, match=msg):
        peftkit.load(other, tmp_path / "a")
    assert untouched(other)


@pytest.mark.parametrize("bad,msg", [
    (lambda i: i + 1000, r"tensor fc.indices holds position \d+ but the weight has 128 entries"),
    (lambda i: i - 1000, r"tensor fc.indices holds position -\d+ but the weight has 128 entries"),
    (lambda i: i.flip(0), "tensor fc.indices must be sorted and free of duplicates"),
    (lambda i: torch.zeros_like(i), "tensor fc.indices must be sorted and free of duplicates"),
])
def test_load_checks_indices(tmp_path, bad, msg):
    src = Small()
    peftkit.attach(src, SparseFT(density=0.25, target_modules=["fc"]))
    peftkit.save(src, tmp_path / "a")
    f = tmp_path / "a" / "adapter.safetensors"
    t = load_file(str(f))
    t["fc.indices"] = bad(t["fc.indices"]).contiguous()
    save_file(t, str(f))
    fresh = Small()
    with pytest.raises(peftkit.AdapterLoadError, match=msg):
        peftkit.load(fresh, tmp_path / "a")
    assert untouched(fresh)
