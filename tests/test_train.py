"""Tests of peftkit.train: loop, schedules, accumulation, clipping, checkpoints/resume, outputs, DDP.

The batches are built here (fixed-length random token ids, no padding) so these tests do not
depend on peftkit.data.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import peftkit
from peftkit.train import TrainConfig, load_extra, lr_multiplier, make_scheduler, train, warmup_steps
from tests.models import VOCAB, tiny_bert, tiny_llama
from tests.ranks import run_two_ranks

ROOT = Path(__file__).resolve().parents[1]


def collate(examples, batch_size, shuffle, seed):
    """Stack fixed-length examples into batches; shuffled by a seeded permutation."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle \
        else list(range(len(examples)))
    out = []
    for i in range(0, len(order), batch_size):
        rows = [examples[j] for j in order[i:i + batch_size]]
        batch = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        out.append(batch)
    return out


def lm_examples(n=16, length=10, seed=0, learnable=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if learnable:  # each token is the previous one + 1 (mod VOCAB): easy to learn
            start = int(torch.randint(0, VOCAB, (1,), generator=g))
            ids = [(start + i) % VOCAB for i in range(length)]
        else:
            ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def cls_examples(n=12, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (length,), generator=g).tolist(), "labels": i % 3} for i in range(n)]


def llama_lora(seed=0, targets=("q_proj", "v_proj"), dropout=0.0):
    model, _, _ = tiny_llama(seed)
    torch.manual_seed(seed + 100)
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=list(targets), dropout=dropout))
    # LoRA's B starts at zero; give it small values so every parameter gets a gradient from step 1
    with torch.no_grad():
        for name, p in peftkit.adapter_parameters(model).items():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    return model


def adapter_tensors(model):
    return {k: v.detach().clone() for k, v in peftkit.adapter_parameters(model).items()}


def assert_same(a, b, atol=None):
    assert a.keys() == b.keys()
    for k in a:
        if atol is None:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def cfg(tmp_path, name="run", **kw):
    base = {"lr": 1e-2, "batch_size": 4, "max_steps": 4, "log_every": 1, "progress": False}
    base.update(kw)
    return TrainConfig(output=str(tmp_path / name), **base)


# -- the loop ----------------------------------------------------------------------------------------
def test_loss_decreases_on_learnable_task(tmp_path):
    # the tiny random model's lm_head is too small to produce confident logits: train it alongside
    model = llama_lora()
    data = lm_examples(16, learnable=True)
    m = train(model, cfg(tmp_path, lr=5e-2, max_steps=20, eval_every=20, log_every=5), data, data[:8], collate=collate,
              trainable_extra=["lm_head"])
    hist = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in hist if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert m["eval_loss"] < 0.5 * math.log(VOCAB)
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert m["steps"] == 20


def test_schedule_values():
    assert warmup_steps(0.1, 100) == 10 and warmup_steps(5, 100) == 5 and warmup_steps(0.0, 100) == 0
    lin = lr_multiplier("linear", 4, 20)
    assert [lin(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lin(12) == pytest.approx(0.5) and lin(20) == 0.0 and lin(25) == 0.0
    cos = lr_multiplier("cosine", 4, 20)
    assert cos(2) == 0.5 and cos(4) == 1.0
    assert cos(8) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert cos(12) == pytest.approx(0.5) and cos(20) == pytest.approx(0.0)
    const = lr_multiplier("constant", 2, 20)
    assert [const(s) for s in (0, 1, 2, 19)] == [0.0, 0.5, 1.0, 1.0]
    # through a real optimizer: the lr used by each step
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = make_scheduler(opt, "linear", 0.2, 10)  # 2 warmup steps
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.0875, 0.075, 0.0625, 0.05, 0.0375, 0.025, 0.0125])


def test_lr_logged_follows_schedule(tmp_path):
    model = llama_lora()
    train(model, cfg(tmp_path, lr=0.1, max_steps=6, warmup=2, schedule="cosine"), lm_examples(), collate=collate)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [0.1 * lr_multiplier("cosine", 2, 6)(s) for s in range(6)]
    assert lrs == pytest.approx(expected)


