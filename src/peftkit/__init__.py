"""peftkit: parameter-efficient fine-tuning for any PyTorch model.

    import peftkit
    model = peftkit.attach(model, peftkit.LoRA(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
"""

__version__ = "0.1.0"

from .core.api import (
    activate,
    adapter_parameters,
    attach,
    delete,
    disabled,
    get_adapter,
    merge,
    mixed_batch,
    set_trainable,
    unload,
    unmerge,
)
from .core.config import AdapterConfig
from .core.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    ConfigError,
    NotMergeableError,
    PeftkitError,
    TargetError,
)
from .core.model import active_names, adapter_names
from .core.registry import METHODS, get_method, method_table, register
from .core.state import load, save
from .core.summary import summary
from .memory import memory_report
from .methods.bottleneck import Bottleneck
from .methods.dora import DoRA
from .methods.ia3 import IA3
from .methods.lora import LoRA, lora_plus_param_groups
from .methods.oft import OFT
from .methods.prompt import PromptTuning
from .methods.selection import BitFit, LayerNormTuning
from .methods.sparse import SparseFT, fish_scores

__all__ = [
    "IA3",
    "METHODS",
    "OFT",
    "AdapterConfig",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "BitFit",
    "Bottleneck",
    "ConfigError",
    "DoRA",
    "LayerNormTuning",
    "LoRA",
    "NotMergeableError",
    "PeftkitError",
    "PromptTuning",
    "SparseFT",
    "TargetError",
    "activate",
    "active_names",
    "adapter_names",
    "adapter_parameters",
    "attach",
    "delete",
    "disabled",
    "fish_scores",
    "get_adapter",
    "get_method",
    "load",
    "lora_plus_param_groups",
    "memory_report",
    "merge",
    "method_table",
    "mixed_batch",
    "register",
    "save",
    "set_trainable",
    "summary",
    "unload",
    "unmerge",
]
