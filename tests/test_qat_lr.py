"""The step sizes' own learning rate (``scale_lr``) of L4Q / LR-QAT: a config field that reaches the
optimizer through the ``param_groups`` hook, so ``peftkit.train``, ``peftkit train --scale-lr`` and
``peftkit.qat_param_groups`` all honour it; bad values are refused by name before any work."""

from __future__ import annotations

import json
import math

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError
from peftkit.core.hooks import param_groups
from peftkit.methods.qat_lora import L4Q, LRQAT, QATLayer

from .models import tiny_llama

TARGETS = ["q_proj", "v_proj"]  # 2 layers × 2 modules: 4 step-size tensors, 8 LoRA factors


def layers(model) -> list[QATLayer]:
    return list(peftkit.get_adapter(model, "default").values())


def examples(inputs) -> list[dict]:
    ids = inputs["input_ids"]
    return [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i]} for i in range(4)]


def collate(ex, bs, shuffle, seed):
    return [{k: torch.stack([e[k] for e in ex[i:i + bs]]) for k in ex[0]} for i in range(0, len(ex), bs)]


def saved_groups(run) -> list[tuple[float, int]]:
    """``(initial lr, number of parameters)`` of each optimizer group in the run's final checkpoint."""
    trainer = torch.load(run / "checkpoint" / "optimizer.pt", weights_only=True)
    return [(g["initial_lr"], len(g["params"])) for g in trainer["optimizer"]["param_groups"]]


@pytest.mark.parametrize("method", [L4Q, LRQAT])
def test_peftkit_train_trains_step_sizes_at_scale_lr(method, tmp_path):
    from peftkit.train import TrainConfig, train

    model, inputs, _ = tiny_llama()
    peftkit.attach(model, method(r=4, bits=4, target_modules=TARGETS, scale_lr=1e-30))
    groups = param_groups(model, list(peftkit.adapter_parameters(model).values()), 1e-2)
    assert [(g["lr"], len(g["params"])) for g in groups] == [(1e-2, 8), (1e-30, 4)]
    assert {id(p) for p in groups[1]["params"]} == {id(m.scale) for m in layers(model)}
    before = [(m.scale.detach().clone(), m.lora_A.detach().clone()) for m in layers(model)]
    run = tmp_path / "run"
    train(model, TrainConfig(output=str(run), max_steps=2, batch_size=2, lr=1e-2, save_every=2,
                             progress=False),
          examples(inputs), collate=collate)
    assert saved_groups(run) == [(1e-2, 8), (1e-30, 4)]
    for m, (s0, a0) in zip(layers(model), before, strict=True):
        assert (m.scale - s0).abs().max() < 1e-20  # at a vanishing rate the step sizes stay put
        assert (m.lora_A - a0).abs().max() > 1e-3  # while A trains at the run's rate


def test_without_scale_lr_step_sizes_train_at_the_run_rate(tmp_path):
    from peftkit.train import TrainConfig, train

    model, inputs, _ = tiny_llama()
    peftkit.attach(model, L4Q(r=4, bits=4, target_modules=TARGETS))
    assert param_groups(model, list(peftkit.adapter_parameters(model).values()), 1e-2) == [
        {"params": list(peftkit.adapter_parameters(model).values())}]  # one group, the optimizer's rate
    s0 = [m.scale.detach().clone() for m in layers(model)]
    run = tmp_path / "run"
    train(model, TrainConfig(output=str(run), max_steps=2, batch_size=2, lr=1e-2, save_every=2,
                             progress=False),
          examples(inputs), collate=collate)
    assert saved_groups(run) == [(1e-2, 12)]
    assert max((m.scale - s).abs().max().item() for m, s in zip(layers(model), s0, strict=True)) > 1e-3


def test_cli_scale_lr_reaches_the_optimizer_and_the_saved_config(llama_dir, lm_data, tmp_path):
    from peftkit.cli.main import main

    train, _ = lm_data
    run = tmp_path / "run"
    assert main(["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", "lrqat", "--r", "4",
                 "--bits", "4", "--target-modules", "q_proj,v_proj", "--data", str(train), "--output", str(run),
                 "--max-steps", "2", "--save-every", "2", "--batch-size", "4", "--lr", "2e-3", "--scale-lr", "2e-5"]) == 0
    assert saved_groups(run) == [(2e-3, 8), (2e-5, 4)]
    assert json.loads((run / "adapter" / "peftkit_adapter.json").read_text())["config"]["scale_lr"] == 2e-5


@pytest.mark.parametrize("value, message", [
    ("0", "scale_lr must be a positive number"),
    ("-1e-5", "--scale-lr: '-1e-5' is negative"),
    ("fast", "scale_lr must be a positive number"),
    ("nan", "scale_lr must be a positive number"),
])
def test_cli_refuses_a_bad_scale_lr_by_name_before_training(llama_dir, lm_data, tmp_path, capsys, value, message):
    from peftkit.cli.main import main

    train, _ = lm_data
    run = tmp_path / "run"
    assert main(["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", "l4q", "--data", str(train),
                 "--output", str(run), "--max-steps", "2", "--scale-lr", value]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()  # refused before anything was written


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, "1e-5", True])
def test_config_refuses_a_bad_scale_lr(value):
    with pytest.raises(ConfigError, match=r"L4Q: scale_lr must be a (positive )?number"):
        peftkit.attach(tiny_llama()[0], L4Q(r=4, target_modules=TARGETS, scale_lr=value))


def test_qat_param_groups_defaults_to_the_configured_rate():
    model, _, _ = tiny_llama()
    peftkit.attach(model, L4Q(r=4, target_modules=TARGETS, scale_lr=3e-6), name="a")
    peftkit.attach(model, LRQAT(r=4, target_modules=["o_proj"]), name="b")
    peftkit.set_trainable(model, ["a", "b"])
    rest, *scales = peftkit.qat_param_groups(model, lr=1e-3)
    assert rest["lr"] == 1e-3 and len(rest["params"]) == 12
    assert sorted((g["lr"], len(g["params"])) for g in scales) == [(3e-6, 4), (1e-5, 2)]  # b: lr / 100
    assert [(g["lr"], len(g["params"])) for g in peftkit.qat_param_groups(model, lr=1e-3, scale_lr=7e-7)] == [
        (1e-3, 12), (7e-7, 6)]  # an explicit rate wins
    assert [(g["lr"], len(g["params"])) for g in peftkit.qat_param_groups(model, lr=1e-3, name="a")] == [
        (1e-3, 8), (3e-6, 4)]


def test_loraplus_and_scale_lr_are_not_combined_silently(tmp_path):
    from peftkit.train import TrainConfig, train

    model, inputs, _ = tiny_llama()
    peftkit.attach(model, L4Q(r=4, target_modules=TARGETS, scale_lr=1e-5))
    with pytest.raises(ConfigError, match=r"loraplus_ratio .* L4Q/LR-QAT scale_lr"):
        train(model, TrainConfig(output=str(tmp_path / "run"), max_steps=1, batch_size=2, loraplus_ratio=16.0,
                                 progress=False), examples(inputs), collate=collate)
