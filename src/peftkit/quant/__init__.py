"""Quantized frozen bases (QLoRA-style NF4, int8) through torchao: see :mod:`peftkit.quant.model`."""

from .export import QuantizedLinear, export_quantized, load_quantized, save_quantized
from .loftq import loftq
from .model import dequantize, merge_errors, quantize, quantized_layers
from .schemes import SCHEMES, scheme_of, storage_bytes

__all__ = ["SCHEMES", "QuantizedLinear", "dequantize", "export_quantized", "load_quantized", "loftq", "merge_errors",
           "quantize", "quantized_layers", "save_quantized", "scheme_of", "storage_bytes"]
