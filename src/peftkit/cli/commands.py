"""The command implementations. Each validates everything (files, columns, method options) before it
loads a model or writes a file, and raises :class:`~peftkit.core.errors.ConfigError` on bad input."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError
from ..data import check_prompt_format
from . import tasks
from .options import build_config, parse_method_flags

TRAIN_KEYS = {"model", "task", "method", "data", "eval_data", "output", "columns", "epochs", "max_steps", "batch_size",
              "grad_accum", "lr", "warmup", "seed", "max_length", "eval_every", "save_every", "early_stopping_patience",
              "weight_decay", "max_grad_norm", "loraplus_ratio", "log_every", "schedule", "metric",
              "gradient_checkpointing", "resume", "exact_match", "prompt_format", "max_new_tokens", "fsdp",
              "quantize", "optimizer"}


def _columns(spec: Any) -> dict[str, str] | None:
    if not spec:
        return None
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    out = {}
    for part in str(spec).split(","):
        if "=" not in part:
            raise ConfigError(f"--columns: {part!r} is not name=column (e.g. text=sentence)")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def train_settings(args: argparse.Namespace, extra: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, method options)`` from the YAML file (if any) overridden by the flags."""
    settings: dict[str, Any] = {}
    method_opts: dict[str, Any] = {}
    config_file = extra.pop(0) if extra and not extra[0].startswith("-") else None
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        import yaml

        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value")
        for k, v in loaded.items():
            key = str(k).replace("-", "_")
            if key in TRAIN_KEYS:
                settings[key] = v
            elif key in ("method_options", "options") and isinstance(v, dict):
                method_opts.update({str(a).replace("-", "_"): b for a, b in v.items()})
            else:
                method_opts[key] = v
    for key in TRAIN_KEYS:
        v = getattr(args, key, None)
        if v is not None:
            settings[key] = v
    method_opts.update(parse_method_flags(extra))
    for required in ("model", "task", "method", "data", "output"):
        if not settings.get(required):
            raise ConfigError(f"--{required.replace('_', '-')} is required (as a flag or in the config file)")
    tasks.check_task(settings["task"])
    return settings, method_opts


def train(args: argparse.Namespace, extra: list[str]) -> int:
    from ..core.api import attach
    from ..core.summary import summary
    from ..data import load_records
    from ..train import TrainConfig
    from ..train import train as run_training
    from ..train.report import write_metrics_json

    s, method_opts = train_settings(args, extra)
    full = s["method"] == "full"  # full fine-tuning, for comparison: every parameter trains, no adapter
    if full and method_opts:
        raise ConfigError(f"--method full takes no method options (got --{next(iter(method_opts)).replace('_', '-')})")
    config = None if full else build_config(s["method"], method_opts)  # validated before anything heavy
    if s.get("quantize"):
        from ..quant.schemes import get_scheme

        get_scheme(s["quantize"])
        if full:
            raise ConfigError("--quantize needs an adapter method (lora, dora): a quantized base cannot train (--method full)")
    cols = _columns(s.get("columns"))
    records = load_records(s["data"], cols)
    eval_records = load_records(s["eval_data"], cols) if s.get("eval_data") else None
    tc_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in s.items() if k in tc_fields})
    tc.validate()
    max_length = int(s.get("max_length") or 256)
    task = s["task"]
    fmt = s.get("prompt_format")
    if fmt is not None and task != "causal-lm":
        raise ConfigError(f"--prompt-format applies to the causal-lm task, not {task}")

    # the tokenizer first: columns, labels and the prompt format are checked before the model is loaded
    tok = tasks.load_tokenizer(s["model"])
    fmt = check_prompt_format(fmt, tok) if task == "causal-lm" else None
    ex, labels = tasks.examples(task, records, tok, max_length, prompt_format=fmt)
    eval_ex = tasks.examples(task, eval_records, tok, max_length, labels, fmt)[0] if eval_records else None
    model, tok = tasks.load_model(s["model"], task, num_labels=len(labels) if labels else None, seed=tc.seed, tok=tok)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}
    if s.get("quantize"):  # QLoRA: the frozen base in nf4 / int8 (peftkit.quant), adapters on top
        from ..quant import quantize

        quantize(model, s["quantize"])
    if config is not None:
        attach(model, config)
        print(summary(model))
        extra_modules = [tasks.head_name(model)] if task == "classification" else []
    else:
        extra_modules = [""]
    if task == "classification":
        evaluate = tasks.classification_metrics
        if tc.metric == "eval_loss" and "metric" not in s:
            tc.metric = "eval_accuracy"
    else:
        evaluate = None
    metrics = run_training(model, tc, ex, eval_ex, evaluate=evaluate, trainable_extra=extra_modules,
                           pad_id=tok.pad_token_id or 0)
    out = Path(tc.output)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    sharded = tc.fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if task == "causal-lm" and s.get("exact_match") and eval_records and (main_rank or sharded):
        # under FSDP every rank generates (a sharded forward needs all of them); otherwise rank 0 alone
        n = int(s["exact_match"])
        metrics["eval_exact_match"] = tasks.exact_match(model, tok, eval_records[:n], s.get("max_new_tokens"),
                                                        prompt_format=fmt)
        if main_rank:
            write_metrics_json(out / "metrics.json", metrics)
    if not main_rank:  # under torchrun, rank 0 writes the outputs
        return 0
    info = {"task": task, "model": s["model"], "method": config.method if config else "full", "labels": labels,
            "max_length": max_length, "columns": cols, "prompt_format": fmt}
    tasks.write_task(out / "adapter", info)
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print("\n".join(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in shown.items()))
    print(f"adapter: {out / 'adapter'}   report: {out / 'report.md'}   curves: {out / 'curves.png'}")
    return 0