def test_grad_accumulation_equals_bigger_batch(tmp_path):
    """2 micro-batches of 2 = one batch of 4 with the same rows: same gradient (so the loss scaling is right) and step."""
    data = lm_examples(8)
    grads = []

    def hook(opt, args, kwargs):
        grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        a = llama_lora()
        train(a, cfg(tmp_path, "a", batch_size=2, grad_accum=2, max_steps=1, lr=1e-3, max_grad_norm=None), data,
              collate=collate)
        # the accumulated step used the first two batches of 2 (shuffled with seed 0): a batch of 4 of the same rows
        rows = torch.cat([x["input_ids"] for x in collate(data, 2, True, 0)[:2]])
        big = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows]
        c = llama_lora()
        train(c, cfg(tmp_path, "c", batch_size=4, max_steps=1, lr=1e-3, max_grad_norm=None), big,
              collate=lambda e, bs, sh, sd: collate(e, bs, False, sd))
    finally:
        handle.remove()
    assert len(grads) == 2
    for ga, gc in zip(*grads, strict=True):
        assert torch.allclose(ga, gc, atol=1e-6, rtol=0)
    assert_same(adapter_tensors(a), adapter_tensors(c), atol=1e-6)
    assert any(not torch.equal(v, adapter_tensors(llama_lora())[k]) for k, v in adapter_tensors(a).items())


def test_clipping_bounds_grad_norm(tmp_path):
    seen = []

    def hook(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.nn.utils.get_total_norm(grads)))

    logs = []
    handle = register_optimizer_step_pre_hook(hook)
    try:
        train(llama_lora(), cfg(tmp_path, max_grad_norm=0.01, max_steps=3), lm_examples(),
              collate=collate, callback=lambda s, lg: logs.append(lg["grad_norm"]))
    finally:
        handle.remove()
    assert len(seen) == 3
    assert all(n > 0.01 for n in logs)  # clipping was needed
    assert all(n <= 0.01 * (1 + 1e-5) for n in seen)


def test_seed_reproducible_and_seed_matters(tmp_path):
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        model = llama_lora()
        train(model, cfg(tmp_path, name, seed=seed, max_steps=3), lm_examples(), collate=collate)
        runs.append(adapter_tensors(model))
    assert_same(runs[0], runs[1])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # another data order


def test_gradient_checkpointing_same_result(tmp_path):
    a, b = llama_lora(), llama_lora()
    train(a, cfg(tmp_path, "a", max_steps=2), lm_examples(), collate=collate)
    train(b, cfg(tmp_path, "b", max_steps=2, gradient_checkpointing=True), lm_examples(), collate=collate)
    assert b.model.gradient_checkpointing
    assert_same(adapter_tensors(a), adapter_tensors(b), atol=1e-6)


def test_loraplus_groups(tmp_path):
    captured = {}

    def hook(opt, args, kwargs):
        captured["lrs"] = sorted({g["lr"] for g in opt.param_groups})

    handle = register_optimizer_step_pre_hook(hook)
    try:
        train(llama_lora(), cfg(tmp_path, lr=1e-3, max_steps=1, loraplus_ratio=8, schedule="constant"), lm_examples(),
              collate=collate)
    finally:
        handle.remove()
    assert captured["lrs"] == pytest.approx([1e-3, 8e-3])


# -- checkpoints and resume ---------------------------------------------------------------------------
def test_resume_is_bit_for_bit(tmp_path):
    data = lm_examples(12)  # 3 batches per epoch: the run crosses an epoch boundary; dropout uses the torch RNG
    straight = llama_lora(dropout=0.2)
    m1 = train(straight, cfg(tmp_path, "straight", max_steps=6, warmup=2), data, collate=collate)
    part = llama_lora(dropout=0.2)
    train(part, cfg(tmp_path, "resumed", max_steps=6, warmup=2, save_every=3),
          data, collate=collate, callback=_stop_at(3))
    ckpt = tmp_path / "resumed" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    assert [p.name for p in (tmp_path / "resumed").iterdir() if p.name.startswith(".checkpoint")] == []
    with pytest.raises(peftkit.ConfigError, match="batch_size: 4 -> 2"):
        train(llama_lora(dropout=0.2), cfg(tmp_path, "resumed", max_steps=6, warmup=2, batch_size=2, resume=True), data,
              collate=collate)
    ckpt.rename(tmp_path / "resumed" / ".checkpoint.old")  # as if a save crashed between its two renames
    fresh = llama_lora(seed=0, dropout=0.2)
    torch.manual_seed(1234)  # the resumed run must not depend on the caller's RNG
    m2 = train(fresh, cfg(tmp_path, "resumed", max_steps=6, warmup=2, save_every=3, resume=True), data, collate=collate)
    assert m2["steps"] == 6
    assert_same(adapter_tensors(straight), adapter_tensors(fresh))
    hist = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in hist] == [1, 2, 3, 4, 5, 6]
    assert m2["train_loss"] == m1["train_loss"]


def _stop_at(step):
    def cb(s, logs):
        if s == step:
            raise KeyboardInterrupt

    return cb


