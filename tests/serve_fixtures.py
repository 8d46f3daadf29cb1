"""Shared pieces of the serving tests: a tiny Llama whose vocabulary is the tiny tokenizer's, random
LoRA adapters saved in both formats, a server on a free loopback port, and reference decoding."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import torch

import peftkit

from .tiny_tokenizers import llama_tok

TARGETS = ["q_proj", "v_proj", "o_proj"]


def tiny_lm(seed: int = 0):
    """A 2-layer Llama over the tiny tokenizer's vocabulary (every id decodes to a word), context 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama_tok()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the default init: greedy choices are far from ties
        model.lm_head.weight.mul_(8.0)
    return model, tok


def make_adapters(root: Path, names: list[str], hf: tuple[str, ...] = ()) -> dict[str, Path]:
    """LoRA adapters (r=4 on q/v/o) with random A and B (so each changes the output), saved under ``root``."""
    out = {}
    for k, name in enumerate(names):
        model, _ = tiny_lm()
        peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=TARGETS), name=name)
        g = torch.Generator().manual_seed(1000 + k)
        with torch.no_grad():
            for p in peftkit.adapter_parameters(model).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        out[name] = peftkit.save(model, root / name, format="hf" if name in hf else "peftkit")
    return out


def reference(adapter_dir: Path | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy ``model.generate`` of a fresh model with only this adapter (None: the base), cut at eos."""
    model, tok = tiny_lm()
    if adapter_dir is not None:
        peftkit.load(model, adapter_dir, name="only")
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    gen = out[0, ids.shape[1]:].tolist()
    return gen[:gen.index(tok.eos_token_id)] if tok.eos_token_id in gen else gen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout: float = 30.0):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
