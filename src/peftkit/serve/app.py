"""The OpenAI-compatible HTTP server (FastAPI): completions, chat, SSE streaming, adapters, metrics.

Endpoints

* ``POST /v1/completions`` and ``POST /v1/chat/completions`` — ``model`` is ``base`` or an adapter
  name; chat messages go through the tokenizer's chat template; ``"stream": true`` answers with
  server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``).
* ``GET /v1/models`` — the base model and every known adapter (loaded or not).
* ``POST /v1/adapters`` ``{"name", "path"}`` — load an adapter from a directory inside the adapter
  root; ``DELETE /v1/adapters/{name}`` — unload and forget it.
* ``GET /health`` and ``GET /metrics`` (Prometheus text).

Handlers run on the event loop and never touch the model: they validate and tokenize (with their
own copy of the tokenizer), hand a :class:`~peftkit.serve.engine.GenerationRequest` to the engine
thread and await its events. A bad request is answered 4xx in the OpenAI error shape naming the
field; an unexpected failure is answered 500 and the server keeps serving.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at definition time

import asyncio
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..core.errors import AdapterLoadError, AdapterNotFoundError, ConfigError, PeftkitError
from .adapters import BASE
from .encoder import EncoderEngine, EncodeRequest
from .engine import Delta, Failed, Finished, GenerationRequest, QueueFull
from .protocol import AdapterLoad, ApiError, ChatRequest, CompletionRequest, EncodeBody, parse
from .worker import Worker


@dataclass
class Limits:
    """Bounds on what one request may ask for."""

    max_tokens: int = 1024  # largest max_tokens a request may set
    default_max_tokens: int = 16  # when the request does not say (the OpenAI default for completions)
    max_prompt_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    max_prompts: int = 16  # prompts in one /v1/completions request


def create_app(engine: Worker, limits: Limits | None = None, model_name: str = "base") -> Any:
    """The FastAPI application serving ``engine`` (started by the app's lifespan, stopped with it).

    A generation :class:`~peftkit.serve.engine.Engine` gets the completion endpoints; an
    :class:`~peftkit.serve.encoder.EncoderEngine` ``/v1/embeddings`` or ``/v1/classifications``.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    tok = copy.deepcopy(engine.tokenizer)  # the engine thread decodes with its own copy
    table = engine.table
    metrics = engine.metrics
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="peftkit serve", lifespan=lifespan)

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "path", "query")]
        return error_response(ApiError(400, f"{'.'.join(loc)}: {err.get('msg', 'invalid')}", ".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(e.status_code, str(e.detail), None, kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the request body has {declared} bytes; the limit is {limits.max_body_bytes}", "body")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"the request body exceeds {limits.max_body_bytes} bytes", "body")
            chunks.append(chunk)
        return b"".join(chunks)

    def adapter_of(name: str) -> str | None:
        if name in (BASE, model_name):
            return None
        try:
            table.check_known(name)
        except AdapterNotFoundError as e:
            raise ApiError(404, str(e), "model", "invalid_request_error", "model_not_found") from None
        return name

    def check_lengths(ids: list[int], max_tokens: int, field: str) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty (no tokens); give at least one token", field)
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}", "max_tokens")
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server allows at most "
                                f"{limits.max_prompt_tokens}", field)
        if len(ids) + max_tokens > engine.max_context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {engine.max_context} tokens; lower max_tokens", "max_tokens")

    def completion_prompts(req: CompletionRequest) -> list[list[int]]:
        from ..data import prompt_ids

        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            vocab = len(tok)
            if any(not 0 <= x < vocab for x in p):  # type: ignore[operator]
                raise ApiError(400, f"prompt: token ids must lie in [0, {vocab})", "prompt")
            return [list(p)]  # type: ignore[arg-type]
        texts = [p] if isinstance(p, str) else list(p)  # type: ignore[arg-type]
        if len(texts) > limits.max_prompts:
            raise ApiError(400, f"prompt holds {len(texts)} prompts; at most {limits.max_prompts} per request", "prompt")
        return prompt_ids(tok, [str(t) for t in texts], "plain")

    def chat_prompt(req: ChatRequest) -> list[int]:
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "the model's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            text = tok.apply_chat_template(req.conversation(), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # errors raised by the template itself ("roles must alternate", ...)
            raise ApiError(400, f"the chat template failed on these messages: {e}", "messages") from None
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def submit(prompts: list[list[int]], adapter: str | None, req: Any) -> tuple[list[GenerationRequest], asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        out = []
        for i, ids in enumerate(prompts):
            def emit(ev: Any, i: int = i) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, ev))
                except RuntimeError:  # the event loop is gone (shutdown)
                    pass
            params = req.sampling(limits.default_max_tokens)
            try:
                out.append(engine.submit(GenerationRequest(ids, adapter, params, emit, deltas=bool(req.stream))))
            except QueueFull as e:
                for r in out:
                    r.cancel()
                raise ApiError(429, str(e), None, "rate_limit_error") from None
        return out, events

    async def run(endpoint: str, http_request: Request, req: Any, prompts: list[list[int]], chat: bool) -> Any:
        adapter = adapter_of(req.model)
        sampling = req.sampling(limits.default_max_tokens)
        for ids in prompts:  # the context limit is the generation engine's
            check_lengths(ids, sampling.max_tokens, "messages" if chat else "prompt")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        requests, events = submit(prompts, adapter, req)
        if req.stream:
            return StreamingResponse(stream(endpoint, req, rid, chat, requests, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finished: dict[int, Finished] = {}
        try:
            while len(finished) < len(requests):
                try:
                    i, ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http_request.is_disconnected():  # nobody waits for the answer: stop generating
                        raise ApiError(499, "the client closed the connection") from None
                    continue
                if isinstance(ev, Failed):
                    raise _failed(ev)
                if isinstance(ev, Finished):
                    finished[i] = ev
        except BaseException:
            for r in requests:
                r.cancel()
            raise
        usage = _usage(finished.values())
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": f.text}, "finish_reason": f.reason,
                        "logprobs": None} for i, f in sorted(finished.items())]
            body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                    "choices": choices, "usage": usage}
        else:
            choices = [{"index": i, "text": f.text, "finish_reason": f.reason, "logprobs": None}
                       for i, f in sorted(finished.items())]
            body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
                    "choices": choices, "usage": usage}
        metrics.request(endpoint, "ok")
        return body

    async def stream(endpoint: str, req: Any, rid: str, chat: bool, requests: list[GenerationRequest],
                     events: asyncio.Queue) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        now = int(time.time())

        def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
            body: dict[str, Any] = {"id": rid, "object": obj, "created": now, "model": req.model, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        def choice(i: int, text: str | None, reason: str | None, first: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                    {"content": text} if text is not None else {})
                return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}

        finished: dict[int, Finished] = {}
        try:
            if chat:
                yield chunk([choice(i, None, None, first=True) for i in range(len(requests))])
            while len(finished) < len(requests):
                i, ev = await events.get()
                if isinstance(ev, Delta):
                    yield chunk([choice(i, ev.text, None)])
                elif isinstance(ev, Finished):
                    finished[i] = ev
                    yield chunk([choice(i, None if chat else "", ev.reason)])
                elif isinstance(ev, Failed):
                    metrics.request(endpoint, _outcome(ev.status))
                    yield b"data: " + json.dumps(_failed(ev).body()).encode() + b"\n\n"
                    yield b"data: [DONE]\n\n"
                    return
            if req.include_usage:
                yield chunk([], _usage(finished.values()))
            yield b"data: [DONE]\n\n"
            metrics.request(endpoint, "ok")
        finally:
            if len(finished) < len(requests):  # the client went away (or an error): stop generating
                for r in requests:
                    r.cancel()

    async def guarded(endpoint: str, request: Request, handler) -> Any:
        try:
            return await handler(await read_body(request))
        except ApiError as e:
            metrics.request(endpoint, _outcome(e.status))
            return error_response(e)

    async def encode(endpoint: str, http_request: Request, body: bytes) -> Any:
        req = parse(EncodeBody, body)
        adapter = adapter_of(req.model)
        texts = req.texts()
        if len(texts) > engine.max_batch:
            raise ApiError(400, f"input holds {len(texts)} texts; at most {engine.max_batch} per request", "input")
        for t in texts:
            n = len(tok(t, add_special_tokens=True)["input_ids"])
            if n > limits.max_prompt_tokens:
                raise ApiError(400, f"an input has {n} tokens; this server allows at most {limits.max_prompt_tokens}",
                               "input")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def emit(ev: Any) -> None:
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(ev))
            except RuntimeError:
                pass

        try:
            r = engine.submit(EncodeRequest(texts, adapter, emit))
        except QueueFull as e:
            raise ApiError(429, str(e), None, "rate_limit_error") from None
        try:
            ev = await done
        except BaseException:
            r.cancel()
            raise
        if isinstance(ev, Failed):
            raise _failed(ev)
        usage = {"prompt_tokens": ev.prompt_tokens, "total_tokens": ev.prompt_tokens}
        metrics.request(endpoint, "ok")
        if endpoint == "embeddings":
            data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, req.encoding_format)}
                    for i, v in enumerate(ev.vectors)]
        else:
            data = [{"object": "classification", "index": i, "label": ev.labels[max(range(len(v)), key=v.__getitem__)],
                     "probabilities": dict(zip(ev.labels, v, strict=True))} for i, v in enumerate(ev.vectors)]
        return {"object": "list", "data": data, "model": req.model, "usage": usage}

    if isinstance(engine, EncoderEngine):
        path = "/v1/embeddings" if engine.kind == "embedding" else "/v1/classifications"
        endpoint = "embeddings" if engine.kind == "embedding" else "classifications"

        @app.post(path)
        async def encode_endpoint(request: Request) -> Any:
            return await guarded(endpoint, request, lambda body: encode(endpoint, request, body))
    else:
        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            async def handle(body: bytes) -> Any:
                req = parse(CompletionRequest, body)
                return await run("completions", request, req, completion_prompts(req), chat=False)
            return await guarded("completions", request, handle)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Any:
            async def handle(body: bytes) -> Any:
                req = parse(ChatRequest, body)
                return await run("chat", request, req, [chat_prompt(req)], chat=True)
            return await guarded("chat", request, handle)

    def model_card(name: str, loaded: bool, path: str | None = None) -> dict:
        card: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "peftkit",
                                "loaded": loaded}
        if name != BASE:
            card.update({"parent": BASE, "root": path})
        return card

    @app.get("/v1/models")
    async def models() -> dict:
        data = [model_card(BASE, True)] + [model_card(a["name"], a["loaded"], a["path"]) for a in table.describe()]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> Any:
        async def handle(body: bytes) -> Any:
            req = parse(AdapterLoad, body)

            def work() -> str:
                table.register(req.name, req.path, from_root=True)
                try:
                    table.ensure(req.name, engine.busy())  # load now: a broken adapter fails here, not later
                except PeftkitError:
                    table.forget(req.name)
                    raise
                return str(table.known[req.name].path)

            try:
                path = await asyncio.wrap_future(engine.call(work))
            except ConfigError as e:
                msg = str(e)
                conflict = "already known" in msg
                field = "name" if ("adapter name" in msg or conflict) else "path"
                raise ApiError(409 if conflict else 400, msg, field) from None
            except AdapterLoadError as e:
                raise ApiError(400, str(e), "path") from None
            metrics.request("adapters", "ok")
            return JSONResponse(model_card(req.name, req.name in table.loaded(), path), status_code=201)
        return await guarded("adapters", request, handle)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> Any:
        def work() -> None:
            table.check_known(name)
            if name in engine.busy() or any(r.adapter == name for r in engine.waiting):
                raise ApiError(409, f"adapter {name!r} has requests in flight; retry when they are done", "name")
            table.forget(name)

        try:
            await asyncio.wrap_future(engine.call(work))
        except AdapterNotFoundError as e:
            metrics.request("adapters", "client_error")
            return error_response(ApiError(404, str(e), "name", "invalid_request_error", "model_not_found"))
        except ApiError as e:
            metrics.request("adapters", "client_error")
            return error_response(e)
        metrics.request("adapters", "ok")
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "adapters_known": len(table.names()), "adapters_loaded": len(table.loaded()),
                "running": engine.running_rows, "waiting": engine.queue_length}

    @app.get("/metrics")
    async def prometheus() -> Any:
        gauges = {
            "peftkit_queue_length": ("Requests waiting to join the batch.", engine.queue_length),
            "peftkit_running_requests": ("Requests in the running batch.", engine.running_rows),
            "peftkit_adapters_loaded": ("Adapters in memory.", len(table.loaded())),
            "peftkit_adapters_known": ("Adapters the server can load.", len(table.names())),
            "peftkit_adapters_max": ("Adapters held in memory at most.", table.max_adapters),
        }
        counters = {
            "peftkit_adapter_loads_total": ("Adapter loads (first loads and reloads after eviction).", table.loads),
            "peftkit_adapter_evictions_total": ("Adapters evicted (least recently used).", table.evictions),
            "peftkit_merged_steps_total": ("Forwards on the merged single-adapter fast path.",
                                           getattr(engine, "merged_steps", 0)),
            "peftkit_mixed_steps_total": ("Forwards through the grouped mixed-adapter path.", engine.mixed_steps),
        }
        return PlainTextResponse(metrics.render(gauges, counters), media_type="text/plain; version=0.0.4")

    return app


def _failed(ev: Failed) -> ApiError:
    """The HTTP error of a request the engine could not serve."""
    kind = "invalid_request_error" if ev.status < 500 else "server_error"
    return ApiError(ev.status, ev.message, ev.param, kind, ev.code)


def _outcome(status: int) -> str:
    """The ``outcome`` label of ``peftkit_requests_total`` for an error status (429: the queue was full)."""
    return "rate_limited" if status == 429 else "client_error" if status < 500 else "server_error"


def _usage(done: Any) -> dict[str, int]:
    done = list(done)
    prompt = sum(f.prompt_tokens for f in done)
    completion = sum(f.completion_tokens for f in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _encode_vector(v: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        import base64
        import struct

        return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
    return v
