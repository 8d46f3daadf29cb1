"""The command implementations. Each validates everything (files, columns, method options) before it
loads a model or writes a file, and raises :class:`~peftkit.core.errors.ConfigError` on bad input."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .. import tasks
from ..core.errors import ConfigError
from ..data import check_prompt_format
from .flags import TRAIN_KEYS, canonical_key, coerce
from .options import build_config, parse_method_flags


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


def read_yaml_config(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file; a syntax error is one line ``file:line:col: problem``."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value (such as 'lr: 1e-3'), found a "
                          f"{type(loaded).__name__}")
    return loaded


def train_settings(args: argparse.Namespace, extra: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, method options)`` from the YAML file (if any) overridden by the flags;
    the task's defaults (:data:`peftkit.tasks.TASK_DEFAULTS`) fill what neither gives."""
    settings: dict[str, Any] = {}
    method_opts: dict[str, Any] = {}
    config_file = extra.pop(0) if extra and not extra[0].startswith("-") else None
    if config_file:
        path = Path(config_file)
        for k, v in read_yaml_config(path).items():
            key = canonical_key(k)
            if key in TRAIN_KEYS:
                settings[key] = coerce(key, v, str(path))
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
    given = set(settings)
    if "epochs" in given and "max_steps" in given:
        raise ConfigError(f"--epochs {settings['epochs']} and --max-steps {settings['max_steps']} contradict each other: "
                          "--max-steps sets the length of the run; give only one of them")
    if "lr" in given and not (isinstance(settings["lr"], (int, float)) and settings["lr"] > 0):
        raise ConfigError(f"--lr {settings['lr']:g}: the learning rate must be > 0 (with 0 the adapter never changes)")
    defaults = tasks.task_defaults(settings["task"])
    if settings["method"] == "full":  # every weight trains at one lr, TrainConfig's (the adapter lr is far too high)
        defaults.pop("head_lr", None)
        defaults.pop("lr", None)
    if "max_steps" in given:
        defaults.pop("epochs", None)
    if "eval_every" in given:
        defaults.pop("eval_each_epoch", None)
    return {**defaults, **settings}, method_opts


