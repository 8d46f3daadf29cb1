"""Training outputs: ``metrics.jsonl`` (one line per log/eval), ``metrics.json``, ``report.md``, ``curves.png``."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write_bytes, json_to_bytes


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (the file is created when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace the file by ``records`` (used on resume, so lines logged after the checkpoint disappear)."""
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on GPU, the resident set high-water mark on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def write_metrics_json(path: Path, metrics: dict[str, Any]) -> None:
    atomic_write_bytes(path, json_to_bytes(metrics))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def write_report(path: Path, metrics: dict[str, Any], config: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """A short markdown report: final metrics, the training config and the eval history."""
    lines = ["# Training report", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}.", "", "## Results", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if not isinstance(v, (dict, list))]
    lines += ["", "## Configuration", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in config.items()]
    evals = [r for r in history if any(k.startswith("eval_") for k in r)]
    if evals:
        keys = sorted({k for r in evals for k in r if k.startswith("eval_")})
        lines += ["", "## Evaluations", "", "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += ["| " + " | ".join([str(r["step"])] + [_fmt(r.get(k, "")) for k in keys]) + " |" for r in evals]
    if (path.parent / "curves.png").exists():
        lines += ["", "![training curves](curves.png)"]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def rewrite_report(output: Path, metrics: dict[str, Any], config: Any) -> None:
    """Write ``report.md`` again with ``metrics`` (figures computed after training, such as exact match),
    the history read back from ``metrics.jsonl``."""
    lines = (output / "metrics.jsonl").read_text().splitlines() if (output / "metrics.jsonl").is_file() else []
    write_report(output / "report.md", metrics, config.to_dict(), [json.loads(line) for line in lines if line.strip()])


def plot_curves(path: Path, history: list[dict[str, Any]], metric: str) -> bool:
    """Train loss and eval loss (left) and ``metric`` when it is not a loss (right) against step.

    Returns False (with a warning) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: curves.png not written (pip install matplotlib)", stacklevel=2)
        return False
    fig = curves_figure(plt, history, metric)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def curves_figure(plt: Any, history: list[dict[str, Any]], metric: str) -> Any:
    """The figure of :func:`plot_curves`. A curve of one point is drawn as a marker (a line needs two)."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    extra = [(r["step"], r[metric]) for r in history if metric in r] if metric != "eval_loss" else []
    ncols = 2 if extra else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), marker="o" if len(train) == 1 else None, label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if extra:
        ax2 = axes[0][1]
        ax2.plot(*zip(*extra, strict=True), marker="o", color="tab:green")
        ax2.set_xlabel("step")
        ax2.set_ylabel(metric)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


class Progress:
    """A tqdm bar when ``bar`` (stderr is a terminal) and tqdm is installed, else a plain line every ``log_every``
    steps (step, loss, tokens/s, ETA) that reads well in a log file; silent when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool, log_every: int, bar: bool = True) -> None:
        self.total, self.enabled, self.log_every = total, enabled, log_every
        self.bar = None
        self.start, self.start_step = time.monotonic(), initial
        if enabled and bar:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(1)
            return
        if step % self.log_every == 0 or step == self.total:
            done = step - self.start_step
            eta = (time.monotonic() - self.start) / max(1, done) * (self.total - step)
            print(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  ETA {eta:,.0f}s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
