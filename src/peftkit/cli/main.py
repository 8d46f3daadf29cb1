"""``peftkit`` — train, evaluate, chat with and inspect adapters from the command line.

    peftkit train [config.yaml] --model smollm2-135m --task causal-lm --method lora --r 16 --data train.jsonl --output out
    peftkit eval out/adapter --data test.jsonl
    peftkit eval --model smollm2-135m --task causal-lm --data test.jsonl --exact-match 200   # the base model
    peftkit generate --adapter out/adapter --prompt "Reverse: red cat"
    peftkit info out/adapter
    peftkit export out/adapter --format hf out/adapter-hf
    peftkit export out/adapter --format int out/int4     (l4q/lrqat: integers + step sizes)
    peftkit demo
    peftkit serve --model smollm2-135m --adapters out/a out/b --max-adapters 8 --port 8000

Bad input (an unknown method, option, column or file) prints one line naming it, with the
closest valid choice, and exits with code 2 before anything is written. Ctrl-C during training
saves a checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._version import __version__
from ..core.errors import PeftkitError
from .flags import TRAIN_ALIASES, TRAIN_HELP, TRAIN_NUMBERS, normalize_train_argv

PROMPT_FORMAT_HELP = ("causal-lm: plain (prompt then completion as written), chat (a user/assistant turn in the "
                      "model's chat template) or a template holding {prompt}, e.g. 'Question: {prompt}\nAnswer: '")


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    # no abbreviations: `--r` is LoRA's rank, not a prefix of `--resume`
    ap = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning from the command line.",
                                 allow_abbrev=False)
    ap.add_argument("--version", action="version", version=f"peftkit {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", allow_abbrev=False, usage="peftkit train [config.yaml] [flags] [method options]",
                       help="train an adapter (flags, or a YAML file whose keys are the flag names)",
                       description="Any flag not listed below is a method option, e.g. --r 16 --alpha 32 "
                                   "--target-modules q_proj,v_proj.")
    # the optional YAML file (first argument, keys = the flag names; flags override it) is taken from the
    # unparsed arguments, so that method options such as `--r 16` cannot be mistaken for it
    t.add_argument("--model", help="local Hugging Face directory or alias (smollm2-135m, minilm-l6)")
    t.add_argument("--task", help="causal-lm | classification")
    t.add_argument("--method", help="a registered method (lora, dora, ia3, oft, ...), or full (full fine-tuning, for comparison)")
    t.add_argument("--data", help="training data: .jsonl, .json, .csv, .tsv or a datasets directory")
    t.add_argument("--eval-data")
    t.add_argument("--output")
    t.add_argument("--columns", help="rename columns: text=sentence,label=label")
    for name, typ in TRAIN_NUMBERS.items():
        if name in ("exact_match", "max_new_tokens"):  # added below with the causal-lm options
            continue
        flag = name.replace("_", "-")
        t.add_argument(f"--{flag}", *[f"--{a.replace('_', '-')}" for a, n in TRAIN_ALIASES.items() if n == name], type=typ,
                       help=TRAIN_HELP.get(name))
    t.add_argument("--schedule", help="linear | cosine | constant")
    t.add_argument("--metric", help="the eval metric for the best adapter and early stopping")
    t.add_argument("--gradient-checkpointing", action="store_true", default=None)
    t.add_argument("--resume", action="store_true", default=None, help="continue from OUTPUT/checkpoint")
    t.add_argument("--overwrite", action="store_true", default=None,
                   help="clear a non-empty --output folder first (refused otherwise, unless --resume)")
    t.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard the model with FSDP2 instead of replicating it (DDP)")
    t.add_argument("--quantize", default=None, metavar="nf4|int8",
                   help="quantize the frozen base's linear layers (QLoRA; lora and dora train on top)")
    t.add_argument("--optimizer", default=None, metavar="adamw|galore|lora-fa",
                   help="adamw (default), galore (low-rank gradient projection) or lora-fa (LoRA's A frozen)")
    t.add_argument("--exact-match", type=int, default=None, metavar="N",
                   help="causal-lm: also report generation exact match on the first N eval rows at the end")
    t.add_argument("--max-new-tokens", type=int, default=None,
                   help="exact match: tokens generated per answer (default: longest reference answer + 16)")
    t.add_argument("--prompt-format", default=None, metavar="FORMAT", help=PROMPT_FORMAT_HELP)
    t.set_defaults(func=commands.train)

    e = sub.add_parser("eval", allow_abbrev=False, help="evaluate an adapter directory (or the base model) on a data set")
    e.add_argument("adapter", nargs="?", help="adapter directory written by `peftkit train`; omit it to score the "
                                              "base model given by --model and --task")
    e.add_argument("--model", help="base model (default: the one recorded with the adapter)")
    e.add_argument("--task", help="causal-lm (needed without an adapter)")
    e.add_argument("--prompt-format", default=None, metavar="FORMAT",
                   help="default: the adapter's; " + PROMPT_FORMAT_HELP)
    e.add_argument("--max-new-tokens", type=int, default=None, help="exact match: tokens generated per answer")
    e.add_argument("--data", required=True)
    e.add_argument("--columns")
    e.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (loss and generation)")
    e.add_argument("--max-length", type=int, default=None)
    e.add_argument("--exact-match", type=int, default=None, metavar="N", help="causal-lm: generation exact match on N rows")
    e.set_defaults(func=commands.evaluate)

    g = sub.add_parser("generate", allow_abbrev=False, help="generate through the base model and adapters")
    g.add_argument("--adapter", action="append", default=[], help="an adapter directory; repeat to stack")
    g.add_argument("--model", help="base model (default: the one recorded with the adapter)")
    g.add_argument("--prompt", help="the prompt; without it, read lines from stdin")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (= --prompt-format chat)")
    g.add_argument("--prompt-format", default=None, metavar="FORMAT", help="default: the adapter's; " + PROMPT_FORMAT_HELP)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.set_defaults(func=commands.generate)

    i = sub.add_parser("info", allow_abbrev=False, help="what an adapter directory holds (its files are checked)")
    i.add_argument("adapter", help="an adapter directory, or a file in one")
    i.set_defaults(func=commands.info)

    x = sub.add_parser("export", allow_abbrev=False, help="write an adapter in another format (hf: peft's directory format)")
    x.add_argument("adapter", help="adapter directory written by `peftkit train` (its base model is recorded there)")
    x.add_argument("--format", default="hf", help="hf (adapter_config.json + adapter_model.safetensors; the default), "
                                                   "peftkit, or int (an l4q/lrqat adapter as integer layers)")
    x.add_argument("--model", help="base model (default: the one recorded with the adapter)")
    x.add_argument("out", help="the output directory")
    x.set_defaults(func=commands.export)

    d = sub.add_parser("demo", allow_abbrev=False, help="train a LoRA on SmolLM2-135M for a task it cannot do; before/after")
    d.add_argument("--output", default="out/demo")
    d.add_argument("--steps", type=int, default=100)
    d.add_argument("--model", default="smollm2-135m")
    d.set_defaults(func=commands.demo)

    from ..serve.server import add_arguments as serve_arguments

    s = sub.add_parser("serve", allow_abbrev=False, help="OpenAI-compatible server: one base model, many adapters")
    serve_arguments(s)
    s.set_defaults(func=commands.serve)

    from .merge_commands import add_parsers as add_merge_parsers  # peftkit merge / peftkit compress

    add_merge_parsers(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    from ..train.distributed import exit_if_launched

    exit_if_launched(code)  # under torchrun: leave without the interpreter teardown that can abort a rank
    return code


def _main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m peftkit.cli.main -- train ...` may pass the separator on
        argv = argv[1:]
    if argv[:1] == ["train"]:
        argv = ["train", *normalize_train_argv(argv[1:])]
    args, extra = ap.parse_known_args(argv)
    if extra and args.command != "train":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args, extra) or 0)
    except PeftkitError as e:
        print(f"peftkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
