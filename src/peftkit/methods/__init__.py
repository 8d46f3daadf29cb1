"""One file per method (or small family); importing this package registers them all."""

from . import lora  # noqa: F401
