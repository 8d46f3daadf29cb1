"""Poly/MHR: parity with peft 0.21.2's PolyConfig (forward, gradients, files both ways), the LoRA special
case, the MHR head formula, per-row task ids and the errors."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.site import AdapterSite
from peftkit.methods.poly import PolyLayer

from .models import tiny_llama

TASKS = torch.tensor([2, 0, 1, 2])


def _peft_config(**kw):
    from peft import PolyConfig

    return PolyConfig(r=2, n_tasks=3, n_skills=3, n_splits=2, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_weights=False, task_type="CAUSAL_LM", **kw)


def _randomise(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _peft_pair(tmp_path):
    """A peft Poly model with random weights, and a fresh model with its file loaded by peftkit (trainable)."""
    from peft import get_peft_model

    model, inputs, _ = tiny_llama(0)
    pm = get_peft_model(model, _peft_config())
    _randomise([p for p in pm.parameters() if p.requires_grad])
    pm.save_pretrained(tmp_path)
    ours, _, _ = tiny_llama(0)
    peftkit.load(ours, tmp_path, trainable=True)
    return pm, ours, inputs


def test_peft_file_gives_equal_outputs_in_eval_mode(tmp_path):
    pm, ours, inputs = _peft_pair(tmp_path)
    pm.eval()
    ours.eval()
    with torch.no_grad():
        ref = pm(**inputs, task_ids=TASKS).logits
        with peftkit.task_ids(ours, TASKS):
            got = ours(**inputs).logits
        base, _, _ = tiny_llama(0)
        assert not torch.allclose(base(**inputs).logits, ref, atol=1e-3), "the adapter changes nothing"
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_training_mode_samples_and_gradients_equal_peft(tmp_path):
    """Training mode draws the relaxed-Bernoulli routing as peft does: same seed, same outputs and gradients."""
    pm, ours, inputs = _peft_pair(tmp_path)
    pm.train()
    ours.train()
    torch.manual_seed(7)
    ref = pm(**inputs, task_ids=TASKS).logits
    torch.manual_seed(7)
    with peftkit.task_ids(ours, TASKS):
        got = ours(**inputs).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    torch.manual_seed(8)
    with peftkit.task_ids(ours, TASKS):
        other = ours(**inputs).logits
    assert not torch.allclose(other, got, atol=1e-4), "training mode should sample the routing"
    ref.pow(2).mean().backward()
    got.pow(2).mean().backward()
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p
              for n, p in pm.named_parameters() if p.requires_grad}
    mine = {n.replace(".adapters.default", "").replace(".base", ""): p
            for n, p in peftkit.adapter_parameters(ours).items()}
    assert set(theirs) == set(mine) and len(mine) == 18
    for n, p in mine.items():
        torch.testing.assert_close(p.grad, theirs[n].grad, atol=1e-6, rtol=1e-4, msg=n)


def test_hf_export_loads_in_peft(tmp_path):
    from peft import PeftModel

    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, peftkit.Poly(r=2, n_tasks=3, n_skills=3, n_splits=2, target_modules=["q_proj", "up_proj"]))
    _randomise(peftkit.adapter_parameters(model).values())
    with torch.no_grad(), peftkit.task_ids(model, TASKS):
        ours = model(**inputs).logits
    peftkit.save(model, tmp_path, format="hf")
    base, _, _ = tiny_llama(0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**inputs, task_ids=TASKS).logits, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_one_skill_with_fixed_routing_is_lora(training):
    """m = 1: the routing weight is u/(u + ε) = 1 whatever u, so Poly is LoRA with scale 1/r."""
    poly_model, inputs, _ = tiny_llama(0)
    lora_model, _, _ = tiny_llama(0)
    peftkit.attach(poly_model, peftkit.Poly(r=4, n_skills=1, n_tasks=2, target_modules=["q_proj", "v_proj"]))
    peftkit.attach(lora_model, peftkit.LoRA(r=4, alpha=1, target_modules=["q_proj", "v_proj"]))
    _randomise(peftkit.adapter_parameters(poly_model).values())
    poly = peftkit.get_adapter(poly_model, "default")
    lora = peftkit.get_adapter(lora_model, "default")
    with torch.no_grad():
        for path, p in poly.items():
            lora[path].lora_A.copy_(p.poly_lora_A[0, 0].t())
            lora[path].lora_B.copy_(p.poly_lora_B[0, 0].t())
    poly_model.train(training)
    lora_model.train(training)
    with torch.no_grad(), peftkit.task_ids(poly_model, [1, 0, 1, 1]):
        got = poly_model(**inputs).logits
    with torch.no_grad():
        torch.testing.assert_close(got, lora_model(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_mhr_heads_follow_the_formula():
    """n_splits = h: head q mixes its own skills, reads x_q and writes output slice q (scale 1/r)."""
    model, _, _ = tiny_llama(0)
    peftkit.attach(model, peftkit.Poly(r=3, n_tasks=2, n_skills=3, n_splits=4, target_modules=["q_proj"]))
    _randomise(peftkit.adapter_parameters(model).values(), seed=3)
    model.eval()
    site = model.model.layers[0].self_attn.q_proj
    layer: PolyLayer = site.adapters["default"]
    x = torch.randn(2, 5, 32)
    ids = torch.tensor([1, 0])
    with torch.no_grad(), peftkit.task_ids(model, ids):
        delta = site(x) - site.base(x)
    h, m, r = 4, 3, 3
    A, B, Z = layer.poly_lora_A, layer.poly_lora_B, layer.poly_router.module_logits
    for row in range(2):
        u = torch.sigmoid(Z[ids[row]].view(h, m))
        w = u / u.sum(-1, keepdim=True)
        hidden = sum(x[row, :, q * 8:(q + 1) * 8] @ sum(w[q, j] * A[q, j] for j in range(m)) for q in range(h))
        expected = torch.cat([hidden @ sum(w[q, j] * B[q, j] for j in range(m)) for q in range(h)], -1) / r
        torch.testing.assert_close(delta[row], expected.detach(), atol=1e-5, rtol=1e-4)


def test_rows_follow_their_own_task_and_mixed_batches_keep_them():
    model, inputs, _ = tiny_llama(0)
    cfg = peftkit.Poly(r=2, n_tasks=3, n_skills=2, target_modules=["q_proj", "v_proj"])
    peftkit.attach(model, cfg, name="a")
    peftkit.attach(model, cfg, name="b")
    _randomise(peftkit.adapter_parameters(model).values())
    model.eval()
    ids = [2, 0, 1, 2]

    def alone(name, row):
        peftkit.activate(model, name)
        one = {k: v[row:row + 1] for k, v in inputs.items()}
        with torch.no_grad(), peftkit.task_ids(model, [ids[row]]):
            return model(**one).logits[0]

    rows = ["a", None, "b", "a"]
    with torch.no_grad(), peftkit.task_ids(model, ids), peftkit.mixed_batch(model, rows):
        mixed = model(**inputs).logits
    with torch.no_grad(), peftkit.disabled(model):
        base = model(**inputs).logits
    for i, name in enumerate(rows):
        ref = base[i] if name is None else alone(name, i)
        torch.testing.assert_close(mixed[i], ref, atol=1e-5, rtol=1e-4)


def test_task_ids_missing_out_of_range_or_malformed():
    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, peftkit.Poly(r=2, n_tasks=3, target_modules=["q_proj"]), name="multi")
    with pytest.raises(peftkit.PeftkitError, match=r"'multi'.*n_tasks=3.*peftkit.task_ids"):
        model(**inputs)
    with pytest.raises(peftkit.ConfigError, match=r"task id 3 is out of range for adapter 'multi'.*0\.\.2"):
        with peftkit.task_ids(model, [0, 1, 3, 0]):
            pass
    with pytest.raises(peftkit.PeftkitError, match="given 2 ids but the batch has 4 rows"):
        with peftkit.task_ids(model, [0, 1]):
            model(**inputs)
    for bad in ([0.5, 1.0], torch.tensor([[0, 1]]), [-1, 0], "01", []):
        with pytest.raises(peftkit.ConfigError, match="task"):
            with peftkit.task_ids(model, bad):
                pass
    plain, _, _ = tiny_llama(0)
    with pytest.raises(peftkit.ConfigError, match="no adapters attached"):
        with peftkit.task_ids(plain, [0]):
            pass


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_splits=3), r"n_splits=3 does not divide in_features=32"),
    (dict(poly_type="mhr"), r"poly_type='mhr' is not one of 'poly'"),
    (dict(n_skills=0), r"n_skills must be a positive integer"),
    (dict(n_tasks=1.5), r"n_tasks must be an integer"),
])
def test_bad_config_is_refused_before_the_model_is_touched(kwargs, match):
    model, _, _ = tiny_llama(0)
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.attach(model, peftkit.Poly(target_modules=["q_proj"], **kwargs))
    assert not any(isinstance(m, AdapterSite) for m in model.modules())


def test_not_mergeable_and_to_dtype():
    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, peftkit.Poly(r=2, n_skills=2, target_modules=["q_proj"]))
    with pytest.raises(peftkit.NotMergeableError, match="poly"):
        peftkit.merge(model)
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in peftkit.adapter_parameters(model).values())
    assert model(**inputs).logits.dtype == torch.float64


def test_mhr_mu_lora_starts_at_the_inventory_mean():
    """average_to_lora gives a LoRA equal to Poly with uniform routing (all logits equal: w = 1/m)."""
    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, peftkit.Poly(r=3, n_tasks=2, n_skills=3, n_splits=2, target_modules=["q_proj", "down_proj"]))
    _randomise(peftkit.adapter_parameters(model).values(), seed=5)
    model.eval()
    with torch.no_grad():
        for layer in peftkit.get_adapter(model, "default").values():
            layer.poly_router.module_logits.fill_(0.7)
        with peftkit.task_ids(model, [1, 0, 1, 0]):
            uniform = model(**inputs).logits
    assert peftkit.methods.poly.average_to_lora(model) == "default_mu"
    assert peftkit.active_names(model) == ["default_mu"]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, uniform, atol=1e-5, rtol=1e-4)
    with pytest.raises(peftkit.ConfigError, match="'default_mu' is lora, not poly"):
        peftkit.methods.poly.average_to_lora(model, "default_mu")


def test_mhr_z_trains_only_the_routing_over_a_loaded_inventory(tmp_path):
    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, peftkit.Poly(r=2, n_tasks=3, n_skills=2, target_modules=["q_proj"]))
    _randomise(peftkit.adapter_parameters(model).values())
    peftkit.save(model, tmp_path / "multi")
    with torch.no_grad(), peftkit.task_ids(model, [0, 1, 2, 0]):
        ref = model(**inputs).logits
    z, _, _ = tiny_llama(0)
    state = peftkit.read_adapters(tmp_path / "multi")[0]
    state.config = state.config.replace(routing_only=True)  # the multi-task inventory, frozen
    peftkit.install(z, state, trainable=True)
    with torch.no_grad(), peftkit.task_ids(z, [0, 1, 2, 0]):
        torch.testing.assert_close(z(**inputs).logits, ref)
    names = [n.rsplit(".", 1)[-1] for n in peftkit.adapter_parameters(z)]
    assert set(names) == {"module_logits"}
