"""MEFT (reversible adapters): the start point, the exact inverse, gradients equal to ordinary autograd,
activation bytes that do not grow with depth, and the refusals. peft has no MEFT, so these are the
paper's defining properties."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.methods.meft import MEFT, exact_layers, reconstruction_error

from .models import tiny_bert, tiny_gpt2, tiny_llama

FACTORIES = {"llama": tiny_llama, "bert": tiny_bert}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def perturb(model, scale: float = 0.1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _scales(variant: int, s: float) -> dict[str, float]:
    """The scale(s) that decide the start point: λ (MEFT1), β (MEFT2), both (MEFT3)."""
    return {1: {"lam": s}, 2: {"beta": s}, 3: {"lam": s, "beta": s}}[variant]


def outputs(model, inputs, out) -> torch.Tensor:
    with torch.no_grad():
        return out(model(**inputs))


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_start_is_the_plm_up_to_the_scaled_skip(family, variant):
    """At init the adapters are zero and the output is the PLM plus an O(λ) (MEFT2: O(β), MEFT3: both) skip term:
    the distance to the PLM falls linearly with the scale and vanishes as it goes to 0."""
    model, inputs, out = FACTORIES[family]()
    model.double()
    y0 = outputs(model, inputs, out)
    errs = []
    for s in (2.0**-6, 2.0**-8, 2.0**-20):
        scale = _scales(variant, s)
        peftkit.attach(model, MEFT(variant=variant, **scale), name="m")
        errs.append(rel(outputs(model, inputs, out), y0))
        with peftkit.disabled(model):
            assert torch.equal(outputs(model, inputs, out), y0)  # disabled: exactly the PLM
        peftkit.delete(model, "m")
    assert 3.5 < errs[0] / errs[1] < 4.5, errs  # linear in the scale
    assert errs[2] < 1e-5, errs
    assert torch.equal(outputs(model, inputs, out), y0)  # deleted: exactly the PLM again


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_inverse_rebuilds_the_input(family, variant):
    """float64 streams with a power-of-two scale rebuild the embeddings bit for bit from the final
    streams, also with trained (non-zero) adapters; float32 streams to ~1e-5 (MEFT3 ~1e-3); a float64 model with the
    paper's 0.1 to float64 precision."""
    model, inputs, _out = FACTORIES[family]()
    peftkit.attach(model, MEFT(variant=variant), name="exact")
    perturb(model)
    assert reconstruction_error(model, inputs) == 0.0
    peftkit.attach(model, MEFT(variant=variant, stream_dtype="float32"), name="f32")
    perturb(model, seed=2)
    # float32 rounding times 1/λ (MEFT3: 1/(λβ) = 64) per layer
    assert reconstruction_error(model, inputs) < (1e-2 if variant == 3 else 1e-4)
    model.double()
    scale = _scales(variant, 0.1)
    peftkit.attach(model, MEFT(variant=variant, **scale), name="f64")
    perturb(model, seed=3)
    assert reconstruction_error(model, inputs) < 1e-10  # float64 rounding times 1/0.1 (MEFT3: 1/0.01) per layer


