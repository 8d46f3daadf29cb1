"""The training loop: :func:`train` fits the trainable parameters of a model that carries adapters.

One optimizer step = ``grad_accum`` micro-batches; the loss of each micro-batch is divided by the
number of micro-batches in the step (the mean of micro-batch losses), so ``grad_accum=2`` with batch
``b`` gives the same gradient as one batch ``2b`` when every micro-batch holds the same number of
loss tokens. Then: gradient clipping (``max_grad_norm``), AdamW, the lr schedule.

The data position is ``(epoch, index of the next micro-batch)``; the batches of epoch ``e`` are
``collate(train_examples, batch_size × world_size, True, seed + e)``, so a resumed run rebuilds the
same batches and skips to the position. With the RNG states, optimizer, scheduler and adapter
tensors restored from the checkpoint, a resumed run is bit-for-bit the run it continues.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import hooks
from ..core.api import adapter_parameters
from ..core.errors import ConfigError, did_you_mean
from ..core.saved_modules import SavedModule, copy_parameters
from ..core.sharding import full_state, is_distributed, scalar
from . import checkpoint, distributed, report
from .config import TrainConfig
from .loss import model_loss
from .schedule import make_scheduler

Batch = dict[str, torch.Tensor]
Collate = Callable[[Sequence[Any], int, bool, int], list[Batch]]
Evaluate = Callable[[nn.Module, list[Batch]], dict[str, float]]


def train(model: nn.Module, config: TrainConfig, train_examples: Sequence[Any], eval_examples: Sequence[Any] | None = None,
          collate: Collate | None = None, evaluate: Evaluate | None = None, trainable_extra: Sequence[str] = (),
          pad_id: int = 0, callback: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train the adapter(s) attached to ``model`` (and the ``trainable_extra`` modules); return the final metrics.

    Args:
        model: a model with adapters attached (``peftkit.attach``); called as ``model(**batch)``, it must
            return an object or dict with a ``loss`` (transformers models do when the batch has ``labels``).
        config: the :class:`TrainConfig`; ``config.output`` receives every output.
        train_examples, eval_examples: examples in whatever form ``collate`` takes.
        collate: ``collate(examples, batch_size, shuffle, seed) -> list[dict[str, Tensor]]``, the batches of
            one pass over ``examples``; it must be deterministic given its arguments. Training calls it
            once per epoch with ``shuffle=True, seed=config.seed + epoch`` and ``batch_size`` = the global
            batch (per-rank batch × world size); evaluation with ``shuffle=False``. Default:
            ``peftkit.data.batches`` with ``pad_id``.
        evaluate: ``evaluate(model, eval_batches) -> {name: value}``, run under ``torch.no_grad`` in eval
            mode; names without the ``eval_`` prefix get it. Default: token-weighted mean loss
            (``eval_loss``) and ``eval_perplexity``.
        trainable_extra: names of modules trained alongside the adapter whose weights are not part of it;
            their parameters are unfrozen, checkpointed and saved to ``OUTPUT/adapter/extra.safetensors``
            (reload with :func:`peftkit.train.load_extra`). ``--method full`` uses it; a head trained *with*
            an adapter belongs in the adapter's ``modules_to_save`` instead (saved, exported, merged and served
            with it). ``config.head_lr`` applies to both kinds.
        pad_id: padding token id for the default collate.
        callback: ``callback(step, logs)`` after every optimizer step (``logs``: loss, lr, grad_norm and
            the eval metrics when evaluated at that step). Raising ``KeyboardInterrupt`` there behaves as Ctrl-C.

    Outputs: ``metrics.jsonl`` (a line per log and per evaluation), ``metrics.json``, ``report.md``,
    ``curves.png`` (needs matplotlib), ``adapter/`` (the best adapter by ``config.metric`` when there is
    evaluation data, else the final one) and ``checkpoint/`` (every ``save_every`` steps and on Ctrl-C).
    Under ``torchrun`` only rank 0 writes. Ctrl-C saves a checkpoint and returns with ``interrupted=True``.
    """
    config.validate()
    run = _Run(model, config, train_examples, collate or _default_collate(pad_id), evaluate, trainable_extra)
    run.restore_or_seed()
    run.prepare(eval_examples)
    interrupted = False
    run.memory = (_memory_hook(model, run.collate, train_examples, config, run.info, run.device)
                  if run.s["step"] == 0 else None)
    try:
        while run.s["step"] < run.total and not run.s["stopped_early"]:
            logs = run.optimizer_step()
            run.after_step(logs)
            if callback is not None:
                callback(run.s["step"], logs)
    except KeyboardInterrupt:
        interrupted = True
        run.on_interrupt()
    finally:
        run.bar.close()
    return run.finish(interrupted)


