"""peftkit: parameter-efficient fine-tuning for any PyTorch model.

    import peftkit
    model = peftkit.attach(model, peftkit.LoRA(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
"""

from ._version import __version__ as __version__
from .compress import compress
from .core.adapter_state import AdapterState, extract, install
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
from .core.config import AdapterConfig, LowRankOptions
from .core.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    ConfigError,
    NotMergeableError,
    PeftkitError,
    TargetError,
)
from .core.hooks import StepInfo, after_backward, after_step, before_step, regularization_loss, training_hooks
from .core.model import active_names, adapter_names
from .core.registry import METHODS, get_method, method_table, register
from .core.summary import summary
from .core.task_ids import task_ids
from .io import load, read_adapters, save, write_adapters
from .memory import memory_report
from .merging import extract_lora, learn_coefficients, merge_adapters, merge_checkpoints
from .methods.adalora import AdaLoRA
from .methods.boft import BOFT
from .methods.bottleneck import Bottleneck
from .methods.chain_lora import ChainLoRA
from .methods.corda import CorDA, corda_calibrate
from .methods.dept import DePT, dept_param_groups
from .methods.dora import DoRA
from .methods.dylora import DyLoRA
from .methods.hft import HFT
from .methods.ia3 import IA3
from .methods.increlora import IncreLoRA
from .methods.kradapter import KRAdapter
from .methods.loha import LoHa
from .methods.lokr import LoKr
from .methods.lora import LoRA, lora_plus_param_groups
from .methods.meft import MEFT
from .methods.molora import MoLoRA
from .methods.nola import NOLA
from .methods.oft import OFT
from .methods.paca import PaCA
from .methods.parallel_adapter import MAM
from .methods.poly import Poly
from .methods.prefix import PrefixTuning
from .methods.prompt import PromptTuning
from .methods.qat_lora import L4Q, LRQAT, qat_param_groups
from .methods.rosa import RoSA
from .methods.sara import SaRA
from .methods.selection import BitFit, LayerNormTuning
from .methods.sorsa import SORSA
from .methods.sparse import SparseFT, fish_scores
from .methods.spiel import SpIEL
from .methods.ssf import SSF
from .methods.svfit import SVFit
from .methods.vera import VeRA

__all__ = [
    "BOFT",
    "HFT",
    "IA3",
    "L4Q",
    "LRQAT",
    "MAM",
    "MEFT",
    "METHODS",
    "NOLA",
    "OFT",
    "SORSA",
    "SSF",
    "AdaLoRA",
    "AdapterConfig",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "AdapterState",
    "BitFit",
    "Bottleneck",
    "ChainLoRA",
    "ConfigError",
    "CorDA",
    "DePT",
    "DoRA",
    "DyLoRA",
    "IncreLoRA",
    "KRAdapter",
    "LayerNormTuning",
    "LoHa",
    "LoKr",
    "LoRA",
    "LowRankOptions",
    "MoLoRA",
    "NotMergeableError",
    "PaCA",
    "PeftkitError",
    "Poly",
    "PrefixTuning",
    "PromptTuning",
    "RoSA",
    "SVFit",
    "SaRA",
    "SpIEL",
    "SparseFT",
    "StepInfo",
    "TargetError",
    "VeRA",
    "activate",
    "active_names",
    "adapter_names",
    "adapter_parameters",
    "after_backward",
    "after_step",
    "attach",
    "before_step",
    "compress",
    "corda_calibrate",
    "delete",
    "dept_param_groups",
    "disabled",
    "extract",
    "extract_lora",
    "fish_scores",
    "get_adapter",
    "get_method",
    "install",
    "learn_coefficients",
    "load",
    "lora_plus_param_groups",
    "memory_report",
    "merge",
    "merge_adapters",
    "merge_checkpoints",
    "method_table",
    "mixed_batch",
    "qat_param_groups",
    "read_adapters",
    "register",
    "regularization_loss",
    "save",
    "set_trainable",
    "summary",
    "task_ids",
    "training_hooks",
    "unload",
    "unmerge",
    "write_adapters",
]
