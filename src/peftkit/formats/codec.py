"""How a method's adapter maps to the Hugging Face PEFT file format: :class:`HFCodec`.

A method that ``peft`` also has declares ``hf_codec = HFCodec(...)`` on its config class. The
codec knows nothing of models: it translates a config to and from peft's ``adapter_config.json``
fields, and one adapted layer's tensors to and from peft's tensor names, given the layer facts
recorded in the :class:`~peftkit.core.adapter_state.AdapterState` (``{"kind": "linear", ...}``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: fields of every peft config that describe the file, not the adapter's math
META_KEYS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "modules_to_save",
})


def is_neutral(value: Any) -> bool:
    """Values by which an option is switched off in peft configs."""
    return value is None or value is False or value in ("", "none") or (isinstance(value, (list, dict)) and not value)


@dataclass(frozen=True)
class HFCodec:
    """peft's form of one method.

    * ``peft_type``: peft's ``peft_type`` string (``"LORA"``); ``accepts(hf_config)`` picks between
      methods sharing one (LoRA and DoRA share ``LORA``).
    * ``config_to_hf(config, targets)`` / ``config_from_hf(hf_config)``: the options.
    * ``options``: the peft config keys ``config_from_hf`` reads; ``defaults``: other peft keys that
      do not change the adapter at these values. Any other key with a value that is not neutral
      (None, False, empty) is refused at load, by name: peftkit would compute something else.
    * ``read_names``: peft tensor name → peftkit state name (several peft names may map to one);
      ``write_names(layer)``: peftkit name → peft name for one layer (default: the first peft name
      of each state name in ``read_names``).
    * ``export(state, layer)``: the layer's state as written (when it is not a renaming only).
    * ``shared_names``: peftkit shared tensor name → peft's full key; ``write_shared(config)``: whether
      they are written (VeRA: only with ``save_projection``; else peft regenerates them from the seed).
    * ``module_level``: False for prompt-learning methods, whose keys carry no module path.
    * ``write_only``: True when peft files of this ``peft_type`` are read by another method (Chain of
      LoRA is written as a LoRA, which reads back as :class:`~peftkit.LoRA`); the method table says so.
    * ``from_file(state)``: the state as read → the state the method's modules hold, where peft
      stores it in another shape (AdaLoRA's pruned triplets dropped from the file). Default: as read.
    """

    peft_type: str
    config_to_hf: Callable[[Any, list[str]], dict[str, Any]]
    config_from_hf: Callable[[dict[str, Any]], Any]
    read_names: Mapping[str, str]
    write_names: Callable[[dict[str, Any]], Mapping[str, str]] | Mapping[str, str] | None = None
    accepts: Callable[[dict[str, Any]], bool] = lambda d: True
    options: frozenset[str] = frozenset()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    export: Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]] | None = None
    shared_names: Mapping[str, str] = field(default_factory=dict)
    write_shared: Callable[[Any], bool] = lambda config: True
    module_level: bool = True
    from_file: Callable[[Any], Any] | None = None
    write_only: bool = False

    def names_for(self, layer: dict[str, Any]) -> Mapping[str, str]:
        if callable(self.write_names):
            return self.write_names(layer)
        if self.write_names is not None:
            return self.write_names
        out: dict[str, str] = {}
        for peft_name, ours in self.read_names.items():
            out.setdefault(ours, peft_name)
        return out

    def unsupported(self, hf: dict[str, Any]) -> tuple[list[str], list[str]]:
        """``(refused, ignored)``: option names that would change the math, and unknown neutral ones."""
        refused, ignored = [], []
        for key, value in hf.items():
            if key in META_KEYS or key in self.options:
                continue
            if key in self.defaults:
                if value != self.defaults[key] and not is_neutral(value):
                    refused.append(key)
                continue
            if is_neutral(value):
                ignored.append(key)
            else:
                refused.append(key)
        return refused, ignored
