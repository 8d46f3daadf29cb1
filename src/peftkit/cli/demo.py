"""``peftkit demo``: teach SmolLM2-135M a task it cannot do, on a CPU, and show before/after.

The task is generated here, deterministically: reverse the order of a list of 3–5 words
(``"Reverse: red cat blue\\nAnswer:" → " blue cat red"``). The base model answers almost none
correctly; a LoRA (r=16 on every linear layer of the blocks) trained for ~100 steps of 8
examples answers almost all. Writes the data, the adapter, ``metrics.json``, ``report.md`` and
``curves.png`` under the output directory.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

WORDS = ("red blue green cat dog fish sun moon star tree lake rock bird ship road king "
         "gold rain snow fire wind leaf door book milk salt wolf bear frog rose").split()


def reversal_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(3, 5))
        rows.append({"prompt": f"Reverse: {' '.join(words)}\nAnswer:", "completion": " " + " ".join(reversed(words))})
    return rows


def run_demo(output: Path, steps: int = 100, model_name: str = "smollm2-135m", held_out: int = 30) -> int:
    from ..core.api import attach
    from ..core.summary import summary
    from ..methods.lora import LoRA
    from ..train import TrainConfig, train
    from . import tasks

    t_start = time.time()
    train_rows = reversal_rows(steps * 8, seed=0)
    eval_rows = reversal_rows(held_out, seed=1)
    seen = {r["prompt"] for r in train_rows}
    eval_rows = [r for r in eval_rows if r["prompt"] not in seen]
    data_dir = output / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows)):
        (data_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    model, tok = tasks.load_model(model_name, "causal-lm")
    print(f"task: reverse a list of words, e.g. {eval_rows[0]['prompt']!r} -> {eval_rows[0]['completion']!r}")
    before = tasks.exact_match(model, tok, eval_rows, max_new_tokens=16)
    print(f"base model exact match on {len(eval_rows)} held-out examples: {before:.0%}")

    attach(model, LoRA(r=16, alpha=32, target_modules="all-linear"))
    print(summary(model))
    ex, _ = tasks.examples("causal-lm", train_rows, tok, 64)
    config = TrainConfig(output=str(output), lr=2e-3, max_steps=steps, batch_size=8, warmup=10, schedule="linear",
                         log_every=10, seed=0)
    metrics = train(model, config, ex, pad_id=tok.pad_token_id or 0)
    after = tasks.exact_match(model, tok, eval_rows, max_new_tokens=16)
    metrics.update({"eval_exact_match": after, "base_exact_match": before, "demo_seconds": time.time() - t_start})
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    tasks.write_task(output / "adapter", {"task": "causal-lm", "model": model_name, "method": "lora", "labels": None,
                                          "max_length": 64, "columns": None})
    print(f"\nexact match on held-out examples: base {before:.0%} -> adapted {after:.0%} "
          f"(training {metrics.get('train_seconds', 0):.0f} s, total {time.time() - t_start:.0f} s)")
    print(f"adapter: {output / 'adapter'}\nreport:  {output / 'report.md'}\nplot:    {output / 'curves.png'}")
    print(f"try it:  peftkit generate --adapter {output / 'adapter'} --prompt $'Reverse: sun tree bird\\nAnswer:'")
    return 0
