"""Saving and loading adapters in peftkit's own format.

A saved adapter is a directory holding

* ``adapter.safetensors`` — the adapter modules' state (parameters and persistent buffers),
  keyed ``<module path>.<tensor name>`` with module paths as in the user's model;
* ``peftkit_adapter.json`` — the method config, the exact list of adapted modules, the base
  model's class and parameter count, and the tensors' shapes and dtypes.

Several adapters saved at once go into one sub-directory each. Loading validates the whole
file against the model (every tensor by name, shape and dtype) before touching the model,
and reports every mismatch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .api import Plan, install, prepare
from .errors import AdapterLoadError, ConfigError
from .files import json_to_bytes, read_json, read_safetensors, tensors_to_bytes
from .model import adapter_modules, adapter_names, check_names
from .registry import config_from_dict
from .sharding import check_unsharded, class_name, is_sharded, module_state, write_once

CONFIG_FILE = "peftkit_adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT_VERSION = 1


def adapter_state(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({module path.tensor: tensor}, [module paths])`` of adapter ``name``."""
    state: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    for path, _, mod in adapter_modules(model, name):
        targets.append(path)
        for k, v in module_state(mod).items():  # under FSDP2: gathered (every rank must call)
            state[f"{path}.{k}"] = v
    return state, targets


def save(model: nn.Module, path: str | Path, name: str | None = None, format: str = "peftkit") -> Path:
    """Save adapter ``name`` (default: every attached adapter) to directory ``path``.

    ``format="peftkit"`` (default) or ``"hf"`` (the Hugging Face PEFT directory format). With
    several adapters each goes to ``path/<name>`` (peftkit) or peft's layout (the first at
    ``path``, the others at ``path/<name>``). Files are written atomically.

    On a model sharded with FSDP2 (``fully_shard``) call it on every rank: the tensors are
    gathered and rank 0 writes; every rank returns once the files exist.
    """
    if format not in ("peftkit", "hf"):
        from .errors import did_you_mean

        raise ConfigError(f"unknown format {format!r}{did_you_mean(format, ['peftkit', 'hf'])}; use 'peftkit' or 'hf'")
    names = adapter_names(model) if name is None else [name]
    if not names:
        raise ConfigError("the model has no adapter to save")
    check_names(model, names)
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a directory")
    if format == "hf":
        from ..formats.hf_peft import save_hf

        return save_hf(model, root, names)
    files: dict[Path, bytes] = {}
    for n in names:
        target_dir = root if len(names) == 1 else root / n
        files.update(_peftkit_files(model, n, target_dir))
    write_once(files, is_sharded(model))
    return root


def _peftkit_files(model: nn.Module, name: str, directory: Path) -> dict[Path, bytes]:
    from .. import __version__

    state, targets = adapter_state(model, name)
    config = next(mod.config for _, _, mod in adapter_modules(model, name))
    base_params = sum(p.numel() for n, p in model.named_parameters() if ".adapters." not in n)
    meta = {
        "format": "peftkit",
        "format_version": FORMAT_VERSION,
        "peftkit_version": __version__,
        "name": name,
        "method": config.method,
        "config": config.to_dict(),
        "targets": targets,
        "base_model": {
            "class": class_name(model),
            "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
            "parameters": base_params,
        },
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()},
    }
    return {directory / WEIGHTS_FILE: tensors_to_bytes(state), directory / CONFIG_FILE: json_to_bytes(meta)}


def detect_format(path: Path) -> str | None:
    if (path / CONFIG_FILE).is_file():
        return "peftkit"
    if (path / "adapter_config.json").is_file():
        return "hf"
    return None


