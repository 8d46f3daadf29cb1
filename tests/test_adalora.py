"""AdaLoRA against peft (forward, gradients, masks step by step, orthogonality penalty, files) and its defining properties."""

from __future__ import annotations

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

import peftkit
from peftkit.methods.adalora import AdaLoRA, kept_ranks

from .models import MODELS
from .models import outputs as _outputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}


def _kw(arch: str, **over):
    kw = dict(init_r=6, target_r=2, lora_alpha=8, total_step=12, tinit=2, tfinal=3, deltaT=2, beta1=0.8, beta2=0.9,
              orth_reg_weight=0.3, target_modules=TARGETS[arch])
    kw.update(over)
    return kw


def _ours(kw) -> AdaLoRA:
    return AdaLoRA(init_r=kw["init_r"], target_r=kw["target_r"], alpha=kw["lora_alpha"], total_step=kw["total_step"],
                   tinit=kw["tinit"], tfinal=kw["tfinal"], delta_t=kw["deltaT"], beta1=kw["beta1"], beta2=kw["beta2"],
                   orth_reg_weight=kw["orth_reg_weight"], target_modules=kw["target_modules"])


def _peft_key(name: str) -> str:
    path, leaf = name.split(".adapters.default.")
    return f"base_model.model.{path}.{leaf}.default"


def _twins(arch: str, kw, seed: int = 0, task_type: str | None = None):
    """A peft AdaLoRA model and a peftkit one holding the same tensors (λ made nonzero)."""
    model, inputs, out = MODELS[arch](seed)
    pm = get_peft_model(model, AdaLoraConfig(task_type=task_type, **kw))
    ours, _, _ = MODELS[arch](seed)
    peftkit.attach(ours, _ours(kw))
    theirs = dict(pm.named_parameters())
    mine = peftkit.adapter_parameters(ours)
    assert len(mine) == sum(p.requires_grad for p in pm.parameters())
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for n, p in mine.items():
            t = theirs[_peft_key(n)]
            t.copy_(torch.randn(t.shape, generator=g) * (1.0 if n.endswith("lora_E") else 0.3))
            p.copy_(t)
    return pm, ours, inputs, out, mine, theirs


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_forward_and_gradients_equal_peft(arch):
    pm, ours, inputs, out, mine, theirs = _twins(arch, _kw(arch))
    ys = []
    for m in (pm, ours):
        m.eval()
        y = out(m(**inputs))
        y.pow(2).mean().backward()
        ys.append(y.detach())
    assert not torch.allclose(ys[0], _outputs(MODELS[arch](0)[0], inputs, out), atol=1e-4)
    assert torch.allclose(ys[1], ys[0], atol=1e-5, rtol=1e-4)
    for n, p in mine.items():
        assert torch.allclose(p.grad, theirs[_peft_key(n)].grad, rtol=1e-4, atol=1e-7), n


def test_orthogonality_penalty_equals_peft():
    kw = _kw("llama")
    pm, ours, inputs, _out, _, _ = _twins("llama", kw, task_type="CAUSAL_LM")  # peft's model adds the penalty
    batch = dict(inputs, labels=inputs["input_ids"])
    pm.train()
    ours.train()
    with torch.no_grad():
        peft_reg = pm(**batch).loss - ours(**batch).loss  # peft adds the penalty to the model's loss
        reg = peftkit.regularization_loss(ours)
    assert reg > 0
    assert torch.allclose(reg, peft_reg, rtol=1e-4, atol=1e-6)
    # and gradients flow into P and Q through it
    peftkit.regularization_loss(ours).backward()
    assert all(p.grad is not None for n, p in peftkit.adapter_parameters(ours).items() if not n.endswith("lora_E"))


def _drive(arch: str, kw, steps: int):
    """Run peft's update_and_allocate and peftkit's after_step hook on identical weights and gradients;
    yield (step, peft λ tensors, peftkit λ tensors, peft rank_pattern, peftkit rank_pattern) after each step."""
    pm, ours, _inputs, _out, mine, theirs = _twins(arch, kw)
    g = torch.Generator().manual_seed(11)
    names = sorted(mine)
    for step in range(steps):
        with torch.no_grad():
            for n in names:
                grad = torch.randn(mine[n].shape, generator=g)
                mine[n].grad = grad.clone()
                theirs[_peft_key(n)].grad = grad.clone()
                mine[n].sub_(0.01 * grad)  # the same "optimizer step" on both
                theirs[_peft_key(n)].sub_(0.01 * grad)
        pm.base_model.update_and_allocate(step)
        peftkit.after_step(ours, step, kw["total_step"])
        yield (step, {n: theirs[_peft_key(n)].detach().clone() for n in names if n.endswith("lora_E")},
               {n: mine[n].detach().clone() for n in names if n.endswith("lora_E")},
               pm.peft_config["default"].rank_pattern, peftkit.get_adapter(ours, "default"))


