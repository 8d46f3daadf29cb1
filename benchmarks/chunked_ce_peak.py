"""Peak memory of a GSM8K training step (the benchmarks/gsm8k_lora.sh configuration), plain vs chunked CE.

Default: one batch of 8 problems, ``peftkit.memory_report(measure=True)`` (torch's own allocations
followed op by op, see peftkit.memory) for the plain loss, the chunked loss, and the chunked loss with
gradient checkpointing. ``--rss``: the older per-process comparison below (peak RSS, which glibc's
allocator caching and fragmentation blur).

SmolLM2-135M-Instruct + LoRA r=16 on every block linear, chat prompts, max length 512, 8 problems per
batch, ``--steps`` optimizer steps (default 1: the peak is reached in the first). Each side runs in its
own process (``ru_maxrss`` is a per-process high-water mark); the peak RSS and the increase over the
loaded model are printed, with
``peftkit.memory_report`` of the first batch for the chunked side. ``--side chunked-gc`` runs one side
alone: chunked CE plus gradient checkpointing (``--gradient-checkpointing``).

    PYTHONPATH=src python benchmarks/chunked_ce_peak.py --data ../shared/data/gsm8k [--steps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_side(data: str, chunked: bool, steps: int, report: bool, gc: bool = False) -> dict:
    import torch

    import peftkit
    from peftkit import tasks
    from peftkit.data import check_prompt_format, load_records
    from peftkit.train import TrainConfig, train

    torch.set_num_threads(2)
    records = load_records(f"{data}/train.jsonl", {"prompt": "question", "completion": "answer"})[: 8 * steps]
    tok = tasks.load_tokenizer("smollm2-135m")
    fmt = check_prompt_format("chat", tok)
    ex, _ = tasks.examples("causal-lm", records, tok, 512, prompt_format=fmt)
    model, tok = tasks.load_model("smollm2-135m", "causal-lm", tok=tok)
    peftkit.attach(model, peftkit.LoRA(r=16, alpha=32, target_modules="all-linear"))
    loaded = rss_mb()
    out = {"chunked": chunked, "gradient_checkpointing": gc, "rss_loaded_mb": round(loaded, 1)}
    if report:
        from peftkit.data import batches

        b = batches(ex[:8], 8, pad_id=tok.pad_token_id or 0, shuffle=False, seed=0)[0]
        r = peftkit.memory_report(model, b)
        out["memory_report"] = {k: round(v / 2**20, 1) if isinstance(v, int) else v for k, v in r.as_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(output=tmp, max_steps=steps, batch_size=8, lr=1e-3, log_every=1, progress=False,
                          chunked_loss=chunked, gradient_checkpointing=gc)
        metrics = train(model, cfg, ex, None, pad_id=tok.pad_token_id or 0)
    out["rss_peak_mb"] = round(rss_mb(), 1)
    out["rss_increase_mb"] = round(out["rss_peak_mb"] - loaded, 1)
    out["train_loss"] = metrics.get("train_loss")
    return out


def torch_peaks(data: str, variants: list[str]) -> None:
    """One GSM8K batch of 8 (chat format, max length 512): ``peftkit.memory_report(measure=True)`` per variant."""
    import torch

    import peftkit
    from peftkit import tasks
    from peftkit.data import batches, check_prompt_format, load_records

    torch.set_num_threads(2)
    records = load_records(f"{data}/train.jsonl", {"prompt": "question", "completion": "answer"})[:8]
    tok = tasks.load_tokenizer("smollm2-135m")
    ex, _ = tasks.examples("causal-lm", records, tok, 512, prompt_format=check_prompt_format("chat", tok))
    model, tok = tasks.load_model("smollm2-135m", "causal-lm", tok=tok)
    peftkit.attach(model, peftkit.LoRA(r=16, alpha=32, target_modules="all-linear"))
    b = batches(ex, 8, pad_id=tok.pad_token_id or 0, shuffle=False, seed=0)[0]
    labelled = int((b["labels"][:, 1:] != -100).sum())
    print(f"batch {tuple(b['input_ids'].shape)}, {labelled} labelled positions", flush=True)
    peaks = {}
    for v in variants:
        if v == "chunked-gc":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        r = peftkit.memory_report(model, b, measure=True, chunked_loss=v != "plain")
        peaks[v] = r.measured_peak
        print(f"{v}: " + ", ".join(f"{k} {val / 2**20:.0f} MB" for k, val in r.as_dict().items()
                                    if isinstance(val, int) and not isinstance(val, bool)), flush=True)
    if "plain" in peaks:
        for v in peaks:
            print(f"measured step peak {v} / plain: {peaks[v] / peaks['plain']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/gsm8k")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--side", choices=["plain", "chunked", "chunked-gc"])
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--rss", action="store_true", help="train each side in its own process and compare peak RSS")
    ap.add_argument("--variants", default="plain,chunked,chunked-gc")
    args = ap.parse_args()
    if args.side:
        print(json.dumps(one_side(args.data, args.side != "plain", args.steps, args.report, args.side == "chunked-gc")))
        return
    if not args.rss:
        torch_peaks(args.data, args.variants.split(","))
        return
    results = {}
    for side in ("plain", "chunked"):
        cmd = [sys.executable, __file__, "--data", args.data, "--steps", str(args.steps), "--side", side]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[side] = json.loads(res.stdout.strip().splitlines()[-1])
        print(side, results[side], flush=True)
    p, c = results["plain"], results["chunked"]
    print(f"peak RSS: plain {p['rss_peak_mb']} MB, chunked {c['rss_peak_mb']} MB "
          f"(ratio {c['rss_peak_mb'] / p['rss_peak_mb']:.3f}); increase over the loaded model: "
          f"{p['rss_increase_mb']} -> {c['rss_increase_mb']} MB; train loss {p['train_loss']:.4f} vs {c['train_loss']:.4f}")


if __name__ == "__main__":
    main()
