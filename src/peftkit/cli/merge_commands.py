"""``peftkit merge config.yaml`` and ``peftkit compress ADAPTER --method compeft --density 0.1``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: files next to an adapter that are not the adapter (a trained head, the task record): copied, not counted
SIDE_FILES = ("extra.safetensors", "peftkit_task.json")


def add_parsers(sub: Any) -> None:
    m = sub.add_parser("merge", allow_abbrev=False, help="merge adapters or checkpoints as a YAML file says",
                       description="Keys: inputs, method, options, weights, rank, space, base, output, name, format, "
                                   "shard_size, overwrite, seed (see docs/merging.md).")
    m.add_argument("config", help="the merge file (YAML)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=merge)

    c = sub.add_parser("compress", allow_abbrev=False, help="compress an adapter (ComPEFT or int8/int4 factors)")
    c.add_argument("adapter", help="adapter directory")
    c.add_argument("--method", default="compeft", help="compeft | int8 | int4")
    c.add_argument("--density", type=float, default=0.1, help="compeft: fraction of entries kept per tensor")
    c.add_argument("--scale", default="l2", help="compeft: l2 (mean kept magnitude) | std (alpha · std)")
    c.add_argument("--alpha", type=float, default=1.0, help="compeft with --scale std: the multiplier")
    c.add_argument("--min-numel", type=int, default=64, help="tensors smaller than this stay exact")
    c.add_argument("--output", help="default: ADAPTER-METHOD next to the adapter")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=compress)


def merge(args: argparse.Namespace, extra: list[str]) -> int:
    from ..merging.api import run_spec

    out = run_spec(args.config, progress=not args.no_progress)
    print(f"merged into {out}")
    return 0


def compress(args: argparse.Namespace, extra: list[str]) -> int:
    from ..compress.api import compress as run
    from ..core.files import read_json
    from ..formats.compressed import CONFIG_FILE

    src = Path(args.adapter)
    out = Path(args.output) if args.output else src.with_name(f"{src.name}-{args.method}")
    run(src, out, method=args.method, density=args.density, scale=args.scale, alpha=args.alpha,
        min_numel=args.min_numel, overwrite=args.overwrite)
    before = sum(f.stat().st_size for f in src.iterdir() if f.is_file() and f.name not in SIDE_FILES)
    after = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name not in SIDE_FILES)
    sizes = read_json(out / CONFIG_FILE).get("sizes", {})
    print(f"compressed {src} -> {out} ({args.method}): {before:,} -> {after:,} bytes ({before / max(after, 1):.1f}x smaller; "
          f"tensors {sizes.get('tensor_bytes', 0):,} -> {sizes.get('compressed_bytes', 0):,} bytes)")
    return 0