def test_keyboard_interrupt_saves_checkpoint_and_resumes(tmp_path):
    data = lm_examples(16)
    straight = llama_lora(dropout=0.2)
    train(straight, cfg(tmp_path, "straight", max_steps=5, grad_accum=2, batch_size=2), data, collate=collate)

    calls = {"n": 0}

    def interrupting(examples, bs, shuffle, seed):
        batches = collate(examples, bs, shuffle, seed)

        class Exploding(list):
            def __getitem__(self, i):
                calls["n"] += 1
                if calls["n"] == 6:  # inside the 3rd optimizer step (2 micro-batches each)
                    raise KeyboardInterrupt
                return list.__getitem__(self, i)

        return Exploding(batches)

    model = llama_lora(dropout=0.2)
    m = train(model, cfg(tmp_path, "cut", max_steps=5, grad_accum=2, batch_size=2), data, collate=interrupting)
    assert m["interrupted"] and m["steps"] == 2
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["pos"] == 4
    assert (tmp_path / "cut" / "metrics.json").is_file()
    resumed = llama_lora(dropout=0.2)
    m = train(resumed, cfg(tmp_path, "cut", max_steps=5, grad_accum=2, batch_size=2, resume=True), data, collate=collate)
    assert not m["interrupted"] and m["steps"] == 5
    assert_same(adapter_tensors(straight), adapter_tensors(resumed))


@pytest.mark.parametrize("damage", ["python", "numpy", "torch", "optimizer"])
def test_damaged_checkpoint_rng_is_a_clear_error(tmp_path, damage):
    data = lm_examples(16)
    train(llama_lora(), cfg(tmp_path, max_steps=4, save_every=1), data, collate=collate)
    ckpt = tmp_path / "run" / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    if damage in ("python", "numpy"):
        state["rng"][damage] = [3, "garbage"] if damage == "python" else ["MT19937", [1, 2], 0]
        (ckpt / "state.json").write_text(json.dumps(state))
        match = r"state\.json: the saved random-number-generator state is unusable"
    elif damage == "torch":
        trainer = torch.load(ckpt / "optimizer.pt", weights_only=True)
        trainer["torch_rng"] = torch.zeros(3, dtype=torch.uint8)
        torch.save(trainer, ckpt / "optimizer.pt")
        match = "random-number-generator state is unusable"
    else:
        (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes()[:100])
        match = r"optimizer\.pt: cannot read"
    model = llama_lora()
    before = adapter_tensors(model)
    with pytest.raises(peftkit.AdapterLoadError, match=match):
        train(model, cfg(tmp_path, max_steps=4, save_every=1, resume=True), data, collate=collate)
    assert_same(before, adapter_tensors(model))  # refused before the model changed


def test_early_stopping_and_best_adapter(tmp_path):
    scores = iter([0.1, 0.5, 0.4, 0.45, 0.3, 0.9, 0.95])
    snapshots = {}

    def evaluate(model, batches):
        return {"accuracy": next(scores)}

    def cb(step, logs):
        snapshots[step] = adapter_tensors(model)

    model = llama_lora()
    m = train(model, cfg(tmp_path, max_steps=20, eval_every=1, early_stopping_patience=2, metric="eval_accuracy"),
              lm_examples(), lm_examples(4, seed=9), collate=collate, evaluate=evaluate, callback=cb)
    assert m["steps"] == 4 and m["stopped_early"]
    assert m["best_step"] == 2 and m["eval_accuracy"] == 0.5
    assert_same(adapter_tensors(model), snapshots[2])  # the best adapter is restored and saved
    fresh = llama_lora()
    peftkit.delete(fresh, "default")
    peftkit.load(fresh, tmp_path / "run" / "adapter")
    assert_same({k: v for k, v in adapter_tensors(fresh).items()}, snapshots[2])


def test_best_adapter_survives_resume(tmp_path):
    scores = iter([0.9, 0.1, 0.2, 0.3, 0.4])
    snapshots = {}
    evaluate = lambda model, batches: {"accuracy": next(scores)}
    conf = dict(max_steps=5, eval_every=1, save_every=3, metric="eval_accuracy")
    model = llama_lora()
    train(model, cfg(tmp_path, **conf), lm_examples(), lm_examples(4, seed=9), collate=collate, evaluate=evaluate,
          callback=lambda s, lg: snapshots.setdefault(s, adapter_tensors(model)) and s == 3 and _stop_at(3)(s, lg))
    model = llama_lora()
    m = train(model, cfg(tmp_path, resume=True, **conf), lm_examples(), lm_examples(4, seed=9), collate=collate,
              evaluate=evaluate)
    assert m["steps"] == 5 and m["best_step"] == 1 and m["eval_accuracy"] == 0.9
    assert_same(adapter_tensors(model), snapshots[1])


