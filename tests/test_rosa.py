"""RoSA (Nikdan et al. 2024): LoRA plus a sparse delta whose support comes from warm-up gradients.

peft has no RoSA (its code is a peft fork), so the defining properties: the sparse part has the
configured density, the trainable budget is r·(in + out) + k per layer, merging is exact, the
model is the base model at init, and the support is the top-k of the dense-weight gradients
accumulated over the warm-up (checked against a hand-computed gradient).
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.methods.rosa import RoSA
from peftkit.methods.sparse import fish_scores

from .sparse_helpers import Small, base_state, hook_loop, llama, llama_loss, train_tiny

X = [torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.5, -1.0, 0.0, 2.0]]), torch.tensor([[1.0, 1.0, -1.0, 0.0]])]
C = torch.tensor([1.0, -2.0])


def hand_setup(grad_score: str = "square", warmup: int = 2):
    model = Small()
    peftkit.attach(model, RoSA(r=1, density=0.25, mask_warmup_steps=warmup, grad_score=grad_score, target_modules=["fc"]))
    mod = model.fc.adapters["default"]
    opt = torch.optim.SGD(peftkit.adapter_parameters(model).values(), lr=0.1)
    return model, mod, opt, (lambda step: (model(X[step]) * C).sum())


@pytest.mark.parametrize("grad_score", ["square", "abs"])
def test_support_is_the_top_k_of_the_warm_up_gradients(grad_score):
    model, mod, opt, loss = hand_setup(grad_score)
    u = model.head.weight.detach().t() @ C  # ∂loss/∂fc(x): the head is linear and frozen
    grads = [torch.outer(u, X[s][0]) for s in range(2)]  # ∂loss/∂W for each warm-up step
    score = sum(g.square() if grad_score == "square" else g.abs() for g in grads)
    expected = torch.topk(score.reshape(-1), 3).indices.sort().values
    assert not mod.is_fixed()
    hook_loop(model, 1, loss, opt)
    assert not mod.is_fixed() and torch.count_nonzero(mod.values) == 0  # warm-up: only LoRA trains
    assert torch.count_nonzero(mod.lora_B) > 0
    B = mod.lora_B.detach().clone()
    one_step(model, 1, loss, opt)
    assert mod.is_fixed() and mod.grad_score is None and mod.capture is None
    assert torch.equal(mod.indices, expected)
    assert torch.count_nonzero(mod.values) == 0
    assert not torch.equal(B, mod.lora_B)
    # after the warm-up the sparse values train, at the chosen support only
    one_step(model, 2, loss, opt)
    assert torch.count_nonzero(mod.values) > 0
    delta = mod.sparse_delta(model.fc.base).reshape(-1)
    off = torch.ones(12, dtype=torch.bool)
    off[expected] = False
    assert torch.count_nonzero(delta[off]) == 0


def one_step(model, step, loss, opt):
    peftkit.before_step(model, step, step + 1, opt)
    loss(step).backward()
    peftkit.after_backward(model, step, step + 1, opt)
    opt.step()
    peftkit.after_step(model, step, step + 1, opt)
    opt.zero_grad()


def test_density_and_total_trainable_budget():
    model, _, _ = llama()
    cfg = RoSA(r=3, density=0.05, target_modules="all-linear")
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith("_proj")}
    peftkit.attach(model, cfg)
    mods = peftkit.get_adapter(model, "default")
    assert set(mods) == set(shapes)
    budget = 0
    for path, mod in mods.items():
        out, inp = shapes[path]
        k = round(0.05 * out * inp)
        assert mod.values.numel() == k and mod.indices.unique().numel() == k
        assert abs(mod.density_of() - 0.05) <= 0.5 / (out * inp)
        budget += 3 * (inp + out) + k
    trainable = sum(p.numel() for p in peftkit.adapter_parameters(model).values())
    assert trainable == budget
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == budget


def test_merge_is_base_plus_low_rank_plus_sparse():
    model = Small(out=6, inp=5)
    w0 = model.fc.weight.detach().clone()
    peftkit.attach(model, RoSA(r=2, alpha=4, density=0.2, support="magnitude", target_modules=["fc"]))
    mod = model.fc.adapters["default"]
    with torch.no_grad():
        mod.lora_B.normal_()
        mod.values.normal_()
    x = torch.randn(7, 5)
    y = model(x)
    s = torch.zeros(30).index_add(0, mod.indices, mod.values.detach()).view(6, 5)
    expected = w0 + 2.0 * mod.lora_B.detach() @ mod.lora_A.detach() + s
    peftkit.merge(model)
    assert torch.allclose(model.fc.base.weight, expected, atol=1e-6)
    assert torch.allclose(model(x), y, atol=1e-5)
    # magnitude support: the k largest |W0|
    assert torch.equal(mod.indices, torch.topk(w0.abs().reshape(-1), 6).indices.sort().values)


def test_identity_at_init_and_only_adapter_parameters_train():
    model, inputs, out = llama()
    with torch.no_grad():
        y0 = out(model(**inputs))
    peftkit.attach(model, RoSA(r=2, density=0.1, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        assert torch.equal(out(model(**inputs)), y0)
    assert all(".adapters." in n for n, p in model.named_parameters() if p.requires_grad)


def test_scores_support_and_save_load_keep_the_support(tmp_path):
    model, inputs, _out = llama()
    ids = inputs["input_ids"]
    scores = fish_scores(model, [{"input_ids": ids, "labels": ids}], target_modules=["v_proj"])
    peftkit.attach(model, RoSA(r=2, density=0.1, support="scores", scores=scores, target_modules=["v_proj"]))
    for path, mod in peftkit.get_adapter(model, "default").items():
        k = mod.indices.numel()
        assert torch.equal(mod.indices, torch.topk(scores[path].reshape(-1), k).indices.sort().values)
        assert mod.is_fixed()
    peftkit.save(model, tmp_path / "a")
    fresh = peftkit.load(llama()[0], tmp_path / "a")
    for path, mod in peftkit.get_adapter(fresh, "default").items():
        assert torch.equal(mod.indices, peftkit.get_adapter(model, "default")[path].indices)


def test_warm_up_through_peftkit_train_then_save_and_load(tmp_path):
    model, inputs, out = llama()
    peftkit.attach(model, RoSA(r=2, density=0.05, mask_warmup_steps=2, target_modules=["q_proj", "v_proj"]))
    before = base_state(model)
    train_tiny(model, inputs, tmp_path / "run", steps=4)
    mods = peftkit.get_adapter(model, "default")
    assert all(m.is_fixed() and m.grad_score is None for m in mods.values())
    assert all(torch.count_nonzero(m.values) > 0 for m in mods.values())  # steps 2 and 3 trained the sparse part
    after = base_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    loaded = peftkit.load(llama()[0], tmp_path / "run" / "adapter")
    for path, mod in peftkit.get_adapter(loaded, "default").items():
        assert mod.is_fixed() and torch.equal(mod.indices, mods[path].indices)
    with torch.no_grad():
        assert torch.allclose(out(loaded(**inputs)), out(model(**inputs)), atol=1e-5)


def test_a_model_saved_during_warm_up_stays_pending(tmp_path):
    model, inputs, _ = llama()
    peftkit.attach(model, RoSA(r=2, density=0.05, mask_warmup_steps=5, target_modules=["q_proj"]))
    opt = torch.optim.SGD(peftkit.adapter_parameters(model).values(), lr=0.1)
    hook_loop(model, 2, llama_loss(model, inputs), opt)
    peftkit.save(model, tmp_path / "a")
    loaded = peftkit.load(llama()[0], tmp_path / "a", trainable=True)
    assert not any(m.is_fixed() for m in peftkit.get_adapter(loaded, "default").values())


@pytest.mark.parametrize("kw,culprit", [
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(support="gradients"), "did you mean 'gradient'"),
    (dict(support="scores"), "needs scores"),
    (dict(grad_score="sq"), "grad_score"),
    (dict(mask_warmup_steps=0), "mask_warmup_steps"),
    (dict(init="pissa"), "init='pissa'"),
])
def test_bad_input_named_before_the_model_is_touched(kw, culprit):
    model, _, _ = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.ConfigError, match=culprit):
        peftkit.attach(model, RoSA(target_modules=["q_proj"], **kw))
    assert not peftkit.adapter_names(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_scores_for_the_wrong_layer_name_the_module():
    model, _, _ = llama()
    bad = {"model.layers.0.self_attn.q_proj": torch.ones(3)}
    with pytest.raises(peftkit.TargetError, match=r"q_proj.*3 entries"):
        peftkit.attach(model, RoSA(support="scores", scores=bad, target_modules=["q_proj"]))
    with pytest.raises(peftkit.TargetError, match="no score"):
        peftkit.attach(model, RoSA(support="scores", scores=bad, target_modules=["v_proj"]))


def test_to_dtype_keeps_working():
    model, inputs, out = llama()
    peftkit.attach(model, RoSA(r=2, density=0.05, support="random", target_modules=["q_proj"]))
    model.to(torch.float64)
    with torch.no_grad():
        assert out(model(**inputs)).dtype == torch.float64


def test_a_layer_without_warm_up_gradients_keeps_the_random_support_with_a_warning():
    model = Small()
    peftkit.attach(model, RoSA(r=1, density=0.25, mask_warmup_steps=1, target_modules=["fc"]))
    mod = model.fc.adapters["default"]
    placeholder = mod.indices.clone()
    opt = torch.optim.SGD(peftkit.adapter_parameters(model).values(), lr=0.1)
    peftkit.before_step(model, 0, 3, opt)
    with pytest.warns(UserWarning, match="no gradient reached fc"):
        peftkit.after_step(model, 0, 3, opt)  # no backward ran in the warm-up
    assert mod.is_fixed() and torch.equal(mod.indices, placeholder)
