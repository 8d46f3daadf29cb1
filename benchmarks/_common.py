"""Shared pieces of the benchmarks: the real model, fixed inputs, alternating timers, memory probes.

Every benchmark compares peftkit with ``peft`` (or with itself) in one process, alternating
the two sides step by step so that drift in machine load hits both equally, and reports the
median time ratio.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def setup(threads: int = 2, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


_BASE: dict[str, Any] = {}


def base_model(alias: str = "smollm2-135m"):
    """A fresh copy of the real model (loaded once per process, then deep-copied)."""
    from peftkit.hub.models import load_causal_lm

    if alias not in _BASE:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        model, _tok = load_causal_lm(alias)
        model.config.use_cache = False
        _BASE[alias] = model.eval()
    return copy.deepcopy(_BASE[alias])


def token_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train_step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One optimizer step (forward, loss, backward, AdamW update) on ``batch``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def alternate(fns: dict[str, Callable[[], Any]], steps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Run the functions in turn ``steps`` times each (after ``warmup`` rounds); seconds per call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):
        order = list(fns) if i % 2 == 0 else list(fns)[::-1]
        for k in order:
            gc.collect()
            t0 = time.perf_counter()
            fns[k]()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[k].append(dt)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def saved_activation_bytes(fn: Callable[[], Any], model: torch.nn.Module | None = None) -> int:
    """Bytes of the activations autograd keeps for backward during ``fn`` (a deterministic memory measure).

    Tensors are deduplicated by storage, so a tensor saved by two nodes counts once; the storages
    of ``model``'s parameters and buffers (resident anyway) are not counted. A sparse tensor (peft's
    SHiRA saves a COO delta) counts its indices and values.
    """
    seen: dict[int, int] = {}
    resident = set()
    if model is not None:
        resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_sparse:
            for part in (t._indices(), t._values()):
                seen[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
            return t
        st = t.untyped_storage()
        if st.data_ptr() not in resident:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs``) and return the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def current_peak_rss_mb() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_mb("VmHWM")


def report(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


def gsm8k_batches(path: str, tok: Any, count: int, rows: int, length: int,
                  skip: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``rows`` GSM8K problems (question + answer, padded/cut to ``length`` tokens, LM labels
    with padding ignored) from a jsonl file, after skipping ``skip`` batches."""
    lines = open(path).read().splitlines()[skip * rows:(skip + count) * rows]
    texts = [(lambda r: r["question"] + "\n" + r["answer"])(json.loads(x)) for x in lines]
    out = []
    for i in range(0, len(texts), rows):
        enc = tok(texts[i:i + rows], truncation=True, max_length=length, padding="max_length", return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


@torch.no_grad()
def eval_loss(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    """Mean LM loss over fixed batches in eval mode (the model's training mode is restored)."""
    was = model.training
    model.eval()
    loss = statistics.mean(model(**b).loss.item() for b in data)
    model.train(was)
    return loss


def report_results(results: Iterator[tuple[str, str, dict[str, float]]], json_path: str | None) -> None:
    """Print each ``(key, title, figures)`` as it comes, then write ``{key: figures}`` to ``json_path`` if given."""
    out = {}
    for key, title, res in results:
        out[key] = res
        report(title, [(k, f"{v:.4f}") for k, v in res.items()])
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)


def methods_cli(doc: str, methods: tuple[str, ...], builders: dict[str, Any], run: Callable[..., dict[str, float]],
                rss_child: Callable[[str, str, int], None], title: Callable[[str], str]) -> None:
    """The command line of a per-method step benchmark: ``--steps``, ``--warmup``, ``--rss-steps`` (peak RSS from a
    child process per library, which re-enters with ``--rss-child LIB``), ``--methods``, ``--json``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before the timed ones")
    ap.add_argument("--rss-steps", type=int, default=3, help="steps of each peak-memory child process (0: skip)")
    ap.add_argument("--methods", default=",".join(methods))
    ap.add_argument("--json", default=None)
    ap.add_argument("--rss-child", default=None, choices=list(builders))
    a = ap.parse_args()
    chosen = [m.strip() for m in a.methods.split(",") if m.strip()]
    if a.rss_child:
        rss_child(a.rss_child, chosen[0], a.steps)
        return
    report_results(((m, title(m), run(m, a.steps, a.warmup, a.rss_steps)) for m in chosen), a.json)


def cli(doc: str, run: Callable[..., dict[str, float]], title: str, **counts: int) -> None:
    """The shared command line of a benchmark script: ``--<count> N`` options, ``--json PATH``; prints the figures."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in counts.items():
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    res = run(**{k: getattr(a, k) for k in counts})
    report(title, [(k, f"{v:.4f}") for k, v in res.items()])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


def training_peak_rss(model: torch.nn.Module, steps: int,
                      step_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], Callable[[], None]] | None = None
                      ) -> dict[str, float]:
    """Peak RSS of ``steps`` training steps (4×128 tokens) on ``model``, the loading peak excluded.

    Run it in a child process (:func:`child_json`): a process's peak RSS cannot be lowered again.
    """
    batch = token_batch(4, 128, model.config.vocab_size)
    step = (step_fn or train_step_fn)(model, batch)
    gc.collect()
    before = reset_peak_rss()  # the model loading peak must not hide the training peak
    for _ in range(steps):
        step()
    return {"peak_rss_mb": current_peak_rss_mb(), "rss_before_mb": before}


def child_json(script: str, *args: str) -> dict[str, Any]:
    """Run ``python script args...`` and parse the JSON object on its last output line."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