@pytest.mark.parametrize("arch,over", [("llama", {}), ("gpt2", dict(tinit=0, tfinal=1, deltaT=1, total_step=8)),
                                       ("bert", dict(init_r=4, target_r=3, deltaT=3, tinit=1, tfinal=2))])
def test_masks_equal_peft_step_by_step(arch, over):
    kw = _kw(arch, **over)
    masked_steps = 0
    config = None
    for step, theirs, mine, peft_pattern, mods in _drive(arch, kw, kw["total_step"] + 2):
        for n in theirs:
            assert torch.equal(mine[n] == 0, theirs[n] == 0), (step, n)
            assert torch.allclose(mine[n], theirs[n], atol=1e-6), (step, n)
        masked_steps += any(bool((t == 0).any()) for t in theirs.values())
        config = next(iter(mods.values())).config
        if peft_pattern is not None:
            assert config.rank_pattern is not None
            mapped = {k.replace(".lora_E.default", ""): v for k, v in peft_pattern.items()}
            assert mapped == config.rank_pattern, step
    assert masked_steps > 0
    n_layers = len(mods)
    assert sum(sum(v) for v in config.rank_pattern.values()) == kw["target_r"] * n_layers


def test_final_total_rank_is_target_times_layers():
    kw = _kw("llama", tfinal=1)
    mods = [last[-1] for last in _drive("llama", kw, kw["total_step"])][-1]
    ranks = {p: int((m.lora_E != 0).sum()) for p, m in mods.items()}
    assert sum(ranks.values()) == kw["target_r"] * len(mods)
    assert len(set(ranks.values())) > 1  # the budget went where the importance was, not evenly


def test_identity_at_init_and_budget_schedule():
    model, inputs, out = MODELS["llama"](0)
    y0 = _outputs(model, inputs, out)
    cfg = AdaLoRA(init_r=6, target_r=2, total_step=20, tinit=4, tfinal=5, delta_t=3, target_modules=["q_proj"])
    peftkit.attach(model, cfg)
    assert torch.equal(_outputs(model, inputs, out), y0)
    n = 2
    b = [cfg.budget(t, n) for t in range(21)]
    assert b[4] == (12, False) and b[0] == (12, False)
    assert b[16] == (4, True) and b[20] == (4, True)
    # cubic: b(t) = 4 + 8 (1 - (t - 4)/11)^3, re-allocating when t % 3 == 0
    for t in range(5, 15):
        assert b[t] == (int(8 * (1 - (t - 4) / 11) ** 3 + 4), t % 3 == 0)
    assert all(b[t][0] >= b[t + 1][0] for t in range(20))


def test_builtin_loop_runs_the_schedule(tmp_path):
    from peftkit.train import TrainConfig, train

    model, inputs, _out = MODELS["llama"](0)
    peftkit.attach(model, AdaLoRA(init_r=4, target_r=2, total_step=6, tfinal=1, target_modules=["q_proj", "v_proj"]))
    ids = inputs["input_ids"]
    examples = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i]} for i in range(4)]

    def collate(ex, bs, shuffle, seed):
        return [{k: torch.stack([e[k] for e in ex[i:i + bs]]) for k in ex[0]} for i in range(0, len(ex), bs)]

    train(model, TrainConfig(output=str(tmp_path / "run"), max_steps=6, batch_size=2, lr=1e-2, progress=False),
          examples, collate=collate)
    ranks = kept_ranks(model)
    assert sum(ranks.values()) == 2 * 4
    saved = peftkit.load(MODELS["llama"](0)[0], tmp_path / "run" / "adapter")
    assert sum(kept_ranks(saved).values()) == 8