def _load_adapted(adapter: Path | None, info: dict[str, Any], model_name: str | None = None, tok: Any = None):
    """The base model (``model_name`` or the one recorded in ``info``) with the adapter of ``adapter`` loaded."""
    from ..core.state import load
    from ..train import load_extra

    task = info["task"]
    labels = info.get("labels")
    model, tok = tasks.load_model(model_name or info["model"], task, num_labels=len(labels) if labels else None,
                                  tok=tok)
    if adapter is not None and info.get("method") != "full":
        load(model, adapter)
    if adapter is not None and (adapter / "extra.safetensors").is_file():
        load_extra(model, adapter)
    return model.eval(), tok


def evaluate(args: argparse.Namespace, extra: list[str]) -> int:
    """Score an adapter directory — or, without one, the base model (``--model`` and ``--task``) — on a data set."""
    from ..data import batches, load_records
    from ..train import default_evaluate

    adapter = Path(args.adapter) if args.adapter else None
    if adapter is None:
        if not args.model or not args.task:
            raise ConfigError("give an adapter directory, or --model and --task to evaluate the base model")
        tasks.check_task(args.task)
        if args.task == "classification":
            raise ConfigError("a base model has no trained classification head: evaluate an adapter directory")
        info: dict[str, Any] = {"task": args.task, "model": args.model}
    else:
        if not adapter.is_dir():
            raise ConfigError(f"adapter directory {adapter} does not exist")
        if not (adapter / tasks.TASK_FILE).is_file() and args.model and args.task == "causal-lm":
            info = {"task": args.task, "model": args.model}  # saved by peftkit.save or by peft: no task record
        else:
            info = tasks.read_task(adapter)
        if args.task and args.task != info["task"]:
            raise ConfigError(f"--task {args.task}: the adapter was trained for {info['task']}")
    records = load_records(args.data, _columns(args.columns) or info.get("columns"))
    fmt = args.prompt_format if args.prompt_format is not None else info.get("prompt_format")
    tok = tasks.load_tokenizer(args.model or info["model"])
    if info["task"] == "causal-lm":
        fmt = check_prompt_format(fmt, tok)
    max_length = args.max_length or info.get("max_length") or 256
    ex, _ = tasks.examples(info["task"], records, tok, max_length, info.get("labels"), fmt)  # checked before loading
    model, tok = _load_adapted(adapter, info, args.model, tok)
    bl = batches(ex, args.batch_size, tok.pad_token_id or 0, shuffle=False, seed=0, bucket=False)
    with torch.no_grad():
        raw = tasks.classification_metrics(model, bl) if info["task"] == "classification" else default_evaluate(model, bl)
    metrics = {k if k.startswith("eval_") else f"eval_{k}": v for k, v in raw.items()}
    if info["task"] == "causal-lm" and args.exact_match:
        metrics["eval_exact_match"] = tasks.exact_match(model, tok, records[: args.exact_match], args.max_new_tokens,
                                                        batch_size=args.batch_size, prompt_format=fmt)
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}")
    return 0


