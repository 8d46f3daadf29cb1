"""``peftkit.merge_adapters`` and the runner of a declarative merge file (used by ``peftkit merge``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from .adapters import merge_states
from .checkpoint import merge_checkpoints
from .config import MergeSpec, load_spec
from .registry import MaskSource, MergeOptions


def _as_state(item: Any) -> Any:
    if isinstance(item, (str, Path)):
        from ..io import read_adapters

        states = read_adapters(item)
        if len(states) != 1:
            raise ConfigError(f"{item} holds {len(states)} adapters ({', '.join(s.name for s in states)}); "
                              "pass the sub-directory of the one to merge")
        return states[0]
    return item


def merge_adapters(inputs: Sequence[Any], method: str = "task_arithmetic", weights: Sequence[float] | None = None,
                   options: dict[str, Any] | MergeOptions | None = None, rank: int | None = None,
                   space: str = "auto", name: str = "merged", output: str | Path | None = None,
                   format: str = "peftkit", masks: MaskSource | None = None, progress: bool = False,
                   overwrite: bool = False, saved_modules: str = "refuse") -> Any:
    """Merge adapters (``AdapterState`` values or adapter directories) into a new ``AdapterState``.

    ``method``: a registered merge method (``peftkit.merging.MERGE_METHODS``: task_arithmetic, ties,
    dare_linear, dare_ties, magnitude_prune, breadcrumbs, della, pcb, model_stock, slerp) with its
    ``options`` (a dict or the method's options dataclass). ``rank``/``space``: see
    :mod:`peftkit.merging.adapters`. With ``output`` the result is also written there (atomically; an
    existing directory is refused unless ``overwrite``). ``saved_modules``: ``"refuse"`` inputs carrying
    ``modules_to_save`` copies (task heads do not average) or ``"drop"`` them. Everything is validated
    before any work.
    """
    if format not in ("peftkit", "hf"):
        raise ConfigError(f"format {format!r} is not one of peftkit, hf")
    out = Path(output) if output is not None else None
    if out is not None and out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; remove it or pass overwrite=True")
    if saved_modules not in ("refuse", "drop"):  # before any input is read
        raise ConfigError(f"saved_modules={saved_modules!r} is not one of 'refuse', 'drop'")
    states = [_as_state(x) for x in inputs]
    merged = merge_states(states, method, weights, options, rank, space, name, masks, progress, saved_modules)
    if out is not None:
        from ..io import write_adapters

        write_adapters([merged], out, format=format)
    return merged


def run_spec(spec: MergeSpec | str | Path, progress: bool = True) -> Path:
    """Run a merge file (or a parsed :class:`MergeSpec`); returns the output directory."""
    if not isinstance(spec, MergeSpec):
        spec = load_spec(spec)
    if spec.kind == "checkpoint":
        return merge_checkpoints(spec.inputs, spec.output, spec.method, spec.weights, spec.options, spec.base,
                                 spec.shard_size, progress=progress, overwrite=spec.overwrite)
    merge_adapters(spec.inputs, spec.method, spec.weights, spec.options, spec.rank, spec.space, spec.name,
                   spec.output, spec.format, progress=progress, overwrite=spec.overwrite,
                   saved_modules=spec.saved_modules)
    return spec.output
