"""The Hugging Face PEFT adapter folder format, read into and written from :class:`AdapterState`.

A peft adapter folder holds ``adapter_config.json`` (``peft_type`` and the method's options in
peft's vocabulary) and ``adapter_model.safetensors`` (or the legacy ``adapter_model.bin``),
whose keys are ``base_model.model.<module path>.<peft tensor name>`` (prompt-learning methods
use bare names such as ``prompt_embeddings``). A second adapter saved by ``save_pretrained``
goes to the sub-folder of its name.

Each method that peft shares with peftkit declares an :class:`~peftkit.formats.codec.HFCodec` on
its config class; this module finds it, reads and writes the files, and groups tensors by
module path. ``modules_to_save`` (whole modules trained with the adapter, e.g. a classification head)
is handled here for every method: the config entry is read and written as peft has it, and the copies'
tensors are ``base_model.model.<module path>.<tensor name>`` (peft's ``ModulesToSaveWrapper`` keys without
its ``modules_to_save.<adapter>.`` part). It knows nothing of models and never imports ``peft``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..core import saved_modules
from ..core.adapter_state import AdapterState
from ..core.config import AdapterConfig
from ..core.errors import AdapterLoadError, ConfigError
from ..core.files import FolderReader, json_to_bytes, parse_json, parse_safetensors, read_torch_bin, tensors_to_bytes
from ..core.registry import METHODS
from .codec import HFCodec

PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."  # the modules_to_save copies next to a prompt-learning adapter
SAVED = "modules_to_save"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
PEFT_VERSION = "0.21.2"  # the peft version whose conventions the writers follow
NAME = "hf"


def codecs() -> dict[str, HFCodec]:
    """``{method name: codec}`` of every registered method with a peft form."""
    return {name: cls.hf_codec for name, cls in METHODS.items() if cls.hf_codec is not None}


def codec_for_method(method: str) -> HFCodec:
    found = codecs()
    if method not in found:
        raise ConfigError(f"method {method!r} has no Hugging Face PEFT form; methods with one: {', '.join(sorted(found))}")
    return found[method]


def codec_for_config(hf: dict[str, Any], source: str) -> HFCodec:
    ptype = hf.get("peft_type")
    if not ptype:
        raise AdapterLoadError(f"{source}: adapter_config.json has no peft_type")
    for c in codecs().values():
        if c.peft_type == ptype and c.accepts(hf):
            return c
    known = sorted({c.peft_type for c in codecs().values()})
    raise AdapterLoadError(f"{source}: peft_type {ptype!r} is not supported by peftkit (supported: {', '.join(known)})")


def detect(reader: FolderReader) -> bool:
    return reader.exists(CONFIG_FILE)


def owned(path: Path) -> bool:
    return path.name in (CONFIG_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE) or (
        path.is_dir() and ((path / CONFIG_FILE).is_file() or (path / "peftkit_adapter.json").is_file()))


# -- reading -------------------------------------------------------------------------------
def read(reader: FolderReader, name: str | None = None) -> AdapterState:
    """The adapter in the folder of ``reader`` (named ``name``, default ``"default"``)."""
    source = str(reader.root)
    hf = parse_json(reader.read(CONFIG_FILE), reader.root / CONFIG_FILE)
    saved_names = _saved_names(hf.pop(SAVED, None), source)  # modules_to_save: every method, handled here
    codec = codec_for_config(hf, source)
    refused, ignored = codec.unsupported(hf)
    if refused:
        shown = ", ".join(f"{k}={hf[k]!r}" for k in refused)
        raise AdapterLoadError(f"{source}: peft option(s) {shown} change the adapter's math and are not supported "
                               f"by peftkit's {codec.peft_type} reader; refusing to load it as something else")
    if ignored:
        warnings.warn(f"{source}: unknown peft option(s) {', '.join(ignored)} ignored (switched off in the file)",
                      stacklevel=3)
    try:
        config = codec.config_from_hf(hf)
        if not isinstance(config, AdapterConfig):
            raise ConfigError(f"the codec built a {type(config).__name__}")
        config.check_types()
        config.validate()
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise AdapterLoadError(f"{source}: cannot read the peft config: {e}") from None
    raw = _read_tensors(reader)
    copies = _take_copies(raw, saved_names, codec.module_level)
    # keep the entries the file has copies for (peft adds "classifier" and "score" to every SEQ_CLS config)
    present = [n for n in saved_names if any(saved_modules.is_saved(root, [n]) for root, _ in copies)]
    if present:
        config = config.replace(modules_to_save=present)
    shared_keys = {v: k for k, v in codec.shared_names.items()}
    shared = {shared_keys[k]: t for k, t in raw.items() if k in shared_keys}
    raw = {k: t for k, t in raw.items() if k not in shared_keys}
    base = {"name_or_path": hf.get("base_model_name_or_path")}
    name = name or "default"
    copy_tensors = {f"{root}.{rest}": t for (root, rest), t in copies.items()}
    if not codec.module_level:
        tensors = {codec.read_names.get(k, k): t for k, t in raw.items()}
        return AdapterState(name, config, None, {**tensors, **copy_tensors}, shared, {}, base)
    targets, tensors = _split_by_module(raw, codec, source)
    targets += [root for root in dict.fromkeys(root for root, _ in copies)]
    state = AdapterState(name, config, targets, {**tensors, **copy_tensors}, shared, {}, base)
    return codec.from_file(state) if codec.from_file is not None else state


def _saved_names(value: Any, source: str) -> list[str]:
    """peft's ``modules_to_save`` as a list without repeats (peft's SEQ_CLS models append their head names again
    for every adapter)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterLoadError(f"{source}: {SAVED} must be a list of module names, got {value!r}")
    return list(dict.fromkeys(value))


