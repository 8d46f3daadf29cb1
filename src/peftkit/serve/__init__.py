"""Serving many adapters over one base model: an adapter table with LRU eviction, a continuous-batching
engine that groups rows by adapter (``peftkit.mixed_batch``), and an OpenAI-compatible HTTP server.

    from peftkit.serve import build
    app, engine = build(model, tokenizer, [("support", "adapters/support")], max_adapters=8)
    # uvicorn.run(app, port=8000), or `peftkit serve --model smollm2-135m --adapters adapters/*`

The engine and table import only torch; the HTTP app needs the ``serve`` extra (fastapi, uvicorn).
"""

from .adapters import AdapterTable
from .app import Limits, create_app
from .decoding import SamplingParams
from .engine import Delta, Engine, Failed, Finished, GenerationRequest
from .server import build

__all__ = ["AdapterTable", "Delta", "Engine", "Failed", "Finished", "GenerationRequest", "Limits", "SamplingParams",
           "build", "create_app"]