@pytest.mark.parametrize("kw,field", [
    (dict(init_r=4, target_r=6, total_step=10), "target_r"),
    (dict(init_r=4, target_r=2), "total_step"),
    (dict(init_r=4, target_r=2, total_step=10, tinit=6, tfinal=4), "tinit"),
    (dict(init_r=4, target_r=2, total_step=10, beta1=1.0), "beta1"),
    (dict(init_r=4, target_r=2, total_step=10, orth_reg_weight=-1), "orth_reg_weight"),
    (dict(init_r=4, target_r=2, total_step=10, delta_t=0), "delta_t"),
])
def test_bad_input_named_before_the_model_is_touched(kw, field):
    model, _, _ = MODELS["llama"](0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.ConfigError, match=field):
        peftkit.attach(model, AdaLoRA(target_modules=["q_proj"], **kw))
    assert not peftkit.adapter_names(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rank_above_the_layer_is_refused():
    model, _, _ = MODELS["llama"](0)
    with pytest.raises(peftkit.TargetError, match="init_r=40"):
        peftkit.attach(model, AdaLoRA(init_r=40, target_r=2, total_step=10, target_modules=["q_proj"]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_file_after_allocation_loads_with_the_same_outputs(arch, tmp_path):
    kw = _kw(arch, tfinal=1)
    pm, _ours, inputs, out, mine, theirs = _twins(arch, kw)
    g = torch.Generator().manual_seed(5)
    for step in range(kw["total_step"]):
        for n in sorted(mine):
            grad = torch.randn(mine[n].shape, generator=g)
            theirs[_peft_key(n)].grad = grad
        pm.base_model.update_and_allocate(step)
    pm.eval()
    ref = _outputs(pm, inputs, out)
    pm.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"]
    base, _, _ = MODELS[arch](0)
    peftkit.load(base, tmp_path)
    assert torch.allclose(_outputs(base, inputs, out), ref, atol=1e-5, rtol=1e-4)
    assert sum(kept_ranks(base).values()) == kw["target_r"] * len(kept_ranks(base))
    cfg = next(iter(peftkit.get_adapter(base, "default").values())).config
    assert cfg.rank_pattern == {k.rsplit(".lora_E", 1)[0]: v for k, v in saved["rank_pattern"].items()}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_peftkit_hf_export_after_allocation_loads_in_peft(arch, tmp_path):
    from peft import PeftModel

    kw = _kw(arch, tfinal=1)
    _pm, ours, inputs, out, mine, _theirs = _twins(arch, kw)
    g = torch.Generator().manual_seed(5)
    for step in range(kw["total_step"]):
        for n in sorted(mine):
            mine[n].grad = torch.randn(mine[n].shape, generator=g)
        peftkit.after_step(ours, step, kw["total_step"])
    y = _outputs(ours, inputs, out)
    peftkit.save(ours, tmp_path, format="hf")
    import json

    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert hf["peft_type"] == "ADALORA" and sum(sum(v) for v in hf["rank_pattern"].values()) == 2 * len(mine) // 3
    loaded = PeftModel.from_pretrained(MODELS[arch](0)[0], tmp_path).eval()
    assert torch.allclose(_outputs(loaded, inputs, out), y, atol=1e-5, rtol=1e-4)
    back, _, _ = MODELS[arch](0)
    peftkit.load(back, tmp_path)  # and our own export reads back
    assert torch.allclose(_outputs(back, inputs, out), y, atol=1e-5, rtol=1e-4)


def test_after_the_final_allocation_the_pattern_is_kept_and_recovered():
    kw = _kw("llama", tfinal=3)
    mods = [last[-1] for last in _drive("llama", kw, kw["total_step"] - 2)][-1]  # up to the final allocation
    config = next(iter(mods.values())).config
    final = {k: list(v) for k, v in config.rank_pattern.items()}
    with torch.no_grad():
        for m in mods.values():
            m.lora_E.add_(0.5)  # an optimizer step revives masked λ ...
    config.rank_pattern = None  # ... and a resumed run lost the recorded pattern: recovered from the zeroed λ
    for m, keep in zip(mods.values(), final.values(), strict=True):
        with torch.no_grad():
            m.lora_E[~torch.tensor(keep)] = 0.0
    config.after_step(mods, peftkit.StepInfo(kw["total_step"] - 1, kw["total_step"], "default", None))
    assert config.rank_pattern == final
    with torch.no_grad():
        for m in mods.values():
            m.lora_E.add_(0.5)
    config.after_step(mods, peftkit.StepInfo(kw["total_step"], kw["total_step"], "default", None))
    assert {p: (m.lora_E != 0).view(-1).tolist() for p, m in mods.items()} == final  # re-masked every step