def _grads(model, inputs, out, reversible: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
    for m in model.modules():
        if type(m).__name__ == "MEFTLayer":
            m.config.reversible_layers = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    out(model(**inputs)).pow(2).mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("variant", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_equal_ordinary_autograd(family, variant, dtype):
    """The reversible backward (activations rebuilt, nothing cached) gives the gradients of ordinary autograd
    through the same coupling: adapter parameters, a LoRA inside the layers and a LoRA on the input embedding
    (its gradient flows through the rebuilt ∂L/∂h₀). BERT runs in training mode: dropout is replayed."""
    model, inputs, out = FACTORIES[family]()
    model.to(dtype)
    emb = "embed_tokens" if family == "llama" else "word_embeddings"
    inner = "q_proj" if family == "llama" else "query"
    peftkit.attach(model, peftkit.LoRA(r=2, target_modules=[emb, inner]), name="lora")
    peftkit.attach(model, MEFT(variant=variant, bottleneck_size=4), name="meft")
    peftkit.set_trainable(model, ["lora", "meft"])
    peftkit.activate(model, ["lora", "meft"])
    perturb(model)
    model.train()
    rev = _grads(model, inputs, out, None)
    plain = _grads(model, inputs, out, 0)
    assert rev.keys() == plain.keys()
    assert any(".lora" in k or "lora" in k for k in rev) and any("layer_adapter" in k for k in rev)
    assert any(emb in k for k in rev)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for k in rev:
        assert rel(rev[k], plain[k]) <= tol, k


def _saved_bytes(model, inputs, out) -> int:
    seen: dict[tuple[int, int], int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = out(model(**inputs)).pow(2).mean()
    loss.backward()
    return sum(seen.values())


def test_saved_activations_do_not_grow_with_depth():
    """The reversible stack keeps its two final streams whatever the depth; ordinary autograd keeps every layer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {}
    for layers in (2, 6):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
        inputs = {"input_ids": ids}
        peftkit.attach(model, MEFT(), name="rev")
        rev = _saved_bytes(model, inputs, lambda r: r.logits)
        peftkit.attach(model, MEFT(reversible_layers=0), name="plain")
        sizes[layers] = (rev, _saved_bytes(model, inputs, lambda r: r.logits))
    assert sizes[2][0] == sizes[6][0]  # constant in depth
    assert sizes[6][1] > sizes[2][1] > sizes[2][0]
    assert sizes[6][1] - sizes[2][1] > 4 * 2 * 16 * 32 * 4 * 4  # at least a few hidden-sized tensors per layer


def test_exact_layers_budget():
    """``reversible_layers=None``: the layers whose inputs the streams rebuild exactly."""
    model, _inputs, _out = tiny_llama()
    peftkit.attach(model, MEFT())
    stack = model.model.layers
    couplings = list(range(30))  # only the count is read
    assert exact_layers(MEFT(lam=0.125), couplings, torch.float64, stack) == 9  # (53 − 24 − 2) / 3
    assert exact_layers(MEFT(lam=0.5), couplings, torch.float64, stack) == 27
    assert exact_layers(MEFT(lam=0.125), couplings[:6], torch.float64, stack) == 6
    assert exact_layers(MEFT(lam=1.0), couplings, torch.float32, stack) == 30
    assert exact_layers(MEFT(variant=2, beta=0.25), couplings, torch.float32, stack) == 0


def test_generation_with_cache_matches_without():
    model, inputs, _out = tiny_llama()
    peftkit.attach(model, MEFT())
    perturb(model)
    ids = inputs["input_ids"][:2]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = model.generate(ids, use_cache=True, **kw)
        b = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_config_is_saved_resolved(tmp_path):
    model, inputs, out = tiny_llama()
    peftkit.attach(model, MEFT(variant=2))
    perturb(model)
    y = outputs(model, inputs, out)
    peftkit.save(model, tmp_path / "a")
    fresh, _, _ = tiny_llama()
    peftkit.load(fresh, tmp_path / "a")
    cfg = fresh.model.layers[0].adapters["default"].config
    assert torch.equal(outputs(fresh, inputs, out), y)
    assert (cfg.lam, cfg.beta, cfg.non_linearity, cfg.stream_dtype) == (1.0, 0.125, "silu", "float64")


def test_refusals():
    model, inputs, _out = tiny_llama()
    with pytest.raises(peftkit.ConfigError, match=r"variant=4 is not 1 .* or 3 \(MEFT3"):
        peftkit.attach(model, MEFT(variant=4))
    with pytest.raises(peftkit.ConfigError, match="lam must be a finite non-zero"):
        peftkit.attach(model, MEFT(lam=0.0))
    with pytest.raises(peftkit.ConfigError, match="did you mean 'gelu'"):
        peftkit.attach(model, MEFT(non_linearity="gelu2"))
    with pytest.raises(peftkit.TargetError, match=r"all 2 layers of model\.layers; missing: model\.layers\.1"):
        peftkit.attach(model, MEFT(target_modules=["model.layers.0"]))
    with pytest.raises(peftkit.TargetError, match="reversible_layers=3 exceeds the 2 layers"):
        peftkit.attach(model, MEFT(reversible_layers=3))
    gpt2, _, _ = tiny_gpt2()
    with pytest.raises(peftkit.TargetError, match=r"supports the model types llama \(LlamaDecoderLayer\), bert.*'gpt2'"):
        peftkit.attach(gpt2, MEFT())
    assert peftkit.adapter_names(model) == [] and peftkit.adapter_names(gpt2) == []  # nothing was touched

    peftkit.attach(model, MEFT(), name="a")
    with pytest.raises(peftkit.NotMergeableError, match="MEFT"):
        peftkit.merge(model)
    with pytest.raises(peftkit.PeftkitError, match="mixed batch"):
        with peftkit.mixed_batch(model, ["a", None, "a", None]):
            model(**inputs)
    with pytest.raises(peftkit.PeftkitError, match="layer 1 was called on its own"):
        model.model.layers[1](torch.zeros(1, 3, 32))
    peftkit.attach(model, MEFT(), name="b")
    peftkit.activate(model, ["a", "b"])
    with pytest.raises(peftkit.PeftkitError, match="one MEFT adapter at a time"):
        model(**inputs)


def test_partly_reversible_stack_gives_the_same_gradients():
    """The lowest layers reversible and the rest with ordinary autograd (``reversible_layers=3`` of 6) gives
    the gradients of the all-ordinary run, and keeps fewer bytes than it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs, out = {"input_ids": ids}, (lambda r: r.logits)
    peftkit.attach(model, MEFT(variant=2, bottleneck_size=4))
    perturb(model)
    part = _grads(model, inputs, out, 3)
    plain = _grads(model, inputs, out, 0)
    assert part.keys() == plain.keys() and len(part) == 6 * 8
    for k in part:
        assert rel(part[k], plain[k]) <= 1e-5, k
    sizes = {}
    for k in (0, 3, 6):
        for m in model.modules():
            if type(m).__name__ == "MEFTLayer":
                m.config.reversible_layers = k
        sizes[k] = _saved_bytes(model, inputs, out)
    assert sizes[0] > sizes[3] > sizes[6]


def test_training_through_a_filled_cache_is_refused():
    from transformers import DynamicCache

    model, inputs, _out = tiny_llama()
    peftkit.attach(model, MEFT())
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() > 0
    ids = inputs["input_ids"][:, :1]
    with pytest.raises(peftkit.PeftkitError, match="KV cache that already holds tokens"):
        model(input_ids=ids, past_key_values=cache, use_cache=True)


def test_inexact_rebuild_warns():
    """The backward compares the rebuilt layer inputs with the forward's (their norms): an exact rebuild is
    silent, float32 streams forced reversible over a rebuild that loses bits warn."""
    import warnings

    model, inputs, out = tiny_llama()
    peftkit.attach(model, MEFT(lam=2.0**-10), name="exact")
    perturb(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out(model(**inputs)).pow(2).mean().backward()
    peftkit.attach(model, MEFT(lam=2.0**-10, stream_dtype="float32", reversible_layers=2), name="lossy")
    perturb(model, seed=2)
    with pytest.warns(RuntimeWarning, match="gradients are approximate"):
        out(model(**inputs)).pow(2).mean().backward()


def test_backward_twice_with_retained_graph():
    model, inputs, out = tiny_llama()
    peftkit.attach(model, MEFT())
    perturb(model)
    loss = out(model(**inputs)).pow(2).mean()
    loss.backward(retain_graph=True)
    first = {k: p.grad.clone() for k, p in peftkit.adapter_parameters(model).items()}
    loss.backward()
    for k, p in peftkit.adapter_parameters(model).items():
        assert torch.allclose(p.grad, 2 * first[k], rtol=1e-6, atol=0), k