def _take_copies(raw: dict[str, torch.Tensor], names: list[str], module_level: bool) -> dict[tuple[str, str], torch.Tensor]:
    """Remove the ``modules_to_save`` copies from ``raw``: ``{(module path, tensor name): tensor}``. peft keys them
    ``base_model.model.<module>.<tensor>`` (``base_model.<module>.<tensor>`` next to a prompt-learning adapter)."""
    if not names:
        return {}
    prefix = PREFIX if module_level else PROMPT_PREFIX
    out: dict[tuple[str, str], torch.Tensor] = {}
    for key in list(raw):
        k = key[len(prefix):] if key.startswith(prefix) else key
        root = saved_modules.saved_root(k, names)
        if root is not None:
            out[(root, k[len(root) + 1:])] = raw.pop(key)
    return out


def _read_tensors(reader: FolderReader) -> dict[str, torch.Tensor]:
    if reader.exists(WEIGHTS_FILE):
        return parse_safetensors(reader.read(WEIGHTS_FILE), reader.root / WEIGHTS_FILE)
    if reader.exists(LEGACY_WEIGHTS_FILE):
        return read_torch_bin(reader.root / LEGACY_WEIGHTS_FILE, reader.read(LEGACY_WEIGHTS_FILE))
    raise AdapterLoadError(f"{reader.root}: no {WEIGHTS_FILE} (or {LEGACY_WEIGHTS_FILE}) next to {CONFIG_FILE}")


