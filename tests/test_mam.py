"""MAM / parallel adapter (He et al. 2022; peft has no MAM): the catalog's defining identity — prefix-tuned attention
equals a gated mix of plain attention and attention over the prefix — and MAM = prefix tuning + a scaled parallel
adapter on the feed-forward blocks (the same modules, the same numbers), default targets, counts and bad input."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.methods.bottleneck import Bottleneck, BottleneckLayer
from peftkit.methods.parallel_adapter import MAM
from peftkit.methods.prefix import PrefixEncoder, PrefixTuning

from .models import MODELS
from .models import outputs as _outputs


def _modules(model, name="default"):
    return peftkit.get_adapter(model, name)


def test_prefix_attention_is_a_gated_parallel_adapter():
    """Attn(q, [P_K; K], [P_V; V]) = (1 − λ) Attn(q, K, V) + λ Attn(q, P_K, P_V), λ = softmax mass on the prefix."""
    model, inputs, _ = MODELS["bert"](0)
    peftkit.attach(model, MAM(num_virtual_tokens=3, bottleneck_size=4))
    attn = model.bert.encoder.layer[0].attention.self
    seen = {}

    def grab(mod, args, kwargs, out):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["out"] = out[0]

    handle = attn.register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    h, prefixed = seen["h"], seen["out"]
    b, length, _ = h.shape
    heads, dh = attn.num_attention_heads, attn.attention_head_size
    enc = next(m for m in _modules(model).values() if isinstance(m, PrefixEncoder))
    with torch.no_grad():
        pk, pv = enc.key_values(b, torch.float32, h.device)[0]  # layer 0: (b, heads, n, dh)
        plain = attn(h, attention_mask=None)[0].reshape(b, length, heads, dh).transpose(1, 2)

        def split(t):
            return t.reshape(b, length, heads, dh).transpose(1, 2)

        q, k = split(attn.query(h)), split(attn.key(h))
        s_x = q @ k.transpose(-1, -2) / dh ** 0.5
        s_p = q @ pk.transpose(-1, -2) / dh ** 0.5
        lam = torch.sigmoid(torch.logsumexp(s_p, -1, keepdim=True) - torch.logsumexp(s_x, -1, keepdim=True))
        over_prefix = torch.softmax(s_p, -1) @ pv
        gated = ((1 - lam) * plain + lam * over_prefix).transpose(1, 2).reshape(b, length, heads * dh)
    assert 0.05 < float(lam.mean()) < 0.95  # both terms matter
    assert torch.allclose(prefixed, gated, atol=1e-5)


def test_mam_is_prefix_tuning_plus_scaled_parallel_adapter():
    model, inputs, out = MODELS["llama"](0)
    peftkit.attach(model, MAM(num_virtual_tokens=3, bottleneck_size=8, non_linearity="silu"))
    ref, _, _ = MODELS["llama"](0)
    peftkit.attach(ref, PrefixTuning(num_virtual_tokens=3), name="prefix")
    peftkit.attach(ref, Bottleneck(placement="parallel", bottleneck_size=8, scaling=4.0, non_linearity="silu"),
                   name="adapter")
    peftkit.activate(ref, ["prefix", "adapter"])
    mam = _modules(model)
    # at init the adapters add nothing: MAM = prefix tuning alone
    with torch.no_grad():
        enc = next(m for m in mam.values() if isinstance(m, PrefixEncoder))
        _modules(ref, "prefix")["model.embed_tokens"].prefix.copy_(enc.prefix)
    peftkit.activate(ref, "prefix")
    assert torch.allclose(_outputs(model, inputs, out), _outputs(ref, inputs, out), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, mod in mam.items():
            if isinstance(mod, BottleneckLayer):
                assert mod.scaling == 4.0 and mod.parallel
                twin = _modules(ref, "adapter")[path]
                for p, q in zip(mod.parameters(), twin.parameters(), strict=True):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                    q.copy_(p)
    y = _outputs(model, inputs, out)
    peftkit.activate(ref, "prefix")
    assert not torch.allclose(y, _outputs(ref, inputs, out), atol=1e-3)  # the adapters now contribute
    peftkit.activate(ref, ["prefix", "adapter"])
    assert torch.allclose(y, _outputs(ref, inputs, out), atol=1e-5)


def test_default_targets_and_parameter_count():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, MAM(num_virtual_tokens=5, bottleneck_size=6))
    paths = sorted(_modules(model))
    assert paths == ["model.embed_tokens", "model.layers.0.mlp", "model.layers.1.mlp"]
    n = sum(p.numel() for p in peftkit.adapter_parameters(model).values())
    prefix = 2 * 2 * 5 * 16  # L·2·n·d_kv (2 key/value heads of 8)
    adapter = 32 * 6 + 6 + 6 * 32 + 32  # W_down, b_down, W_up, b_up per block
    assert n == prefix + 2 * adapter


def test_default_scaling_and_prefix_length_follow_he_et_al():
    cfg = MAM()
    assert (cfg.scaling, cfg.num_virtual_tokens, cfg.placement) == (4.0, 30, "parallel")


@pytest.mark.parametrize("kw,match", [
    (dict(target_modules=["mlp"]), "exactly one target must be it"),
    (dict(target_modules=["embed_tokens"]), "needs feed-forward targets"),
    (dict(reduction_factor=2, bottleneck_size=4), "not both"),
    (dict(non_linearity="swish"), "non_linearity='swish' is not one of"),
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
])
def test_bad_input(kw, match):
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.attach(model, MAM(**kw))
    assert not peftkit.adapter_names(model)


def test_not_mergeable_names_the_parts(tmp_path):
    model, _, _ = MODELS["gpt2"](0)
    peftkit.attach(model, MAM(num_virtual_tokens=2, bottleneck_size=4))
    with pytest.raises(peftkit.NotMergeableError, match="mam"):
        peftkit.merge(model)
    with pytest.raises(peftkit.ConfigError, match="no Hugging Face PEFT form"):
        peftkit.save(model, tmp_path / "hf", format="hf")
