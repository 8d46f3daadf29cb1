"""Adapter compression: ComPEFT (sparse ternary, entropy-coded) and int8 / int4 factors; see :mod:`.api`."""

from .api import METHODS, compress

__all__ = ["METHODS", "compress"]
