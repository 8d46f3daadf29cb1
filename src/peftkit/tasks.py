"""Tasks: loading the model for a task, task records, building examples, the evaluation metrics.

Shared by the command line and any other front end (serving, merging): nothing here imports
``peftkit.cli``.

Tasks: ``causal-lm`` (prompt/completion or chat ``messages``; loss on the completion tokens) and
``classification`` (``text`` [+ ``text_pair``] → ``label``; the classification head is trained with
the adapter and saved next to it). ``OUTPUT/adapter/peftkit_task.json`` records the task, the
base model, the label names and the data columns, so ``eval`` and ``generate`` need only the
adapter directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.errors import ConfigError, did_you_mean
from .core.files import json_to_bytes, write_files

TASKS = ("causal-lm", "classification")
TASK_FILE = "peftkit_task.json"
HEAD_NAMES = ("classifier", "score")


#: training settings that differ from :class:`peftkit.train.TrainConfig`'s defaults per task (the causal-LM ones).
#: Classification: the head starts from random values and needs a higher lr than the adapter (``head_lr``); a
#: short warmup; the eval set is scored after each epoch and the best adapter is kept (``metric``). How these
#: were chosen (SST-2 and a topic set, against a hand-written peft loop): docs/training.md.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "causal-lm": {},
    "classification": {"lr": 1e-3, "head_lr": 5e-3, "warmup": 0.06, "epochs": 3, "batch_size": 16,
                       "eval_each_epoch": True, "metric": "eval_accuracy"},
}


def task_defaults(task: str) -> dict[str, Any]:
    """The training settings of ``task`` that differ from TrainConfig's defaults (a copy)."""
    check_task(task)
    return dict(TASK_DEFAULTS[task])


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}{did_you_mean(task, TASKS)}; tasks: {', '.join(TASKS)}")


def check_model_name(name: str) -> None:
    from .hub.models import ALIASES, alias_dir

    if name in ALIASES:
        alias_dir(name)  # says which package to install when it is missing
    elif not Path(name).exists():
        raise ConfigError(f"model {name!r} is neither a local directory nor an alias{did_you_mean(name, ALIASES)}; "
                          f"aliases: {', '.join(ALIASES)}")


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model alias or local directory, with a pad token (eos when it has none)."""
    from .hub.models import load_tokenizer as _load

    check_model_name(name)
    tok = _load(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, task: str, num_labels: int | None = None, seed: int = 0,
               tok: Any = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for a model alias or local directory; ``tok`` (from :func:`load_tokenizer`) is reused,
    else loaded."""
    from .hub.models import load_causal_lm, load_encoder

    tok = tok if tok is not None else load_tokenizer(name)
    torch.manual_seed(seed)  # the new classification head's initialisation
    if task == "causal-lm":
        return load_causal_lm(name, tokenizer=tok)
    return load_encoder(name, num_labels=num_labels or 2, tokenizer=tok)


def load_adapted(adapter: Path | None, info: dict[str, Any], model_name: str | None = None, tok: Any = None):
    """The base model (``model_name`` or the one recorded in ``info``) with the adapter of ``adapter`` loaded."""
    from .io import load
    from .train import load_extra

    task = info["task"]
    labels = info.get("labels")
    model, tok = load_model(model_name or info["model"], task, num_labels=len(labels) if labels else None, tok=tok)
    if adapter is not None and info.get("method") != "full":
        load(model, adapter)
    if adapter is not None and (adapter / "extra.safetensors").is_file():
        load_extra(model, adapter)
    return model.eval(), tok


def head_name(model: nn.Module) -> str:
    for n in HEAD_NAMES:
        if isinstance(getattr(model, n, None), nn.Module):
            return n
    raise ConfigError(f"{type(model).__name__} has no classification head ({' or '.join(HEAD_NAMES)})")


def examples(task: str, records: list[dict], tok: Any, max_length: int, labels: list[str] | None = None,
             prompt_format: str | None = None) -> tuple[list[dict], list[str] | None]:
    from .data import apply_prompt_format, build_causal_lm_examples, build_classification_examples

    if task == "causal-lm":
        return build_causal_lm_examples(apply_prompt_format(records, prompt_format), tok, max_length), None
    try:
        return build_classification_examples(records, tok, max_length, text_pair_col=_pair_col(records), labels=labels)
    except ConfigError as e:
        if "column" in str(e) and "has no column" in str(e):
            raise ConfigError(f"{e} (classification reads the columns 'text' and 'label': map yours with "
                              "--columns text=sentence,label=sentiment)") from None
        raise