def load(model: nn.Module, path: str | Path, name: str | None = None, trainable: bool = False) -> nn.Module:
    """Load adapter(s) saved by :func:`save` or by Hugging Face ``peft`` from directory ``path``.

    The format is recognised from the files. ``name`` names the loaded adapter (default: the
    saved name, ``"default"`` for peft files). A directory of sub-directories loads each.
    Everything is checked before the model is touched. With FSDP2, load on every rank before
    ``fully_shard``: loading into an already sharded model raises :class:`ConfigError`.
    """
    check_unsharded(model, "load")
    root = Path(path)
    if not root.exists():
        raise AdapterLoadError(f"{root}: no such adapter directory")
    if root.is_file():
        raise AdapterLoadError(f"{root}: expected an adapter directory, got a file")
    fmt = detect_format(root)
    if fmt is None:
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and detect_format(d))
        if not subdirs:
            raise AdapterLoadError(
                f"{root}: no adapter here (expected {CONFIG_FILE} or peft's adapter_config.json)"
            )
        if name is not None and len(subdirs) > 1:
            raise ConfigError(f"{root} holds {len(subdirs)} adapters; load them one by one to rename them")
        for d in subdirs:
            load(model, d, name if name is not None else d.name, trainable)
        return model
    if fmt == "hf":
        from ..formats.hf_peft import load_hf

        return load_hf(model, root, name, trainable)
    meta = read_json(root / CONFIG_FILE)
    if meta.get("format") != "peftkit" or "config" not in meta or "targets" not in meta:
        raise AdapterLoadError(f"{root / CONFIG_FILE}: not a peftkit adapter file (fields format/config/targets)")
    try:
        config = config_from_dict(meta["config"])
    except (ConfigError, TypeError) as e:
        raise AdapterLoadError(f"{root / CONFIG_FILE}: invalid config: {e}") from None
    tensors = read_safetensors(root / WEIGHTS_FILE)
    load_into(model, config, meta["targets"], tensors, name or meta.get("name") or "default", trainable,
              source=str(root))
    return model


def load_into(model: nn.Module, config, targets: list[str], tensors: dict[str, torch.Tensor], name: str,
              trainable: bool, source: str) -> None:
    """Build the adapter for ``targets``, check ``tensors`` against it, then install it."""
    try:
        plan = prepare(model, config, name, targets)
    except ConfigError as e:
        raise AdapterLoadError(f"{source}: adapter does not fit {type(model).__name__}: {e}") from None
    states = check_tensors(plan, tensors, source)
    with torch.no_grad():
        for (_mname, _base, module), state in zip(plan, states, strict=True):
            module.load_state_dict(state, strict=True)
    install(model, plan, name, trainable=trainable)


def check_tensors(plan: Plan, tensors: dict[str, torch.Tensor], source: str) -> list[dict[str, torch.Tensor]]:
    """Match file tensors to the built modules; report every missing, unexpected or mis-shaped one."""
    from .targeting import display_name

    problems: list[str] = []
    used: set[str] = set()
    states = []
    for mname, _base, module in plan:
        path = display_name(mname)
        state = {}
        for k, ref in module.state_dict().items():
            key = f"{path}.{k}"
            t = tensors.get(key)
            if t is None:
                problems.append(f"missing tensor {key} (expected shape {tuple(ref.shape)})")
                continue
            used.add(key)
            if tuple(t.shape) != tuple(ref.shape):
                problems.append(f"tensor {key} has shape {tuple(t.shape)} in the file but the model needs {tuple(ref.shape)}")
                continue
            if t.is_floating_point() != ref.is_floating_point() or t.dtype == torch.bool != (ref.dtype == torch.bool):
                problems.append(f"tensor {key} has dtype {t.dtype} in the file but the model needs {ref.dtype}")
                continue
            state[k] = t.to(ref.dtype)
        states.append(state)
    extra = sorted(set(tensors) - used)
    for k in extra[:10]:
        problems.append(f"unexpected tensor {k}")
    if len(extra) > 10:
        problems.append(f"... and {len(extra) - 10} more unexpected tensors")
    if problems:
        raise AdapterLoadError(f"{source}: the adapter does not match the model:\n  " + "\n  ".join(problems))
    return states
