"""The declarative merge file (``peftkit merge config.yaml``).

    inputs:                      # adapter directories (peftkit or peft format) or checkpoints (.safetensors / shard dirs)
      - path: out/sst2/adapter
        weight: 1.0
      - out/topic/adapter        # a plain path: weight from `weights`, else 1
    method: ties                 # any registered merge method
    options: {density: 0.5}      # the method's options (typed; unknown keys refused)
    weights: [1.0, 1.0]          # optional, instead of per-input `weight`
    rank: 16                     # adapters: rank of the result (LoRA)
    space: auto                  # adapters: auto | concat | delta | factors
    base: base.safetensors       # checkpoints: the base for task vectors
    output: out/merged
    name: merged                 # adapters: name of the merged adapter
    format: peftkit              # adapters: peftkit | hf
    saved_modules: refuse        # adapters carrying modules_to_save copies (task heads): refuse | drop
    shard_size: 5GB              # checkpoints
    overwrite: false

Every key, every path and every option is checked before anything is read or written; an unknown
key is refused with the closest valid name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, did_you_mean

TOP_KEYS = ("inputs", "method", "options", "weights", "rank", "space", "base", "output", "name", "format",
            "shard_size", "overwrite", "seed", "saved_modules")
INPUT_KEYS = ("path", "weight")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass
class MergeSpec:
    inputs: list[Path]
    method: str
    output: Path
    weights: list[float] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    space: str = "auto"
    base: Path | None = None
    name: str = "merged"
    format: str = "peftkit"
    shard_size: int = 5 * 1024**3
    overwrite: bool = False
    kind: str = "adapter"
    saved_modules: str = "refuse"


def parse_size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"shard_size: {value!r} is not a size such as 500MB or 5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def input_kind(path: Path) -> str:
    """``"adapter"`` (a peftkit/peft adapter directory) or ``"checkpoint"`` (safetensors file or shard directory)."""
    if path.is_file() and path.suffix == ".safetensors":
        return "checkpoint"
    if path.is_dir():
        from ..formats import compressed, hf_peft
        from ..formats import peftkit as native

        if any((path / f).is_file() for f in (native.CONFIG_FILE, hf_peft.CONFIG_FILE, compressed.CONFIG_FILE)):
            return "adapter"
        if any(path.glob("*.safetensors")):
            return "checkpoint"
    raise ConfigError(f"input {path}: neither an adapter directory nor a .safetensors checkpoint")


def parse_spec(data: Any, where: str = "merge config", root: Path | None = None) -> MergeSpec:
    """A :class:`MergeSpec` from the parsed YAML mapping; relative paths from ``root`` (default: the current directory)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (inputs, method, output, ...)")
    for k in data:
        if k not in TOP_KEYS:
            raise ConfigError(f"{where}: unknown key {k!r}{did_you_mean(str(k), TOP_KEYS)}; valid keys: {', '.join(TOP_KEYS)}")
    for k in ("inputs", "method", "output"):
        if k not in data:
            raise ConfigError(f"{where}: missing key {k!r}")
    base_dir = root or Path(".")

    def path_of(p: Any, what: str) -> Path:
        if not isinstance(p, (str, Path)):
            raise ConfigError(f"{where}: {what} must be a path, got {p!r}")
        q = Path(p).expanduser()
        q = q if q.is_absolute() else base_dir / q
        if what != "output" and not q.exists():
            raise ConfigError(f"{where}: {what} {p} does not exist")
        return q

    raw_inputs = data["inputs"]
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ConfigError(f"{where}: 'inputs' must be a non-empty list of paths or {{path, weight}} entries")
    paths: list[Path] = []
    per_input: list[float | None] = []
    for i, item in enumerate(raw_inputs):
        if isinstance(item, dict):
            for k in item:
                if k not in INPUT_KEYS:
                    raise ConfigError(f"{where}: inputs[{i}]: unknown key {k!r}{did_you_mean(str(k), INPUT_KEYS)}")
            if "path" not in item:
                raise ConfigError(f"{where}: inputs[{i}] has no 'path'")
            paths.append(path_of(item["path"], f"inputs[{i}]"))
            per_input.append(item.get("weight"))
        else:
            paths.append(path_of(item, f"inputs[{i}]"))
            per_input.append(None)
    weights = data.get("weights")
    if weights is not None and any(w is not None for w in per_input):
        raise ConfigError(f"{where}: give weights either in 'weights' or per input ('weight'), not both")
    if weights is None and any(w is not None for w in per_input):
        weights = [1.0 if w is None else w for w in per_input]
    if weights is not None and not isinstance(weights, list):
        raise ConfigError(f"{where}: 'weights' must be a list of numbers, one per input")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: 'options' must be a mapping, got {options!r}")
    kinds = {p: input_kind(p) for p in paths}
    if len(set(kinds.values())) > 1:
        a = next(p for p, k in kinds.items() if k == "adapter")
        c = next(p for p, k in kinds.items() if k == "checkpoint")
        raise ConfigError(f"{where}: {a} is an adapter but {c} is a checkpoint; merge one kind at a time")
    kind = kinds[paths[0]]
    spec = MergeSpec(inputs=paths, method=str(data["method"]), output=path_of(data["output"], "output"),
                     weights=weights, options=dict(options), kind=kind)
    if "seed" in data:
        spec.options.setdefault("seed", data["seed"])
    spec.rank = data.get("rank")
    spec.space = data.get("space", "auto")
    spec.name = str(data.get("name", "merged"))
    spec.format = str(data.get("format", "peftkit"))
    spec.overwrite = bool(data.get("overwrite", False))
    spec.saved_modules = str(data.get("saved_modules", "refuse"))
    if spec.saved_modules not in ("refuse", "drop"):
        hint = did_you_mean(spec.saved_modules, ["refuse", "drop"])
        raise ConfigError(f"{where}: saved_modules {spec.saved_modules!r} is not one of refuse, drop{hint}")
    if "base" in data:
        spec.base = path_of(data["base"], "base")
    if "shard_size" in data:
        spec.shard_size = parse_size(data["shard_size"])
    adapter_only = [k for k in ("rank", "space", "name", "format", "saved_modules") if k in data]
    if kind == "checkpoint" and adapter_only:
        raise ConfigError(f"{where}: {adapter_only[0]!r} applies to adapter merges, but the inputs are checkpoints")
    checkpoint_only = [k for k in ("base", "shard_size") if k in data]
    if kind == "adapter" and checkpoint_only:
        raise ConfigError(f"{where}: {checkpoint_only[0]!r} applies to checkpoint merges, but the inputs are adapters")
    if spec.format not in ("peftkit", "hf"):
        hint = did_you_mean(spec.format, ["peftkit", "hf"])
        raise ConfigError(f"{where}: format {spec.format!r} is not one of peftkit, hf{hint}")
    return spec


def load_spec(path: str | Path) -> MergeSpec:
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading a merge file needs PyYAML: pip install 'peftkit[merge]'") from None

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such merge config file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    return parse_spec(data, str(p))