class _Run:
    """One training run, in the order :func:`train` calls its steps: set up (``__init__``: distributed setup,
    trainable parameters, optimizer, schedule), :meth:`restore_or_seed`, :meth:`prepare`, then per optimizer
    step :meth:`optimizer_step` and :meth:`after_step` (logging, evaluation, early stopping, checkpoints),
    and :meth:`finish` (final evaluation, best adapter, outputs).

    ``s`` is the state a checkpoint holds: step, data position ``(epoch, pos)``, metric history, best metric.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_examples: Sequence[Any], collate: Collate,
                 evaluate: Evaluate | None, trainable_extra: Sequence[str]) -> None:
        self.model, self.config, self.collate, self.evaluate = model, config, collate, evaluate
        self.train_examples = train_examples
        self.info = info = distributed.setup(model)
        self.output = Path(config.output)
        extra = _unfreeze_extra(model, trainable_extra)
        if not any(p.requires_grad for p in adapter_parameters(model).values()) and not extra:
            raise ConfigError("nothing to train: the model has no trainable adapter parameters (attach an adapter first)")
        if config.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        self.sharded = config.fsdp and info.enabled
        if self.sharded:  # FSDP2 replaces every parameter by a sharded one: look them up again afterwards
            distributed.fully_shard_model(model)
            named = dict(model.named_parameters())
            extra = {k: named[k] for k in extra}
        self.extra = extra
        self.params = [p for p in adapter_parameters(model).values() if p.requires_grad] + list(extra.values())
        self.device = next(model.parameters()).device
        self.global_batch = config.batch_size * info.world_size
        n_batches = len(collate(train_examples, self.global_batch, True, config.seed))
        if n_batches == 0:
            raise ConfigError("no training batches: the training data is empty")
        self.steps_per_epoch = math.ceil(n_batches / config.grad_accum)
        self.total = config.max_steps or config.epochs * self.steps_per_epoch
        # the head's rate (head_lr) for trainable_extra modules and the adapters' modules_to_save copies alike
        head = list(extra.values()) + copy_parameters(model)
        self.optimizer = _optimizer(model, config, self.params, head)
        self.scheduler = make_scheduler(self.optimizer, config.schedule, config.warmup, self.total)
        self.s: dict[str, Any] = {"step": 0, "epoch": 0, "pos": 0, "history": [], "best": None, "best_step": None,
                                  "bad_evals": 0, "train_seconds": 0.0, "tokens": 0, "stopped_early": False,
                                  "window": [0.0, 0, 0]}  # train loss sum, steps and tokens since the last log line
        self.best_tensors: dict[str, torch.Tensor] | None = None

    def restore_or_seed(self) -> None:
        """Continue from the checkpoint in the output directory (``resume``), else seed every RNG."""
        config, info = self.config, self.info
        ckpt = checkpoint.find(self.output) if config.resume else None
        if config.resume and ckpt is None and info.is_main:
            warnings.warn(f"resume: no checkpoint in {self.output}; starting from scratch", stacklevel=3)
        if ckpt is not None:
            _check_resumable(ckpt, config, info)
            loaded = checkpoint.load(ckpt, self.model, self.extra, self.optimizer, self.scheduler, rank=info.rank)
            rng = loaded.pop("rng")
            self.s.update({k: v for k, v in loaded.items() if k in self.s})
            if (ckpt / "best.safetensors").is_file():
                self.best_tensors = checkpoint.read_safetensors(ckpt / "best.safetensors")
            checkpoint.restore_rng(rng)
        else:
            random.seed(config.seed)
            np.random.seed(config.seed % 2**32)
            torch.manual_seed(config.seed)
        if info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            report.rewrite_jsonl(self.output / "metrics.jsonl", self.s["history"])

    def prepare(self, eval_examples: Sequence[Any] | None) -> None:
        """Evaluation batches, the DDP wrapper, the progress display and the clocks."""
        config, info, s = self.config, self.info, self.s
        self.eval_batches = self.collate(eval_examples, config.batch_size, False, config.seed) if eval_examples else None
        self.net = self.model if self.sharded else distributed.wrap(self.model, info)
        self.was_training = self.model.training
        self.model.train()
        # a bar on a terminal, else (a log file, CI) a plain line every log_every steps
        self.bar = report.Progress(self.total, s["step"], config.progress is not False and info.is_main,
                                   config.log_every, bar=sys.stderr.isatty())
        self.resume_point = {"epoch": s["epoch"], "pos": s["pos"], "rng": checkpoint.capture_rng()}
        self.epoch_batches: tuple[int, list[Batch]] | None = None
        evals = [r["step"] for r in s["history"] if any(k.startswith("eval_") for k in r)]
        self.last_eval_step = evals[-1] if evals else None
        self.window_start = self.start = time.monotonic()

    def _batches(self) -> list[Batch]:
        """The batches of the current epoch (built once per epoch, deterministic given the seed)."""
        epoch = self.s["epoch"]
        if self.epoch_batches is None or self.epoch_batches[0] != epoch:
            self.epoch_batches = (epoch, self.collate(self.train_examples, self.global_batch, True,
                                                      self.config.seed + epoch))
        return self.epoch_batches[1]

    def optimizer_step(self) -> dict[str, float]:
        """Forward and backward over the next ``grad_accum`` micro-batches, clip, step; ``{loss, lr, grad_norm}``."""
        config, info, s = self.config, self.info, self.s
        batches = self._batches()
        end = min(s["pos"] + config.grad_accum, len(batches))
        micro = [distributed.shard(batches[i], info) for i in range(s["pos"], end)]
        micro = [_to_device(b, self.device) for b in micro if b is not None]
        loss_sum, tokens = 0.0, 0
        step, total, model = s["step"], self.total, self.model
        scheduled = bool(hooks.training_hooks(model))  # AdaLoRA, DyLoRA, ...: see peftkit.core.hooks
        if scheduled:
            hooks.before_step(model, step, total, self.optimizer)
        for i, b in enumerate(micro):
            last = i == len(micro) - 1
            if self.sharded:
                self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
            sync = contextlib.nullcontext() if not info.enabled or self.sharded or last else self.net.no_sync()
            with sync:
                loss = model_loss(self.net, b, chunked=config.chunked_loss and not info.enabled)
                reg = hooks.regularization_loss(model, step, total) if scheduled else 0.0
                ((loss + reg) / len(micro)).backward()
            loss_sum += loss.item()
            tokens += _count_tokens(b)
        if scheduled:
            hooks.after_backward(model, step, total, self.optimizer)
        if config.max_grad_norm is not None:
            grad_norm = scalar(torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm))
        else:
            grad_norm = scalar(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
        lr = self.optimizer.param_groups[0]["lr"]
        if micro:
            self.optimizer.step()
        if scheduled:
            hooks.after_step(model, step, total, self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        s["step"] += 1
        s["pos"] = end
        self.epoch_fraction = round(s["epoch"] + end / len(batches), 4)
        if end >= len(batches):
            s["epoch"], s["pos"] = s["epoch"] + 1, 0
        self.resume_point = {"epoch": s["epoch"], "pos": s["pos"], "rng": checkpoint.capture_rng()}
        s["tokens"] += tokens * info.world_size
        self.step_tokens = tokens
        return {"loss": loss_sum / max(1, len(micro)), "lr": lr, "grad_norm": grad_norm}

    def after_step(self, logs: dict[str, float]) -> None:
        """Log every ``log_every`` steps, evaluate every ``eval_every`` (early stopping), checkpoint every
        ``save_every``; ``logs`` receives the eval metrics."""
        config, info, s = self.config, self.info, self.s
        w = s["window"]
        w[0], w[1], w[2] = w[0] + logs["loss"], w[1] + 1, w[2] + self.step_tokens
        tok_s = w[2] * info.world_size / max(1e-9, time.monotonic() - self.window_start)
        if s["step"] % config.log_every == 0 or s["step"] == self.total:
            self._log({"step": s["step"], "epoch": self.epoch_fraction,
                       "loss": distributed.mean_across(w[0] / w[1], info),
                       "lr": logs["lr"], "grad_norm": logs["grad_norm"], "tokens_per_s": round(tok_s, 1)})
            s["window"], self.window_start = [0.0, 0, 0], time.monotonic()
        epoch_end = config.eval_each_epoch and s["pos"] == 0
        if self.eval_batches is not None and (epoch_end or (config.eval_every and s["step"] % config.eval_every == 0)):
            logs.update(self.run_eval())
            patience = config.early_stopping_patience
            s["stopped_early"] = patience is not None and s["bad_evals"] >= patience
            if s["stopped_early"] and info.is_main:
                print(f"early stopping at step {s['step']}/{self.total}: {config.metric} has not improved on "
                      f"{_fmt(s['best'])} (step {s['best_step']}) for {patience} evaluations "
                      f"(early_stopping_patience={patience})", flush=True)
        if config.save_every and s["step"] % config.save_every == 0:
            self.save_checkpoint()
            distributed.barrier(info)
        self.bar.update(s["step"], logs["loss"], tok_s)

    def run_eval(self) -> dict[str, float]:
        """Evaluate, log, and keep a copy of the trained tensors when ``config.metric`` improved."""
        config, s = self.config, self.s
        if self.sharded:  # a sharded forward needs every rank
            metrics = _evaluate(self.model, self.eval_batches, self.evaluate, self.device)
        else:
            metrics = distributed.from_main(lambda: _evaluate(self.model, self.eval_batches, self.evaluate,
                                                              self.device), self.info)
        self.model.train()
        self.last_eval_step = s["step"]
        value = metrics.get(config.metric)
        if value is None:
            raise ConfigError(f"metric {config.metric!r} is not among the eval metrics"
                              f"{did_you_mean(config.metric, metrics)}: {', '.join(metrics)}")
        better = s["best"] is None or (value < s["best"] if config.lower_is_better else value > s["best"])
        if better:
            s.update(best=value, best_step=s["step"], bad_evals=0)
            self.best_tensors = {k: v.detach().clone()
                                 for k, v in checkpoint.trained_tensors(self.model, self.extra).items()}
        else:
            s["bad_evals"] += 1
        self._log({"step": s["step"], **metrics})
        return metrics

    def save_checkpoint(self) -> None:
        info = self.info
        state = dict(self.s)
        state.update(epoch=self.resume_point["epoch"], pos=self.resume_point["pos"], config=self.config.to_dict(),
                     world_size=info.world_size)
        if self.sharded:  # refused by TrainConfig.validate, except on Ctrl-C
            if info.is_main:
                print("fsdp: no checkpoint is written under FSDP", file=sys.stderr)
            return
        rank_rngs = distributed.gather(self.resume_point["rng"], info) if info.enabled else None
        if info.is_main:
            state["train_seconds"] = self.s["train_seconds"] + time.monotonic() - self.start
            checkpoint.save(self.output, self.model, self.extra, self.optimizer, self.scheduler, state,
                            self.resume_point["rng"], self.best_tensors, rank_rngs)

    def on_interrupt(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.info.is_main:
            print(f"\ninterrupted: checkpoint saved in {self.output / checkpoint.CHECKPOINT} "
                  "(continue with resume=True / --resume)", file=sys.stderr)
        self.save_checkpoint()

    def finish(self, interrupted: bool) -> dict[str, Any]:
        """The final evaluation and checkpoint, the best adapter restored, the outputs written; the metrics."""
        config, s = self.config, self.s
        s["train_seconds"] += time.monotonic() - self.start
        if not interrupted:
            if self.eval_batches is not None and self.last_eval_step != s["step"]:
                self.run_eval()
            if config.save_every and s["step"] % config.save_every != 0:
                self.save_checkpoint()
        last_eval = next((r for r in reversed(s["history"]) if config.metric in r), None)
        if not interrupted and self.best_tensors is not None and s["best_step"] != s["step"]:
            checkpoint.restore_trained(self.model, self.extra, self.best_tensors, "best adapter")
            last_eval = next(r for r in s["history"] if config.metric in r and r["step"] == s["best_step"])
        metrics = _final_metrics(s, config, self.params, self.device, last_eval, interrupted)
        if getattr(self, "memory", None):
            metrics["memory"] = self.memory
        if self.info.is_main or self.sharded:  # under FSDP every rank takes part in gathering the adapter
            _write_outputs(self.model, self.extra, self.output, metrics, config, s["history"], self.info.is_main)
        distributed.barrier(self.info)
        self.model.train(self.was_training)
        return metrics

    def _log(self, record: dict[str, Any]) -> None:
        self.s["history"].append(record)
        if self.info.is_main:
            report.append_jsonl(self.output / "metrics.jsonl", record)


RESUME_KEYS = ("batch_size", "grad_accum", "seed", "schedule", "warmup", "lr", "max_steps", "epochs")


def _check_resumable(ckpt: Path, config: TrainConfig, info: distributed.DistInfo) -> None:
    """A checkpoint continues bit-for-bit only with the same data order and schedule: refuse other settings."""
    saved = checkpoint.read_json(ckpt / "state.json")
    old = saved.get("config", {})
    changed = [f"{k}: {old[k]!r} -> {getattr(config, k)!r}" for k in RESUME_KEYS if k in old and old[k] != getattr(config, k)]
    if saved.get("world_size", 1) != info.world_size:
        changed.append(f"world size: {saved.get('world_size', 1)} -> {info.world_size}")
    if changed:
        raise ConfigError(f"resume: {ckpt} was written with other settings ({'; '.join(changed)}); "
                          "use the same settings or another output directory")


def _final_metrics(s: dict[str, Any], config: TrainConfig, params: list[nn.Parameter], device: torch.device,
                   last_eval: dict[str, Any] | None, interrupted: bool) -> dict[str, Any]:
    train_logs = [r for r in s["history"] if "loss" in r]
    metrics: dict[str, Any] = {
        "steps": s["step"],
        "epochs": round(next((r["epoch"] for r in reversed(train_logs)), float(s["epoch"])), 4),
        "train_loss": train_logs[-1]["loss"] if train_logs else None,
        "train_seconds": round(s["train_seconds"], 3),
        "tokens_per_s": round(s["tokens"] / max(1e-9, s["train_seconds"]), 1),
        "peak_memory_mb": round(report.peak_memory_mb(device), 1),
        "trainable_params": sum(p.numel() for p in params),
    }
    if last_eval is not None:
        metrics.update({k: v for k, v in last_eval.items() if k != "step"})
        metrics.update(best_step=s["best_step"], best_metric=s["best"], stopped_early=s["stopped_early"])
    metrics["interrupted"] = interrupted
    return metrics


def _write_outputs(model: nn.Module, extra: dict[str, nn.Parameter], output: Path, metrics: dict[str, Any],
                   config: TrainConfig, history: list[dict[str, Any]], main: bool = True) -> None:
    """The adapter, extra weights, metrics, plot and report. Under FSDP every rank calls this (the adapter and
    extra tensors are gathered) and only the ``main`` rank writes."""
    from ..core.model import adapter_names
    from ..io import save

    if adapter_names(model):
        save(model, output / "adapter")
    full_extra = full_state(dict(extra))
    if not main:
        return
    checkpoint.write_files(checkpoint.save_extra(full_extra, output / "adapter"))
    report.write_metrics_json(output / "metrics.json", metrics)
    report.plot_curves(output / "curves.png", history, config.metric)
    report.write_report(output / "report.md", metrics, config.to_dict(), history)
    if metrics.get("memory"):
        from ..memory import append_memory_section

        append_memory_section(output / "report.md", metrics["memory"], metrics.get("peak_memory_mb"))


def _memory_hook(model: nn.Module, collate: Collate, examples: Sequence[Any], config: TrainConfig,
                 info: distributed.DistInfo, device: torch.device) -> dict[str, Any] | None:
    """``peftkit.memory_report`` of the first batch (single process only), for report.md."""
    if info.enabled:
        return None
    from ..memory import memory_report

    first = collate(examples[: config.batch_size], config.batch_size, False, config.seed)
    if not first:
        return None
    with torch.random.fork_rng(devices=[]):  # dropout in this forward must not shift the training's randomness
        return memory_report(model, _to_device(first[0], device), chunked_loss=config.chunked_loss).as_dict()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _unfreeze_extra(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    modules = dict(model.named_modules())
    out: dict[str, nn.Parameter] = {}
    for name in names:
        if name not in modules:
            raise ConfigError(f"trainable_extra: no module named {name!r} in {type(model).__name__}"
                              f"{did_you_mean(name, [n for n in modules if n])}")
        saved = [n for n, m in modules[name].named_modules() if isinstance(m, SavedModule)]
        if saved:
            raise ConfigError(f"trainable_extra: {name!r} is in an adapter's modules_to_save ({name}.{saved[0]}): its "
                              "copy trains with the adapter already; leave it out of trainable_extra")
        for pname, p in modules[name].named_parameters():
            p.requires_grad_(True)
            out[f"{name}.{pname}" if name else pname] = p  # "" is the whole model (full fine-tuning)
    return out


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing: gradients reach adapters even though the inputs need none."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} has no gradient_checkpointing_enable() "
                          "(a transformers model is needed)")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = getattr(model, "config", None)
    if getattr(cfg, "use_cache", False):
        cfg.use_cache = False


def _optimizer(model: nn.Module, config: TrainConfig, params: list[nn.Parameter],
               extra: list[nn.Parameter]) -> torch.optim.Optimizer:
    ids = {id(p) for p in extra}
    if config.loraplus_ratio is not None:
        from ..methods.lora import lora_plus_param_groups

        if any(g.get("lr", config.lr) != config.lr for g in hooks.param_groups(model, params, config.lr)):
            raise ConfigError("loraplus_ratio sets its own learning rates and cannot be combined with a method's "
                              "per-part rates (DePT lowrank_lr, L4Q/LR-QAT scale_lr), which LoRA+ would ignore: "
                              "drop one of them")

        groups = lora_plus_param_groups(model, config.lr, config.loraplus_ratio, config.weight_decay)
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
        if extra:
            groups.append({"params": extra, "lr": config.head_lr if config.head_lr is not None else config.lr,
                           "weight_decay": config.weight_decay})
    else:
        groups = hooks.param_groups(model, [p for p in params if id(p) not in ids], config.lr)  # DePT: two rates
        if extra:
            groups.append({"params": extra, "lr": config.head_lr if config.head_lr is not None else config.lr})
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _default_collate(pad_id: int) -> Collate:
    from ..data import batches  # type: ignore[attr-defined]

    def collate(examples: Sequence[Any], batch_size: int, shuffle: bool, seed: int) -> list[Batch]:
        return batches(examples, batch_size, pad_id=pad_id, shuffle=shuffle, seed=seed)

    return collate


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _count_tokens(batch: Batch) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    first = next((v for v in batch.values() if torch.is_tensor(v)), None)
    return int(first.numel()) if first is not None else 0


def default_evaluate(model: nn.Module, batches: list[Batch]) -> dict[str, float]:
    """Mean loss weighted by loss tokens (shifted labels != -100 for token labels, rows otherwise) and its exp."""
    total, weight = 0.0, 0
    for b in batches:
        labels = b.get("labels")
        if labels is None:
            n = 1
        elif labels.ndim > 1:
            n = int((labels[..., 1:] != -100).sum())
        else:
            n = labels.shape[0]
        total += model_loss(model, b, chunked=not is_distributed()).item() * n
        weight += n
    loss = total / max(1, weight)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def _evaluate(model: nn.Module, batches: list[Batch], evaluate: Evaluate | None, device: torch.device) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        raw = (evaluate or default_evaluate)(model, [_to_device(b, device) for b in batches])
    return {(k if k.startswith("eval_") else f"eval_{k}"): float(v) for k, v in raw.items()}
