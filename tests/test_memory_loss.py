"""Chunked cross-entropy (peftkit.train.loss): the same loss and gradients as the model's own loss."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.train.loss import chunked_causal_lm_loss, model_loss, supports_chunked_loss
from tests.models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[1, 8:] = -100  # padding of a shorter row
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_chunked_loss_and_gradients_equal_the_models_loss(factory, chunk):
    model, _, _ = factory()
    model = model.double().eval()  # no dropout: both losses see the same forward
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.normal_(0, 0.1)
    batch = _batch()
    assert supports_chunked_loss(model)
    ref = model(**batch).loss
    ref.backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = chunked_causal_lm_loss(model, batch, chunk_size=chunk)
    loss.backward()
    g = _grads(model)
    # transformers computes its loss from float32 logits (``logits.float()``), hence float32 tolerances
    assert torch.allclose(loss.to(ref.dtype), ref, rtol=1e-6, atol=1e-6)
    assert g.keys() == g_ref.keys() and g
    for n in g:
        assert torch.allclose(g[n], g_ref[n], rtol=1e-5, atol=1e-7), n


def test_chunked_loss_keeps_only_one_chunk_of_logits():
    """With checkpointing, nothing of the size of a chunk's logits is saved for backward."""
    model, _, _ = tiny_llama()
    model.train()
    peftkit.attach(model, peftkit.LoRA(r=2, target_modules=["q_proj"]))
    batch = _batch()
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        chunked_causal_lm_loss(model, batch, chunk_size=4)
    assert not [s for s in saved if len(s) and s[-1] == VOCAB]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        _ = model(**batch).loss
    assert [s for s in saved if len(s) and s[-1] == VOCAB]  # the plain loss keeps logits


def test_model_loss_falls_back_for_other_models():
    model, inputs, _ = tiny_bert()
    assert not supports_chunked_loss(model)
    batch = dict(inputs, labels=torch.tensor([0, 1, 2, 0]))
    assert torch.equal(model_loss(model, batch), model(**batch).loss)
    llama, _, _ = tiny_llama()
    batch = _batch()
    assert torch.allclose(model_loss(llama, batch, chunked=False), llama(**batch).loss)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [3, 64])
def test_fused_head_cross_entropy_matches_autograd_for_a_trained_head(dtype, tol, chunk):
    """∂L/∂h, ∂L/∂W and ∂L/∂b computed in the forward equal autograd's of head + float32 cross-entropy."""
    from peftkit.train.fused_ce import fused_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 37, bias=True).to(dtype)
    h0 = torch.randn(20, 8, generator=g).to(dtype)
    y = torch.randint(0, 37, (20,), generator=g)
    grads = []
    for fused in (True, False):
        h = h0.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        if fused:
            loss = fused_linear_cross_entropy(h, head, y, chunk)
        else:
            z = head(h)
            loss = torch.nn.functional.cross_entropy(z.float() if dtype == torch.bfloat16 else z, y, reduction="sum")
        (loss * 0.5).backward()  # a non-unit incoming gradient
        grads.append((loss.detach(), h.grad, head.weight.grad, head.bias.grad))
    for a, b in zip(*grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    with torch.no_grad():  # no gradient wanted: the loss alone
        assert torch.allclose(fused_linear_cross_entropy(h0, head, y, chunk).float(), grads[1][0].float(),
                              rtol=tol, atol=tol)


def test_chunked_loss_of_a_model_with_a_hooked_head_keeps_the_hook():
    """A head with a forward hook is not a bare linear: the checkpointed path runs it (and its hook)."""
    model, _, _ = tiny_llama()
    calls = []
    model.lm_head.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    chunked_causal_lm_loss(model, _batch(), chunk_size=4)
    assert calls
