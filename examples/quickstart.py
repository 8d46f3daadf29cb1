"""Quickstart: teach SmolLM2-135M a task it cannot do, with LoRA, on a CPU in a few minutes.

The task: reverse the order of a list of words ("Reverse: red cat blue" -> "blue cat red").
The script measures exact match of greedy answers before and after training on held-out
lists, saves the adapter (peftkit and Hugging Face PEFT formats), reloads it into a fresh
model, and checks that merging gives the same answers.

    python examples/quickstart.py [--steps 120] [--output out/quickstart]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import peftkit
from peftkit.hub.models import load_causal_lm

WORDS = ("red blue green cat dog fish sun moon star tree lake rock bird ship road king "
         "gold rain snow fire wind leaf door book milk salt wolf bear frog rose").split()


def example(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse: {' '.join(words)}\nAnswer:", " " + " ".join(reversed(words))


def batch(tok, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    ids, labels = [], []
    for prompt, answer in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    n = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (n - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (n - len(y)) for y in labels]),
    }


@torch.no_grad()
def exact_match(model, tok, pairs: list[tuple[str, str]]) -> float:
    model.eval()
    hits = 0
    for prompt, answer in pairs:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += text.strip().split("\n")[0].strip() == answer.strip()
    return hits / len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval", type=int, default=25, help="held-out examples")
    ap.add_argument("--output", default="out/quickstart")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = random.Random(0)
    held_out = [example(random.Random(10_000 + i)) for i in range(args.eval)]

    model, tok = load_causal_lm(args.model)
    before = exact_match(model, tok, held_out)
    print(f"base model exact match: {before:.0%}")

    peftkit.attach(model, peftkit.LoRA(r=16, alpha=32, target_modules="all-linear"))
    print(peftkit.summary(model))
    opt = torch.optim.AdamW(peftkit.adapter_parameters(model).values(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / args.steps))
    model.train()
    t0 = time.time()
    for step in range(1, args.steps + 1):
        loss = model(**batch(tok, [example(rng) for _ in range(args.batch_size)])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peftkit.adapter_parameters(model).values(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    after = exact_match(model, tok, held_out)
    print(f"adapted exact match: {after:.0%} (base {before:.0%}), training took {time.time() - t0:.0f}s")

    peftkit.save(model, args.output)
    peftkit.save(model, args.output + "-hf", format="hf")
    fresh, _ = load_causal_lm(args.model)
    peftkit.load(fresh, args.output)
    reloaded = exact_match(fresh, tok, held_out)
    peftkit.merge(fresh)
    merged = exact_match(fresh, tok, held_out)
    print(f"reloaded: {reloaded:.0%}, merged: {merged:.0%}")
    print(f"adapter saved to {args.output} (peftkit) and {args.output}-hf (Hugging Face PEFT format)")


if __name__ == "__main__":
    main()