def generate(args: argparse.Namespace, extra: list[str]) -> int:
    import sys

    from ..core.api import activate
    from ..core.state import load
    from ..data import prompt_ids

    dirs = [Path(a) for a in args.adapter]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"adapter directory {d} does not exist")
    infos = [tasks.read_task(d) for d in dirs if (d / tasks.TASK_FILE).is_file()]
    model_name = args.model or (infos[0]["model"] if infos else None)
    if not model_name:
        raise ConfigError("--model is required when no adapter records its base model")
    fmt = "chat" if args.chat else (args.prompt_format or next((i.get("prompt_format") for i in infos), None))
    tok = tasks.load_tokenizer(model_name)  # the name and the prompt format are checked before the model loads
    fmt = check_prompt_format(fmt, tok)
    model, tok = tasks.load_model(model_name, "causal-lm", tok=tok)
    names = []
    for i, d in enumerate(dirs):
        name = f"a{i}"
        load(model, d, name=name)
        names.append(name)
    if names:
        activate(model, names)
    model.eval()
    prompts = [args.prompt] if args.prompt is not None else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for p in prompts:
        ids = torch.tensor(prompt_ids(tok, [p], fmt))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def info(args: argparse.Namespace, extra: list[str]) -> int:
    from ..core.summary import format_table

    d = Path(args.adapter)
    if not d.is_dir():
        raise ConfigError(f"adapter directory {d} does not exist")
    rows = []
    for sub in [d, *sorted(p for p in d.iterdir() if p.is_dir())]:
        meta = _describe(sub)
        if meta:
            rows.append(meta)
    if not rows:
        raise ConfigError(f"{d} holds no adapter (no peftkit_adapter.json or adapter_config.json)")
    print(format_table(["path", "format", "method", "modules", "tensors", "parameters", "options"], rows))
    task = d / tasks.TASK_FILE
    if task.is_file():
        t = json.loads(task.read_text())
        print(f"task: {t.get('task')}  base model: {t.get('model')}" + (f"  labels: {t['labels']}" if t.get("labels") else ""))
    return 0


def _describe(d: Path) -> list[str] | None:
    from ..core.files import read_json, read_safetensors

    if (d / "peftkit_adapter.json").is_file():
        meta = read_json(d / "peftkit_adapter.json")
        cfg = {k: v for k, v in meta.get("config", {}).items() if k not in ("method", "target_modules", "exclude_modules")}
        n = sum(_numel(t["shape"]) for t in meta.get("tensors", {}).values())
        return [str(d), "peftkit", meta.get("method", "?"), str(len(meta.get("targets", []))), str(len(meta.get("tensors", {}))),
                f"{n:,}", _short(cfg)]
    if (d / "adapter_config.json").is_file():
        cfg = read_json(d / "adapter_config.json")
        tensors = read_safetensors(d / "adapter_model.safetensors") if (d / "adapter_model.safetensors").is_file() else {}
        n = sum(t.numel() for t in tensors.values())
        mods = {k.rsplit(".", 2)[0] for k in tensors}
        shown = ("r", "lora_alpha", "use_dora", "use_rslora", "num_virtual_tokens", "oft_block_size")
        keep = {k: cfg[k] for k in shown if k in cfg}
        return [str(d), "hf peft", str(cfg.get("peft_type")), str(len(mods)), str(len(tensors)), f"{n:,}", _short(keep)]
    return None


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _short(d: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in d.items() if v not in (None, {}, [], False))
    return text if len(text) <= 70 else text[:67] + "..."


def demo(args: argparse.Namespace, extra: list[str]) -> int:
    from .demo import run_demo

    return run_demo(Path(args.output), args.steps, args.model)


