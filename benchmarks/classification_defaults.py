"""How the classification defaults were chosen: peftkit's training loop with its old (causal-LM) defaults, with
the task-aware classification defaults (``peftkit.tasks.TASK_DEFAULTS``) and with a few variants, against a
hand-written loop over ``peft`` LoRA on the same subsample, tokenization and batches — all in one process.

    nice -n 10 python benchmarks/classification_defaults.py --data sst2 --dir ../shared/data/sst2 --train-n 3000
    nice -n 10 python benchmarks/classification_defaults.py --data topics --train-n 3000

Model: all-MiniLM-L6-v2 (``minilm-l6``), LoRA r=8 alpha=8 on query/value (peft's and peftkit's defaults) and the
classification head trained. Every run sees the same subsample (the first ``--train-n`` rows after a seeded
shuffle) and reports the eval accuracy after each epoch; "best" is the best epoch (what keeping the best
adapter gives), "last" the final one. On 2 shared CPU cores each run takes 1–3 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from peftkit import LoRA, attach, tasks
from peftkit.data import batches, load_records
from peftkit.train import TrainConfig, train

OLD = {"lr": 2e-4, "warmup": 0.0, "epochs": 2, "batch_size": 8}  # the causal-LM defaults the CLI used before


def load_data(name: str, directory: Path | None, train_n: int, eval_n: int) -> tuple[list[dict], list[dict]]:
    if name == "sst2":
        d = directory or Path("../shared/data/sst2")
        tr = load_records(str(d / "train.tsv"), {"text": "sentence"})
        ev = load_records(str(d / "validation.tsv"), {"text": "sentence"})
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from topics_data import write

        d = write(Path(tempfile.mkdtemp()) / "topics", 4000, 1000)
        tr, ev = load_records(str(d / "train.tsv")), load_records(str(d / "test.tsv"))
    random.Random(0).shuffle(tr)
    return tr[:train_n], ev[:eval_n]


def run_peftkit(settings: dict, ex: list, eval_ex: list, n_labels: int, pad: int, out: Path) -> dict:
    model, _ = tasks.load_model("minilm-l6", "classification", num_labels=n_labels, seed=0)
    attach(model, LoRA(r=8, alpha=8))
    cfg = TrainConfig(output=str(out), progress=False, log_every=50, seed=0,
                      **{"eval_each_epoch": True, "metric": "eval_accuracy", **settings})
    t = time.time()
    train(model, cfg, ex, eval_ex, evaluate=tasks.classification_metrics, trainable_extra=["classifier"], pad_id=pad)
    accs = [json.loads(line)["eval_accuracy"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "eval_accuracy" in line]
    return {"accs": accs, "seconds": time.time() - t}


def run_peft(lr: float, epochs: int, batch_size: int, warmup: float, ex: list, eval_ex: list, n_labels: int,
             pad: int) -> dict:
    """The loop a peft user writes: get_peft_model(SEQ_CLS) (the head in modules_to_save), AdamW over the trainable
    parameters, linear decay after a linear warmup, gradient clipping at 1, eval after each epoch."""
    import peft

    model, _ = tasks.load_model("minilm-l6", "classification", num_labels=n_labels, seed=0)
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8,
                                                    target_modules=["query", "value"]))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    per_epoch = math.ceil(len(ex) / batch_size)
    total = per_epoch * epochs
    w = math.ceil(warmup * total) if warmup < 1 else int(warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, w) if s < w else max(0.0, (total - s) / max(1, total - w)))
    torch.manual_seed(0)
    eval_b = batches(eval_ex, 32, pad, shuffle=False, seed=0)
    accs, t = [], time.time()
    for epoch in range(epochs):
        pm.train()
        for b in batches(ex, batch_size, pad, shuffle=True, seed=epoch):
            loss = pm(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        pm.eval()
        with torch.no_grad():
            accs.append(tasks.classification_metrics(pm, eval_b)["accuracy"])
    return {"accs": accs, "seconds": time.time() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("sst2", "topics"), default="sst2")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--train-n", type=int, default=3000)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--runs", default="old,default,peft", help="comma list of: old, default, lr=X/head=Y, peft, "
                                                               "peft-lr=X")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tr, ev = load_data(a.data, a.dir, a.train_n, a.eval_n)
    tok = tasks.load_tokenizer("minilm-l6")
    ex, labels = tasks.examples("classification", tr, tok, 64)
    eval_ex, _ = tasks.examples("classification", ev, tok, 64, labels)
    pad = tok.pad_token_id or 0
    new = tasks.task_defaults("classification")
    print(f"# {a.data}: {len(ex)} training rows, {len(eval_ex)} eval rows, labels {labels}; defaults {new}")
    results = []
    tmp = Path(tempfile.mkdtemp())
    for i, run in enumerate(a.runs.split(",")):
        if run == "old":
            r = run_peftkit({**OLD, "eval_each_epoch": True}, ex, eval_ex, len(labels), pad, tmp / str(i))
        elif run == "default":
            r = run_peftkit(new, ex, eval_ex, len(labels), pad, tmp / str(i))
        elif run.startswith("lr="):  # lr=X/head=Y[/warmup=Z][/epochs=N][/bs=B]
            kv = dict(part.split("=") for part in run.split("/"))
            s = {**new, "lr": float(kv["lr"]), "head_lr": float(kv.get("head", kv["lr"]))}
            s.update({k: float(kv[k]) for k in ("warmup",) if k in kv})
            s.update({"epochs" if k == "epochs" else "batch_size": int(kv[k]) for k in ("epochs", "bs") if k in kv})
            r = run_peftkit(s, ex, eval_ex, len(labels), pad, tmp / str(i))
        elif run.startswith("peft"):
            lr = float(run.split("=")[1]) if "=" in run else new["lr"]
            r = run_peft(lr, new["epochs"], new["batch_size"], new["warmup"], ex, eval_ex, len(labels), pad)
        else:
            raise SystemExit(f"unknown run {run!r}")
        best, last = max(r["accs"]), r["accs"][-1]
        results.append((run, best, last, r["seconds"]))
        print(f"{run:32s} best {best:.3f}  last {last:.3f}  per epoch {' '.join(f'{x:.3f}' for x in r['accs'])}  "
              f"({r['seconds']:.0f} s)", flush=True)
    print(json.dumps({"data": a.data, "train_n": len(ex), "eval_n": len(eval_ex),
                      "results": [{"run": n, "best": b, "last": la, "seconds": round(s)} for n, b, la, s in results]}))


if __name__ == "__main__":
    main()