def check_output(out: Path, overwrite: bool, resume: bool) -> None:
    """Before any loading: ``out`` must be a writable directory (or creatable), and empty unless ``--overwrite``
    (cleared later) or ``--resume``."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file, not a directory")
    if overwrite and resume:
        raise ConfigError("--overwrite clears the output folder and --resume continues from it: give one of them")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {out}: {probe} is not writable")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise ConfigError(f"--output {out} is not empty (a previous run?): pass --overwrite to clear it, --resume to "
                          "continue its checkpoint, or choose another folder")


def _clear(out: Path) -> None:
    import shutil

    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def train(args: argparse.Namespace, extra: list[str]) -> int:
    from ..core.api import attach
    from ..core.summary import summary
    from ..data import load_records
    from ..train import TrainConfig
    from ..train import train as run_training
    from ..train.report import rewrite_report, write_metrics_json

    s, method_opts = train_settings(args, extra)
    full = s["method"] == "full"  # full fine-tuning, for comparison: every parameter trains, no adapter
    if full and method_opts:
        raise ConfigError(f"--method full takes no method options (got --{next(iter(method_opts)).replace('_', '-')})")
    config = None if full else build_config(s["method"], method_opts, s.get("max_steps"))  # validated first
    if s.get("quantize"):
        from ..quant.schemes import get_scheme

        get_scheme(s["quantize"])
        if full:
            raise ConfigError("--quantize needs an adapter method (lora, dora): a quantized base cannot train (--method full)")
    out = Path(s["output"])
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        check_output(out, bool(s.get("overwrite")), bool(s.get("resume")))
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
    if not ex:
        raise ConfigError(f"{s['data']}: no usable training rows")
    eval_ex = tasks.examples(task, eval_records, tok, max_length, labels, fmt)[0] if eval_records else None
    if eval_records is not None and not eval_ex:
        raise ConfigError(f"{s['eval_data']}: no usable eval rows (every row was empty or filtered out)")
    if main_rank and s.get("overwrite") and out.is_dir():
        _clear(out)
    model, tok = tasks.load_model(s["model"], task, num_labels=len(labels) if labels else None, seed=tc.seed, tok=tok)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}
    if s.get("quantize"):  # QLoRA: the frozen base in nf4 / int8 (peftkit.quant), adapters on top
        from ..quant import quantize

        quantize(model, s["quantize"])
    if config is not None:
        if callable(getattr(config, "calibrate", None)) and getattr(config, "covariances", True) is None:
            from ..data.batching import collate  # CorDA: covariances from training examples, one per batch

            config = config.calibrate(model, (collate([e], tok.pad_token_id or 0) for e in ex))
        if task == "classification":  # the new head trains with the adapter, as a copy saved in it (peft's SEQ_CLS)
            config = with_head(config, tasks.head_name(model))
        attach(model, config)
        print(summary(model))
        extra_modules: list[str] = []
    else:
        extra_modules = [""]
    evaluate = tasks.classification_metrics if task == "classification" else None
    if task == "classification" and eval_ex is None and main_rank:
        print("note: no --eval-data: the adapter of the last step is kept (with --eval-data, the eval set is scored "
              "after each epoch and the best adapter kept)")
    metrics = run_training(model, tc, ex, eval_ex, evaluate=evaluate, trainable_extra=extra_modules,
                           pad_id=tok.pad_token_id or 0)
    sharded = tc.fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if metrics.get("interrupted"):
        return 130  # the loop saved the checkpoint and said so; a script's `&&` must stop here
    if task == "causal-lm" and s.get("exact_match") and eval_records and (main_rank or sharded):
        # under FSDP every rank generates (a sharded forward needs all of them); otherwise rank 0 alone
        n = int(s["exact_match"])
        metrics["eval_exact_match"] = tasks.exact_match(model, tok, eval_records[:n], s.get("max_new_tokens"),
                                                        prompt_format=fmt)
        if main_rank:
            write_metrics_json(out / "metrics.json", metrics)
            rewrite_report(out, metrics, tc)
    if not main_rank:  # under torchrun, rank 0 writes the outputs
        return 0
    info = {"task": task, "model": s["model"], "method": config.method if config else "full", "labels": labels,
            "max_length": max_length, "columns": cols, "prompt_format": fmt}
    tasks.write_task(out / "adapter", info)
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print("\n".join(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in shown.items()))
    print(f"adapter: {out / 'adapter'}   report: {out / 'report.md'}   curves: {out / 'curves.png'}")
    return 0


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
    if not ex:
        raise ConfigError(f"{args.data}: no usable eval rows (every row was empty or filtered out)")
    model, tok = tasks.load_adapted(adapter, info, args.model, tok)
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
    from ..data import prompt_ids
    from ..io import load

    dirs = [Path(a) for a in args.adapter]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"adapter directory {d} does not exist")
    infos = [tasks.read_task(d) for d in dirs if (d / tasks.TASK_FILE).is_file()]
    for d, i in zip([d for d in dirs if (d / tasks.TASK_FILE).is_file()], infos, strict=True):
        if i["task"] != "causal-lm":
            raise ConfigError(f"{d} is a {i['task']} adapter: it scores labels and cannot generate text "
                              f"(use `peftkit eval {d} --data FILE`)")
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
    from .info import adapter_root, describe, describe_full

    d = adapter_root(Path(args.adapter))
    rows = []
    for sub in [d, *sorted(p for p in d.iterdir() if p.is_dir())]:
        meta = describe(sub)
        if meta:
            rows.append(meta)
    task = tasks.read_task(d) if (d / tasks.TASK_FILE).is_file() else None
    if not rows and (full := describe_full(d)) is not None:
        rows.append(full)
    if not rows:
        raise ConfigError(f"{d} holds no adapter (no peftkit_adapter.json, adapter_config.json or extra.safetensors)")
    print(format_table(["path", "format", "method", "modules", "tensors", "parameters", "options"], rows))
    if task is not None:
        labels = f"  labels: {task['labels']}" if task.get("labels") else ""
        print(f"task: {task['task']}  base model: {task['model']}{labels}")
    return 0


def export(args: argparse.Namespace, extra: list[str]) -> int:
    """Write the adapter of a ``peftkit train`` output in another format: load it onto its recorded base model, then
    :func:`peftkit.save` with ``format``."""
    from ..io import save
    from .info import adapter_root, describe

    if args.format not in ("hf", "peftkit", "int"):
        from ..core.errors import did_you_mean

        raise ConfigError(f"--format {args.format!r}{did_you_mean(args.format, ['hf', 'peftkit', 'int'])}: "
                          "use hf, peftkit or int (l4q/lrqat adapters: the integer layers)")
    d = adapter_root(Path(args.adapter))
    out = Path(args.out)
    if out.resolve() == d.resolve():
        raise ConfigError(f"{out}: the output must be another directory than the adapter's")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty directory")
    info = tasks.read_task(d) if (d / tasks.TASK_FILE).is_file() else None
    if info is None:
        if not args.model:
            raise ConfigError(f"{d}: no {tasks.TASK_FILE}: pass --model (the base model the adapter was trained on)")
        info = {"task": "causal-lm", "model": args.model}
    if info.get("method") == "full" or describe(d) is None:
        raise ConfigError(f"{d} holds no adapter to export (a --method full output is a whole model)")
    model, _ = tasks.load_adapted(d, info, args.model)
    if args.format == "int":  # quantization-aware adapters: integers + step sizes, no adapter branch
        from ..quant.export import export_quantized, save_quantized

        save_quantized(export_quantized(model), out)
        print(f"integer layers written to {out} (peftkit.quant.load_quantized(base_model, '{out}') puts them back)")
        return 0
    save(model, out, format=args.format)
    print(f"{args.format} adapter written to {out}")
    if (d / "extra.safetensors").is_file():  # an output of peftkit < modules_to_save: the head is a side file
        print(f"note: {d / 'extra.safetensors'} (the trained classification head) is not part of the {args.format} "
              "adapter; copy it along or load it with peftkit.train.load_extra")
    return 0


def with_head(config: Any, head: str) -> Any:
    """``config`` with the classification head ``head`` in its ``modules_to_save`` (added once)."""
    names = list(config.modules_to_save or [])
    return config if head in names else config.replace(modules_to_save=[*names, head])


def demo(args: argparse.Namespace, extra: list[str]) -> int:
    from .demo import run_demo

    return run_demo(Path(args.output), args.steps, args.model)




def serve(args: argparse.Namespace, extra: list[str]) -> int:
    from ..serve.server import serve as run_server

    return run_server(args)