def _pair_col(records: list[dict]) -> str | None:
    return "text_pair" if records and "text_pair" in records[0] else None


def classification_metrics(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss over the batches."""
    preds, gold, loss_sum, n = [], [], 0.0, 0
    for b in batches:
        out = model(**b)
        preds.append(out.logits.argmax(-1).cpu())
        gold.append(b["labels"].cpu())
        loss_sum += float(out.loss) * len(b["labels"])
        n += len(b["labels"])
    p, g = torch.cat(preds), torch.cat(gold)
    return {"accuracy": float((p == g).float().mean()), "macro_f1": macro_f1(p, g), "loss": loss_sum / max(n, 1)}


def macro_f1(pred: torch.Tensor, gold: torch.Tensor) -> float:
    scores = []
    for c in torch.unique(torch.cat([pred, gold])):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


@torch.no_grad()
def exact_match(model: nn.Module, tok: Any, records: list[dict], max_new_tokens: int | None = None,
                numeric: bool | None = None, batch_size: int = 32, prompt_format: str | None = None) -> float:
    """Greedy generation on each record's ``prompt``; a hit when the answer equals the ``completion``.

    The prompt is laid out by ``prompt_format`` exactly as in training (:func:`peftkit.data.prompt_ids`).
    Numeric tasks (completions holding ``####``) compare the extracted number
    (:func:`peftkit.data.extract_answer`: the number after ``####``, else the last number generated);
    others the first line of the generation, stripped. ``max_new_tokens`` defaults to the longest
    reference completion in tokens plus 16.
    """
    from .data import extract_answer, prompt_ids

    model.eval()
    device = next(model.parameters()).device
    prompts = prompt_ids(tok, [str(r["prompt"]) for r in records], prompt_format)
    if max_new_tokens is None:
        lengths = [len(ids) for ids in tok([str(r["completion"]) for r in records], add_special_tokens=False)["input_ids"]]
        max_new_tokens = max(lengths, default=16) + 16
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    hits = 0
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))  # similar lengths together: little padding
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        for i, seq in zip(chunk, out[:, width:], strict=True):
            text = tok.decode(seq, skip_special_tokens=True)
            want = str(records[i]["completion"])
            if numeric if numeric is not None else ("####" in want):
                got = extract_answer(text)
                hits += got is not None and got == extract_answer(want)
            else:
                hits += text.strip().split("\n")[0].strip() == want.strip()
        done = min(start + batch_size, len(order))
        if len(order) > batch_size:  # long runs (minutes on a CPU) report as they go
            print(f"exact match: {done}/{len(order)} generated, {hits} correct", file=sys.stderr, flush=True)
    return hits / max(len(records), 1)


def write_task(adapter_dir: Path, info: dict[str, Any]) -> None:
    write_files({adapter_dir / TASK_FILE: json_to_bytes(info)})


def read_task(adapter_dir: Path) -> dict[str, Any]:
    """The task record of an adapter directory, checked: a JSON object with a known ``task`` and a ``model`` name."""
    p = Path(adapter_dir) / TASK_FILE
    if not p.is_file():
        raise ConfigError(f"{adapter_dir}: no {TASK_FILE} (it was not written by `peftkit train`); for a causal-LM "
                          "adapter saved by peftkit.save or by peft, pass --model and --task causal-lm")
    try:
        info = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"{p}: corrupt task record, not valid JSON{where}; rewrite it or retrain") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{p}: corrupt task record: expected a JSON object, found {type(info).__name__}")
    for key in ("task", "model"):
        if not isinstance(info.get(key), str) or not info[key]:
            raise ConfigError(f"{p}: the task record has no {key!r} (fields: {', '.join(map(str, info)) or 'none'})")
    check_task(info["task"])
    labels = info.get("labels")
    if info["task"] == "classification" and (not isinstance(labels, list) or not labels):
        raise ConfigError(f"{p}: a classification task record needs its 'labels' list")
    return info
