"""Building a server from names and directories, and running it with uvicorn (``peftkit serve``)."""

from __future__ import annotations

import argparse
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from .adapters import AdapterTable, check_dir, check_name
from .app import Limits, create_app
from .encoder import EncoderEngine
from .engine import LAYOUTS, Engine
from .worker import Worker

TASKS = ("causal-lm", "embedding", "classification")
DTYPES = ("float32", "bfloat16", "float16")


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """``["dir", "name=dir", ...]`` → ``[(name, directory)]``; the name defaults to the directory's name."""
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec.rstrip("/")).name
        check_name(name)
        if name in seen:
            raise ConfigError(f"--adapters: the name {name!r} is used twice; give one as NAME=DIR")
        seen.add(name)
        check_dir(Path(path))
        out.append((name, Path(path)))
    return out


def build(model: Any, tokenizer: Any, adapters: list[tuple[str, Path]], max_adapters: int = 8,
          adapter_root: str | Path | None = None, max_batch: int = 16, limits: Limits | None = None,
          merge_single: bool = True, model_name: str = "base", max_waiting: int = 1024,
          layout: str = "auto", max_step_tokens: int = 512, prepack: bool = False) -> tuple[Any, Worker]:
    """``(FastAPI app, engine)`` for ``model`` and its adapters (the first ``max_adapters`` loaded now).

    A model that can generate (a causal LM) gets the generation :class:`Engine`; an encoder gets the
    :class:`EncoderEngine` (embeddings, or classification when it has a classification head).
    ``max_waiting``: requests queued beyond it are refused with 429 (``rate_limit_error``).
    """
    table = AdapterTable(model, max_adapters=max_adapters, root=adapter_root)
    for name, path in adapters:
        table.register(name, path)
    for name, _ in adapters[:max_adapters]:
        table.ensure(name, set())
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    can_generate = getattr(model, "can_generate", None)
    engine: Worker
    if callable(can_generate) and can_generate():
        engine = Engine(model, tokenizer, table, max_batch=max_batch, max_waiting=max_waiting, merge_single=merge_single,
                        layout=layout, max_step_tokens=max_step_tokens, prepack=prepack)
    else:
        engine = EncoderEngine(model, tokenizer, table, max_batch=max_batch, max_waiting=max_waiting, prepack=prepack)
    return create_app(engine, limits, model_name), engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="an alias (smollm2-135m, minilm-l6) or a local directory")
    p.add_argument("--task", default="causal-lm", help="causal-lm (completions, chat) | embedding (/v1/embeddings) | "
                                                       "classification (/v1/classifications; a sequence classifier)")
    p.add_argument("--adapters", nargs="*", default=[], metavar="[NAME=]DIR",
                   help="adapter directories (peftkit or peft format) served under their directory name or NAME")
    p.add_argument("--max-adapters", type=int, default=8, help="adapters held in memory; more are evicted LRU")
    p.add_argument("--adapter-root", default=None,
                   help="directory under which POST /v1/adapters may load adapters (off without it)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="requests queued for the batch at most; more are answered 429 (rate_limit_error)")
    p.add_argument("--max-step-tokens", type=int, default=512,
                   help="prompt tokens per step at most: packed steps prefill a longer prompt in pieces "
                        "over several steps (padded steps admit prompts until it is reached)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--no-merge", action="store_true", help="never merge a lone adapter into the weights")
    p.add_argument("--no-prepack", action="store_true",
                   help="on a CPU, do not keep oneDNN-blocked copies of the linear weights (faster products, twice the "
                        "memory for those weights)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16: the dtype the base model and the "
                                                      "adapters are served in")
    p.add_argument("--engine", default="auto", help="auto | packed | padded: packed steps put the prompts of joining "
                                                    "requests and the running rows' next tokens in one forward (models "
                                                    "with pluggable attention, checked at start); padded prefills "
                                                    "joining requests in a forward of their own (any causal LM)")
    p.add_argument("--log-level", default="warning")


def serve(args: argparse.Namespace) -> int:
    """Validate the arguments, load the model and adapters, and serve until interrupted."""
    import uvicorn

    from ..core.errors import did_you_mean

    if args.task not in TASKS:
        raise ConfigError(f"--task {args.task!r} is unknown{did_you_mean(args.task, TASKS)}; tasks: {', '.join(TASKS)}")
    for flag in ("max_adapters", "max_batch", "max_waiting", "max_tokens_limit", "max_prompt_tokens", "max_body_bytes",
                 "max_step_tokens"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must lie in 0..65535, got {args.port}")
    from ..hub.models import ALIASES

    if args.model not in ALIASES and not Path(args.model).is_dir():
        raise ConfigError(f"--model {args.model!r} is neither an alias{did_you_mean(args.model, ALIASES)} nor a "
                          f"directory; aliases: {', '.join(ALIASES)}")
    if args.engine not in LAYOUTS:
        raise ConfigError(f"--engine {args.engine!r} is unknown{did_you_mean(args.engine, LAYOUTS)}; "
                          f"choose one of {', '.join(LAYOUTS)}")
    if args.engine != "auto" and args.task != "causal-lm":
        raise ConfigError(f"--engine {args.engine} applies to generation (--task causal-lm), not --task {args.task}")
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r} is unknown{did_you_mean(args.dtype, DTYPES)}; "
                          f"choose one of {', '.join(DTYPES)}")
    adapters = parse_adapter_specs(args.adapters)
    if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
        raise ConfigError(f"--adapter-root {args.adapter_root} is not a directory")
    labels = adapter_labels(adapters) if args.task == "classification" else None
    # every torch call of the server runs on one thread (see Worker.claim_thread): this one loads the model and
    # then runs the engine; the main thread runs the HTTP server (and its signal handling)
    ready: Future = Future()

    def engine_thread() -> None:
        try:
            app, engine = _load_and_build(args, adapters, labels)
            engine.claim_thread()
        except BaseException as e:  # reported by the main thread
            ready.set_exception(e)
            return
        ready.set_result((app, engine))
        engine.run_here()

    threading.Thread(target=engine_thread, name="peftkit-engine", daemon=True).start()
    app, engine = ready.result()
    print(f"peftkit serve: {args.model} with {len(adapters)} adapter(s) on http://{args.host}:{args.port}/v1", flush=True)
    try:  # on SIGTERM/Ctrl-C requests in flight get 5 s to finish, then their handlers are cancelled
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0


