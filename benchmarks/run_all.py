"""Run every benchmark and print the four headline ratios against their targets.

    python benchmarks/run_all.py [--quick] [--out benchmarks/results.json]

Targets (issue #2): LoRA step ≤ 0.95× peft and peak memory ≤ peft; DoRA step ≤ 1.10× our LoRA;
mixed batch of 8 adapters ≤ 1.10× a single-adapter batch and ≤ 0.8× peft's ``adapter_names``;
``attach`` ≤ ``get_peft_model``. Results (with the machine) are written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import attach_time
import dora_step
import lora_step
import mixed_batch
import torch

CHECKS = [
    ("LoRA step time / peft", "lora", "time_ratio", 0.95),
    ("LoRA saved activations / peft", "lora", "saved_memory_ratio", 1.0),
    ("LoRA peak RSS / peft", "lora", "peak_rss_ratio", 1.0),
    ("DoRA step / own LoRA step", "dora", "dora_over_own_lora", 1.10),
    ("mixed 16x64 over 8 adapters / single adapter", "mixed", "mixed_over_single", 1.10),
    ("mixed 16x64 over 8 adapters / peft adapter_names", "mixed", "mixed_over_peft", 0.80),
    ("attach / peft get_peft_model", "attach", "attach_ratio", 1.0),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier figures)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    a = ap.parse_args()
    n = 3 if a.quick else 10
    t0 = time.time()
    results = {
        "lora": lora_step.run(steps=n),
        "dora": dora_step.run(steps=max(3, n - 2)),
        "mixed": mixed_batch.run(steps=n),
        "attach": attach_time.run(trials=max(3, n - 3)),
    }
    print(f"\n{'check':<52} {'measured':>9} {'target':>8}  ok")
    ok_all = True
    for label, group, key, target in CHECKS:
        v = results[group][key]
        ok = v <= target
        ok_all &= ok
        print(f"{label:<52} {v:>9.3f} {'<= ' + format(target, '.2f'):>8}  {'yes' if ok else 'NO'}")
    results["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peft": __import__("peft").__version__,
        "python": platform.python_version(),
        "seconds": round(time.time() - t0, 1),
    }
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"\nall targets met: {ok_all}; results written to {a.out}\n")
    print(markdown(results))


def markdown(results: dict) -> str:
    """The README's benchmark table from a results dict."""
    lines = ["| check | measured | target |", "| --- | --- | --- |"]
    for label, group, key, target in CHECKS:
        lines.append(f"| {label} | {results[group][key]:.3f} | ≤ {target:.2f} |")
    lo, do, mi, at = results["lora"], results["dora"], results["mixed"], results["attach"]
    lines += [
        "",
        f"Absolute: LoRA step {lo['peftkit_step_s']:.2f} s (peft {lo['peft_step_s']:.2f} s), peak RSS "
        f"{lo['peak_rss_mb_peftkit']:.0f} MB (peft {lo['peak_rss_mb_peft']:.0f} MB); DoRA step "
        f"{do['peftkit_dora_step_s']:.2f} s (peft DoRA {do.get('peft_dora_step_s', float('nan')):.2f} s); mixed batch "
        f"{mi['mixed_s']:.3f} s vs single adapter {mi['single_s']:.3f} s and peft {mi['peft_mixed_s']:.3f} s; attach "
        f"{at['peftkit_attach_s']:.2f} s vs get_peft_model {at['peft_get_peft_model_s']:.2f} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
