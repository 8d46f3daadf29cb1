"""Reading and writing the Hugging Face PEFT adapter directory format.

A peft adapter directory holds ``adapter_config.json`` (with ``peft_type`` and the method's
options in peft's vocabulary) and ``adapter_model.safetensors`` (or the legacy
``adapter_model.bin``), whose keys are ``base_model.model.<module path>.<peft tensor name>``
(prompt-learning methods use bare names such as ``prompt_embeddings``). A second adapter
saved by ``save_pretrained`` goes to the sub-directory of its name.

Each method that peft shares with peftkit registers an :class:`HFCodec` (in the method's own
file) that translates its config and tensor names. This module does the rest: finding the
codec, reading the files, locating the adapted modules from the tensor keys, and writing.
Nothing here imports ``peft``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.errors import AdapterLoadError, ConfigError
from ..core.files import json_to_bytes, read_json, read_safetensors, read_torch_bin, tensors_to_bytes
from ..core.model import adapter_modules
from ..core.sharding import is_sharded, module_state, write_once

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_VERSION = "0.21.2"  # the peft version whose conventions the writers follow


@dataclass
class HFCodec:
    """How one peftkit method maps to peft.

    * ``peft_type``: peft's ``peft_type`` string (``"LORA"``).
    * ``accepts(hf_config)``: whether this codec reads that config (LoRA vs DoRA share ``LORA``).
    * ``config_to_hf(config, targets)`` / ``config_from_hf(hf_config)``: the options.
    * ``tensor_names``: peftkit state name → peft tensor name (``"lora_A" → "lora_A.weight"``),
      or a callable ``(adapter_module) -> that dict`` where it depends on the layer.
    * ``module_level``: False for prompt-learning methods whose keys carry no module path.
    * ``export``/``import_``: optional hooks for state that is not a renaming (PiSSA, OFT).
    """

    method: str
    peft_type: str
    config_to_hf: Callable[[AdapterConfig, list[str]], dict[str, Any]]
    config_from_hf: Callable[[dict[str, Any]], AdapterConfig]
    tensor_names: dict[str, str] | Callable[[nn.Module], dict[str, str]]
    accepts: Callable[[dict[str, Any]], bool] = lambda d: True
    module_level: bool = True
    export: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    import_: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def names_for(self, module: nn.Module) -> dict[str, str]:
        return self.tensor_names(module) if callable(self.tensor_names) else self.tensor_names


CODECS: list[HFCodec] = []


def register_codec(codec: HFCodec) -> HFCodec:
    CODECS.append(codec)
    return codec


def codec_for_method(method: str) -> HFCodec:
    for c in CODECS:
        if c.method == method:
            return c
    supported = sorted({c.method for c in CODECS})
    raise ConfigError(f"method {method!r} has no Hugging Face PEFT form; methods with one: {', '.join(supported)}")


def codec_for_config(hf: dict[str, Any], source: str) -> HFCodec:
    ptype = hf.get("peft_type")
    if not ptype:
        raise AdapterLoadError(f"{source}: adapter_config.json has no peft_type")
    for c in CODECS:
        if c.peft_type == ptype and c.accepts(hf):
            return c
    known = sorted({c.peft_type for c in CODECS})
    raise AdapterLoadError(f"{source}: peft_type {ptype!r} is not supported by peftkit (supported: {', '.join(known)})")


def base_hf_fields(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    # SEQ_CLS/TOKEN_CLS would make peft expect a trained copy of the head in the file
    task = "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None
    return {
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "inference_mode": True,
        "peft_version": PEFT_VERSION,
        "revision": None,
        "task_type": task,
        "auto_mapping": None,
    }


# -- writing -------------------------------------------------------------------------------
def save_hf(model: nn.Module, root: Path, names: list[str]) -> Path:
    files: dict[Path, bytes] = {}
    for i, name in enumerate(names):
        directory = root if i == 0 else root / name
        files.update(_hf_files(model, name, directory))
    write_once(files, is_sharded(model))
    return root


def _hf_files(model: nn.Module, name: str, directory: Path) -> dict[Path, bytes]:
    mods = list(adapter_modules(model, name))
    config = mods[0][2].config
    codec = codec_for_method(config.method)
    targets = [path for path, _, _ in mods]
    hf = base_hf_fields(model)
    hf.update(codec.config_to_hf(config, targets))
    if codec.module_level:
        hf["target_modules"] = hf_target_modules(model, targets)
        hf.setdefault("exclude_modules", None)
    hf["peft_type"] = codec.peft_type
    tensors: dict[str, torch.Tensor] = {}
    for path, _site, mod in mods:
        state = module_state(mod, codec.export)  # under FSDP2: gathered (every rank must call)
        mapping = codec.names_for(mod)
        for ours, t in state.items():
            if ours not in mapping:
                continue
            key = mapping[ours] if not codec.module_level else f"{PREFIX}{path}.{mapping[ours]}"
            tensors[key] = t
    hf = dict(sorted(hf.items()))
    return {directory / WEIGHTS_FILE: tensors_to_bytes(tensors, {"format": "pt"}), directory / CONFIG_FILE: json_to_bytes(hf)}


def hf_target_modules(model: nn.Module, targets: list[str]) -> list[str] | str:
    """peft's ``target_modules`` selecting exactly ``targets``: leaf names when they select exactly
    those modules, else a regular expression of the full paths (peft full-matches a string)."""
    import re

    from ..core.model import iter_sites
    from ..core.targeting import display_name

    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    site_paths = {p for p, _ in iter_sites(model)}
    names = {display_name(n) for n, _ in model.named_modules()} | site_paths
    selected = {n for n in names if n.rsplit(".", 1)[-1] in leaves and ".adapters." not in f".{n}."}
    if selected == set(targets):
        return leaves
    return "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"


# -- reading -------------------------------------------------------------------------------
def read_hf_tensors(root: Path) -> dict[str, torch.Tensor]:
    if (root / WEIGHTS_FILE).is_file():
        return read_safetensors(root / WEIGHTS_FILE)
    if (root / "adapter_model.bin").is_file():
        return read_torch_bin(root / "adapter_model.bin")
    raise AdapterLoadError(f"{root}: no {WEIGHTS_FILE} (or adapter_model.bin) next to {CONFIG_FILE}")


def load_hf(model: nn.Module, root: Path, name: str | None, trainable: bool) -> nn.Module:
    from ..core.state import load_into

    source = str(root)
    hf = read_json(root / CONFIG_FILE)
    codec = codec_for_config(hf, source)
    try:
        config = codec.config_from_hf(hf)
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise AdapterLoadError(f"{source}: cannot read the peft config: {e}") from None
    raw = read_hf_tensors(root)
    name = name or "default"
    if not codec.module_level:
        targets = None
        tensors = raw
    else:
        targets, tensors = _split_by_module(model, raw, codec, source)
    from ..core.api import prepare

    if targets is None:
        load_into(model, config, _module_targets(model, config), _prompt_state(model, config, codec, tensors, name, source),
                  name, trainable, source)
        return model
    plan = _safe_prepare(prepare, model, config, name, targets, source)
    ours: dict[str, torch.Tensor] = {}
    for _mname, _base, mod in plan:
        path = _path_of(_mname)
        names = codec.names_for(mod)
        inverse = {v: k for k, v in names.items()}
        file_part = tensors.get(path, {})
        state: dict[str, torch.Tensor] = {}
        for hf_name, t in file_part.items():
            state[inverse.get(hf_name, f"<peft:{hf_name}>")] = t
        if codec.import_:
            state = codec.import_(mod, state)
        for k, t in state.items():
            ours[f"{path}.{k}"] = t
    load_into(model, config, targets, ours, name, trainable, source)
    return model


def _path_of(module_name: str) -> str:
    from ..core.targeting import display_name

    return display_name(module_name)


def _safe_prepare(prepare: Any, model: nn.Module, config: AdapterConfig, name: str, targets: list[str], source: str):
    try:
        return prepare(model, config, name, targets)
    except ConfigError as e:
        raise AdapterLoadError(f"{source}: adapter does not fit {type(model).__name__}: {e}") from None


def _split_by_module(model: nn.Module, raw: dict[str, torch.Tensor], codec: HFCodec,
                     source: str) -> tuple[list[str], dict[str, dict[str, torch.Tensor]]]:
    """Group file tensors by module path, using the peft tensor names the codec knows."""
    suffixes = set()
    for v in _all_names(codec):
        suffixes.add(v)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    order: list[str] = []
    unknown: list[str] = []
    for key, t in raw.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = next((s for s in sorted(suffixes, key=len, reverse=True) if k.endswith("." + s)), None)
        if match is None:
            if ".base_layer." in k or k.endswith(".base_layer.weight"):
                continue  # peft's copy of a resized embedding/base layer: the model's own weights are used
            unknown.append(key)
            continue
        path = k[: -len(match) - 1]
        if path not in grouped:
            grouped[path] = {}
            order.append(path)
        grouped[path][match] = t
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise AdapterLoadError(f"{source}: tensors peftkit does not know for {codec.peft_type}: {shown}")
    if not order:
        raise AdapterLoadError(f"{source}: the weights file holds no {codec.peft_type} tensors")
    return order, grouped


def _all_names(codec: HFCodec) -> set[str]:
    if not callable(codec.tensor_names):
        return set(codec.tensor_names.values())
    return set(getattr(codec.tensor_names, "all_names", ()))


def _module_targets(model: nn.Module, config: AdapterConfig) -> list[str] | None:
    from ..core.api import _module_names
    from ..core.targeting import display_name

    return [display_name(n) for n in _module_names(model, config, None)]


def _prompt_state(model: nn.Module, config: AdapterConfig, codec: HFCodec, tensors: dict[str, torch.Tensor],
                  name: str, source: str) -> dict[str, torch.Tensor]:
    """For methods without module paths: map file names onto the (single) target module's state."""
    targets = _module_targets(model, config) or []
    if len(targets) != 1:
        raise AdapterLoadError(f"{source}: expected exactly one module for {codec.peft_type}, found {len(targets)}")
    inverse = {v: k for k, v in codec.tensor_names.items()} if not callable(codec.tensor_names) else {}
    return {f"{targets[0]}.{inverse.get(k, k)}": t for k, t in tensors.items()}
