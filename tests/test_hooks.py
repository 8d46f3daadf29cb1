"""The training-hook protocol: which adapters take part, the order of the calls in peftkit.train, the Trainer callback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import peftkit
from peftkit.methods.adalora import AdaLoRA, kept_ranks
from peftkit.methods.dylora import DyLoRA

from .models import MODELS


@dataclass
class Recorder(DyLoRA):
    """DyLoRA with every hook recording what it saw (not registered: a test-only config)."""

    log: ClassVar[list] = []

    def before_step(self, modules, info):
        m = next(iter(modules.values()))
        self.log.append(("before_step", info.step, info.total_steps, m.lora_A.grad is None))
        super().before_step(modules, info)

    def after_backward(self, modules, info):
        m = next(iter(modules.values()))
        self.log.append(("after_backward", info.step, info.total_steps, m.lora_A.detach().clone(), m.lora_A.grad.clone()))

    def after_step(self, modules, info):
        m = next(iter(modules.values()))
        self.log.append(("after_step", info.step, info.total_steps, m.lora_A.detach().clone(),
                         m.lora_A.grad is not None, info.optimizer is not None))

    def regularization_loss(self, modules, info):
        self.log.append(("regularization_loss", info.step))
        return 0.5 * sum(m.lora_A.sum() for m in modules.values())


def _examples(ids):
    return [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i]} for i in range(len(ids))]


def _collate(ex, bs, shuffle, seed):
    return [{k: torch.stack([e[k] for e in ex[i:i + bs]]) for k in ex[0]} for i in range(0, len(ex), bs)]


def test_only_trained_adapters_with_hooks_take_part():
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, peftkit.LoRA(r=2, target_modules=["q_proj"]), name="plain")
    assert peftkit.training_hooks(model) == {}
    assert float(peftkit.regularization_loss(model)) == 0.0
    peftkit.attach(model, AdaLoRA(init_r=4, target_r=2, total_step=5, target_modules=["v_proj"]), name="ada")
    assert peftkit.training_hooks(model) == {"ada": ["after_step", "regularization_loss"]}
    peftkit.attach(model, DyLoRA(r=4, target_modules=["k_proj"]), name="dy")  # attaching freezes "ada"
    assert peftkit.training_hooks(model) == {"dy": ["before_step", "after_step"]}
    peftkit.set_trainable(model, ["ada", "dy"])
    assert set(peftkit.training_hooks(model)) == {"ada", "dy"}
    assert float(peftkit.regularization_loss(model)) > 0


def test_builtin_loop_calls_the_hooks_in_order(tmp_path):
    from peftkit.train import TrainConfig, train

    Recorder.log.clear()
    model, inputs, _ = MODELS["llama"](0)
    peftkit.attach(model, Recorder(r=4, alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(0.1)
    train(model, TrainConfig(output=str(tmp_path / "run"), max_steps=2, batch_size=1, grad_accum=2, lr=1e-2,
                             progress=False), _examples(inputs["input_ids"]), collate=_collate)
    names = [e[0] for e in Recorder.log]
    one_step = ["before_step", "regularization_loss", "regularization_loss", "after_backward", "after_step"]
    assert names == one_step * 2  # the penalty once per micro-batch
    assert [e[1] for e in Recorder.log if e[0] != "regularization_loss"] == [0, 0, 0, 1, 1, 1]
    assert all(e[2] == 2 for e in Recorder.log if e[0] in ("before_step", "after_backward", "after_step"))
    before = [e for e in Recorder.log if e[0] == "before_step"]
    assert all(e[3] for e in before)  # gradients cleared before each step
    backward = [e for e in Recorder.log if e[0] == "after_backward"]
    after = [e for e in Recorder.log if e[0] == "after_step"]
    assert not torch.equal(backward[0][3], after[0][3])  # after_step sees the updated weights
    assert after[0][4] and after[0][5]  # ... with the gradients still there, and the optimizer
    # the penalty's gradient (0.5 per entry of A, for each micro-batch averaged) is in the gradient
    assert backward[0][4].abs().min() > 0


def test_trainer_callback_runs_adalora_to_its_target(tmp_path):
    from transformers import Trainer, TrainingArguments

    from peftkit.train.callbacks import PeftkitCallback

    model, inputs, _ = MODELS["llama"](0)
    peftkit.attach(model, AdaLoRA(init_r=4, target_r=2, total_step=4, tfinal=1, target_modules=["q_proj", "v_proj"]))
    ids = inputs["input_ids"]
    ds = _examples(ids)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    callback = PeftkitCallback()
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(float(out.loss)) if m.training else None,
                                prepend=True)  # the model's own loss, before the callback's hook adds the penalty
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    result = trainer.train()
    assert sum(kept_ranks(model).values()) == 2 * 4
    assert callback._handle is None  # the loss hook is gone after training
    assert len(seen) == 4 and result.training_loss > sum(seen) / 4  # the logged loss includes the penalty