def test_early_stopping_lower_is_better(tmp_path):
    model = llama_lora()
    m = train(model, cfg(tmp_path, lr=0.0, max_steps=20, eval_every=1, early_stopping_patience=3), lm_examples(),
              lm_examples(4, seed=9), collate=collate)
    assert m["steps"] == 4 and m["best_step"] == 1  # lr 0: eval_loss never improves after the first eval


# -- outputs ------------------------------------------------------------------------------------------
def test_outputs_written(tmp_path):
    model = llama_lora()
    m = train(model, cfg(tmp_path, max_steps=4, log_every=2, eval_every=2), lm_examples(), lm_examples(4, seed=5),
              collate=collate)
    out = tmp_path / "run"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss" in r, "eval_loss" in r) for r in lines] == [(2, True, False), (2, False, True),
                                                                           (4, True, False), (4, False, True)]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "epoch"} <= set(lines[0])
    final = json.loads((out / "metrics.json").read_text())
    assert {"steps", "train_seconds", "peak_memory_mb", "trainable_params", "eval_loss", "eval_perplexity",
            "train_loss"} <= set(final)
    assert final == m and final["trainable_params"] == sum(p.numel() for p in peftkit.adapter_parameters(model).values())
    assert final["peak_memory_mb"] > 10
    report_md = (out / "report.md").read_text()
    assert "| eval_loss |" in report_md and "| lr | 0.01 |" in report_md
    assert (out / "adapter" / "adapter.safetensors").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "curves.png").exists()
    else:
        assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_extra_head_trained_saved_and_reloaded(tmp_path):
    model, _, _ = tiny_bert(0)
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=["query", "value"]))
    head_before = model.classifier.weight.detach().clone()
    data = cls_examples()
    m = train(model, cfg(tmp_path, max_steps=3), data, data[:4], collate=collate, trainable_extra=["classifier"])
    assert not torch.equal(model.classifier.weight, head_before)
    assert m["trainable_params"] == sum(p.numel() for p in peftkit.adapter_parameters(model).values()) + 32 * 3 + 3
    model.eval()
    x = collate(data[:4], 4, False, 0)[0]
    x.pop("labels")
    ref = model(**x).logits
    fresh, _, _ = tiny_bert(0)
    peftkit.load(fresh, tmp_path / "run" / "adapter")
    load_extra(fresh, tmp_path / "run" / "adapter")
    assert torch.allclose(fresh.eval()(**x).logits, ref, atol=1e-6)
    with pytest.raises(peftkit.ConfigError, match=r"classifer.*classifier"):
        train(model, cfg(tmp_path, "bad"), data, collate=collate, trainable_extra=["classifer"])


def test_head_lr_is_the_lr_of_the_extra_modules(tmp_path):
    """Adam's first step moves every parameter by its group's lr (m/√v = ±1): the head by head_lr, the adapter
    by lr."""
    model, _, _ = tiny_bert(0)
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():  # every LoRA parameter gets a gradient from step 1
        for name, p in peftkit.adapter_parameters(model).items():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    head0, ad0 = model.classifier.weight.detach().clone(), adapter_tensors(model)
    train(model, cfg(tmp_path, max_steps=1, lr=1e-4, head_lr=1e-2, max_grad_norm=None), cls_examples(),
          collate=collate, trainable_extra=["classifier"])
    head_step = (model.classifier.weight.detach() - head0).abs()
    assert head_step.max() == pytest.approx(1e-2, rel=1e-2) and head_step.min() > 0.5e-2
    ad_step = max(float((v - ad0[k]).abs().max()) for k, v in adapter_tensors(model).items())
    assert ad_step == pytest.approx(1e-4, rel=1e-2)