def _load_and_build(args: argparse.Namespace, adapters: list[tuple[str, Path]], labels: list[str] | None) -> Any:
    from ..hub.models import load_causal_lm, load_encoder, load_tokenizer

    tok = load_tokenizer(args.model)
    if args.task == "causal-lm":
        model, tok = load_causal_lm(args.model, tokenizer=tok)
    else:
        n = (len(labels) if labels else _num_labels(args.model)) if args.task == "classification" else None
        model, tok = load_encoder(args.model, num_labels=n, tokenizer=tok)
        if labels:  # the adapters carry their heads (modules_to_save): the model's head is only their shape
            model.config.id2label = dict(enumerate(labels))
            model.config.label2id = {name: i for i, name in enumerate(labels)}
    import torch

    model.to(getattr(torch, args.dtype))
    limits = Limits(max_tokens=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                    max_body_bytes=args.max_body_bytes)
    return build(model, tok, adapters, args.max_adapters, args.adapter_root, args.max_batch, limits,
                 merge_single=not args.no_merge, max_waiting=args.max_waiting, layout=args.engine,
                 max_step_tokens=args.max_step_tokens, prepack=not args.no_prepack)


def adapter_labels(adapters: list[tuple[str, Path]]) -> list[str] | None:
    """The label names recorded by ``peftkit train --task classification`` with the adapters (``peftkit_task.json``),
    which must agree (one server answers with one label set); None when no adapter records any."""
    from ..tasks import TASK_FILE, read_task

    found: list[tuple[str, list[str]]] = []
    for name, path in adapters:
        if (path / TASK_FILE).is_file():
            labels = read_task(path).get("labels")
            if labels:
                found.append((name, [str(x) for x in labels]))
    for name, labels in found[1:]:
        if labels != found[0][1]:
            raise ConfigError(f"--adapters: {name!r} was trained on labels {labels} but {found[0][0]!r} on "
                              f"{found[0][1]}; one classification server serves one label set")
    return found[0][1] if found else None


def _num_labels(name: str) -> int:
    """The label count in the model's config (a classifier directory), for loading it with its head."""
    from transformers import AutoConfig

    from ..hub.models import ALIASES, alias_dir

    directory = alias_dir(name)[0] if name in ALIASES else Path(name)
    return int(AutoConfig.from_pretrained(directory).num_labels)