def _split_by_module(raw: dict[str, torch.Tensor], codec: HFCodec,
                     source: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``(module paths in file order, {"<path>.<our name>": tensor})`` from peft's keys."""
    suffixes = sorted(codec.read_names, key=len, reverse=True)
    tensors: dict[str, torch.Tensor] = {}
    order: dict[str, None] = {}
    unknown: list[str] = []
    for key, t in raw.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = next((s for s in suffixes if k.endswith("." + s)), None)
        if match is None:
            if ".base_layer." in k or k.endswith(".base_layer.weight"):
                continue  # peft's copy of a resized embedding/base layer: the model's own weights are used
            unknown.append(key)
            continue
        path = k[: -len(match) - 1]
        order.setdefault(path, None)
        ours = f"{path}.{codec.read_names[match]}"
        if ours in tensors:
            raise AdapterLoadError(f"{source}: two tensors in the file give {ours} ({key} and another)")
        tensors[ours] = t
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise AdapterLoadError(f"{source}: tensors peftkit does not know for {codec.peft_type}: {shown}")
    if not order:
        raise AdapterLoadError(f"{source}: the weights file holds no {codec.peft_type} tensors")
    return list(order), tensors


# -- writing -------------------------------------------------------------------------------
def files(states: list[AdapterState], module_names: list[str] | None = None) -> dict[str, bytes]:
    """``{relative path: bytes}``: the first adapter at the root, the others in ``<name>/`` (peft's layout).

    ``module_names``: every module name of the model, to write ``target_modules`` as leaf names
    where they select exactly the adapted modules (else a regular expression of the full paths).
    """
    out: dict[str, bytes] = {}
    for i, state in enumerate(states):
        prefix = "" if i == 0 else f"{state.name}/"
        out.update({prefix + k: v for k, v in _one(state, module_names).items()})
    return out


def base_fields(state: AdapterState) -> dict[str, Any]:
    cls = str(state.base.get("class") or "")
    # SEQ_CLS makes peft expect a trained copy of the head in the file (it adds "classifier" and "score" to
    # modules_to_save): written when the adapter carries its head, as peft's own SEQ_CLS adapters do
    task = "CAUSAL_LM" if cls.endswith("ForCausalLM") else None
    if cls.endswith("ForSequenceClassification") and saved_modules.entries(state.config):
        task = "SEQ_CLS"
    return {
        "base_model_name_or_path": state.base.get("name_or_path") or None,
        "inference_mode": True,
        "peft_version": PEFT_VERSION,
        "revision": None,
        "task_type": task,
        "auto_mapping": None,
    }


def _one(state: AdapterState, module_names: list[str] | None) -> dict[str, bytes]:
    codec = codec_for_method(state.config.method)
    names = saved_modules.entries(state.config)
    saved = [t for t in state.targets or [] if saved_modules.is_saved(t, names)]
    targets = [t for t in state.targets or [] if t not in saved]
    hf = base_fields(state)
    hf.update(codec.config_to_hf(state.config, targets))
    if codec.module_level:
        if module_names is not None and saved:  # peft never targets modules inside (or equal to) a saved one
            module_names = [n for n in module_names if not any(n == s or n.startswith(s + ".") for s in saved)]
        hf["target_modules"] = target_modules(targets, module_names)
        hf.setdefault("exclude_modules", None)
    hf["peft_type"] = codec.peft_type
    if names:
        hf[SAVED] = list(names)
    tensors: dict[str, torch.Tensor] = {}
    copy_prefix = PREFIX if codec.module_level else PROMPT_PREFIX
    if state.targets is None:  # a value read from a peft prompt-learning file: bare names (copies: full paths)
        own = {k: t for k, t in state.tensors.items() if saved_modules.saved_root(k, names) is None}
        tensors.update({copy_prefix + k: t for k, t in state.tensors.items() if k not in own})
        per_module = [(None, own)]
    else:
        per_module = [(path, state.module_tensors(path)) for path in targets]
        for path in saved:
            tensors.update({f"{copy_prefix}{path}.{k}": t for k, t in state.module_tensors(path).items()})
    for path, mod_state in per_module:
        layer = state.layers.get(path, {}) if path is not None else {}
        if codec.export is not None:
            mod_state = codec.export(mod_state, layer)
        names = codec.names_for(layer)
        for ours, t in mod_state.items():
            if ours in names:
                tensors[f"{PREFIX}{path}.{names[ours]}" if codec.module_level else names[ours]] = t
    for k, t in (state.shared.items() if codec.write_shared(state.config) else ()):
        if k not in codec.shared_names:
            raise ConfigError(f"{state.config.method}: shared tensor {k!r} has no name in the peft format")
        tensors[codec.shared_names[k]] = t
    hf = dict(sorted(hf.items()))
    return {WEIGHTS_FILE: tensors_to_bytes(tensors, {"format": "pt"}), CONFIG_FILE: json_to_bytes(hf)}


def target_modules(targets: list[str], module_names: list[str] | None) -> list[str] | str:
    """peft's ``target_modules`` selecting exactly ``targets``: leaf names when they select exactly
    those modules of the model, else a regular expression of the full paths (peft full-matches a string)."""
    if module_names is not None:
        leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
        selected = {n for n in module_names if n.rsplit(".", 1)[-1] in leaves}
        if selected == set(targets):
            return leaves
    return "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"