def test_eval_each_epoch_and_early_stopping_said_on_stdout(tmp_path, capsys):
    model, _, _ = tiny_bert(0)
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=["query", "value"]))
    data = cls_examples(12)  # batch 4: 3 steps per epoch
    train(model, cfg(tmp_path, max_steps=None, epochs=2, eval_each_epoch=True), data, data[:4], collate=collate,
          trainable_extra=["classifier"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    capsys.readouterr()
    train(llama_lora(), cfg(tmp_path, "stop", lr=0.0, max_steps=20, eval_every=1, early_stopping_patience=3),
          lm_examples(), lm_examples(4, seed=9), collate=collate)
    out = capsys.readouterr().out
    assert "early stopping at step 4/20: eval_loss has not improved" in out and "(step 1) for 3 evaluations" in out


def test_progress_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    train(llama_lora(), cfg(tmp_path, max_steps=2, progress=True), lm_examples(), collate=collate)
    err = capsys.readouterr().err
    assert "train" in err and "loss" in err and "tok_s" in err
    monkeypatch.undo()


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """Under nohup, CI or a log file (stderr not a terminal) a plain line every log_every steps: step, loss,
    tokens/s and ETA."""
    train(llama_lora(), cfg(tmp_path, max_steps=4, log_every=2, progress=None), lm_examples(), collate=collate)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"], lines
    assert all("loss" in line and "tok/s" in line and "ETA" in line for line in lines)
    train(llama_lora(), cfg(tmp_path, "quiet", max_steps=2), lm_examples(), collate=collate)
    assert capsys.readouterr().err == ""


def test_bad_config_errors(tmp_path):
    with pytest.raises(peftkit.ConfigError, match=r"schedule.*cosine"):
        train(llama_lora(), cfg(tmp_path, schedule="cosin"), lm_examples(), collate=collate)
    with pytest.raises(peftkit.ConfigError, match="grad_accum"):
        train(llama_lora(), cfg(tmp_path, grad_accum=0), lm_examples(), collate=collate)
    with pytest.raises(peftkit.ConfigError, match="max_step"):
        TrainConfig.from_dict({"output": "x", "max_step": 3})
    model, _, _ = tiny_llama(0)
    with pytest.raises(peftkit.ConfigError, match="nothing to train"):
        train(model, cfg(tmp_path), lm_examples(), collate=collate)
    assert not (tmp_path / "run").exists()


# -- two processes -------------------------------------------------------------------------------------
WORKER = """
import sys, torch
from safetensors.torch import save_file
sys.path.insert(0, {root!r})
import peftkit
from peftkit.train import TrainConfig, train
from tests.test_train import collate, llama_lora, lm_examples, adapter_tensors
from peftkit.train.loop import default_evaluate
model = llama_lora()
cfg = TrainConfig(output={out!r}, lr=1e-2, batch_size=2, max_steps=3, log_every=1, progress=False, grad_accum={ga},
                  eval_every=2, save_every=3)
rank = int(__import__("os").environ["RANK"])
calls, rng_at_3 = [], []
def evaluate(m, b):
    calls.append(1)
    return default_evaluate(m, b)
def callback(step, logs):
    if step == 3:
        rng_at_3.append(torch.get_rng_state().clone())
    torch.rand(rank + 1)  # the ranks' RNG streams drift apart, as with dropout on different shards
metrics = train(model, cfg, lm_examples(12), lm_examples(4), collate=collate, evaluate=evaluate, callback=callback)
save_file({{**adapter_tensors(model), "rng": rng_at_3[0], "evals": torch.tensor(len(calls)),
           "eval_loss": torch.tensor(metrics["eval_loss"])}}, {out!r} + f"/rank{{rank}}.safetensors")
torch.distributed.destroy_process_group()
"""


def test_two_process_ddp_matches_single_process(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    out.mkdir()
    run_two_ranks(textwrap.dedent(WORKER.format(root=str(ROOT), out=str(out), ga=2)), timeout=120)
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    # evaluation runs on rank 0 only (twice: steps 2 and 3) and every rank gets its metrics
    assert int(r0.pop("evals")) == 2 and int(r1.pop("evals")) == 0
    assert float(r0.pop("eval_loss")) == float(r1.pop("eval_loss"))
    # the checkpoint keeps each rank's own RNG state, and resuming gives each rank its own back
    rng0, rng1 = r0.pop("rng"), r1.pop("rng")
    assert not torch.equal(rng0, rng1)
    from peftkit.train import checkpoint

    saved = torch.load(out / "checkpoint" / checkpoint.RANK_RNG_FILE, weights_only=True)
    assert torch.equal(saved[0]["torch"], rng0) and torch.equal(saved[1]["torch"], rng1)
    for rank, want in ((0, rng0), (1, rng1)):
        m = llama_lora()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        st = checkpoint.load(out / "checkpoint", m, {}, opt, sched, rank=rank)
        assert torch.equal(st["rng"]["torch"], want)
    assert_same(r0, r1)
    assert (out / "metrics.json").is_file() and (out / "adapter" / "adapter.safetensors").is_file()
    single = llama_lora()
    train(single, cfg(tmp_path, "single", lr=1e-2, batch_size=4, grad_accum=2, max_steps=3), lm_examples(12), collate=collate)
    assert_same(adapter_tensors(single), r0, atol=1e-6)
