"""The server's error paths on a real loopback server: a full queue (429), deleting an adapter in use
(409), a request for an evicted adapter while every loaded one is busy, and a client that goes away
in the middle of a stream.

Nothing here waits on timing: the engine is stopped at a known point, either idle (a control call
that blocks on an Event) or inside a forward while a chosen request is running (a forward pre-hook
on the model that blocks on an Event), and the tests poll engine state with a deadline.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import socket
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from peftkit.serve import Limits, build

from .serve_fixtures import make_adapters, reference, running_server, tiny_lm

openai = pytest.importorskip("openai")

PROMPT = "a b c"  # greedy decoding of a0, a1 and "extra" reaches 60 tokens without an eos (checked below)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One adapter in memory, two batch rows, one waiting request at most."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = make_adapters(root, ["a0", "a1", "extra"])
    model, tok = tiny_lm()
    app, engine = build(model, tok, [(n, dirs[n]) for n in ("a0", "a1")], max_adapters=1, adapter_root=root,
                        max_batch=2, max_waiting=1, limits=Limits(max_tokens=64, max_prompt_tokens=100))
    with running_server(app) as url:
        yield url, engine, tok, dirs


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


class PauseInForward:
    """Stops the engine thread at the start of the first forward for which ``when()`` holds, until released."""

    def __init__(self, engine, when: Callable[[], bool]) -> None:
        self.when = when
        self.paused = threading.Event()
        self._resume = threading.Event()
        self._handle = engine.model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        if not self.paused.is_set() and self.when():
            self.paused.set()
            self._resume.wait(60)

    def wait(self) -> None:
        assert self.paused.wait(60), "the engine never reached the forward to pause in"

    def release(self) -> None:
        self._handle.remove()
        self._resume.set()

    def __enter__(self) -> PauseInForward:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def requests_total(url: str, endpoint: str, outcome: str) -> float:
    return metric(url, "peftkit_requests_total", f'{{endpoint="{endpoint}",outcome="{outcome}"}}')


def complete(url: str, model: str, max_tokens: int, prompt: str = PROMPT) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0}, timeout=60)


def greedy(tok, dirs, name: str, n: int) -> str:
    ids = reference(dirs[name], tok(PROMPT)["input_ids"], n)
    assert len(ids) == n, f"{name} ends with an eos after {len(ids)} tokens: the test needs a longer run"
    return tok.decode(ids, skip_special_tokens=True)


def test_full_queue_answers_429_rate_limit_error_and_keeps_serving(server):
    url, engine, tok, dirs = server
    before = requests_total(url, "completions", "rate_limited")
    gate = threading.Event()
    paused = engine.call(gate.wait)  # the engine thread blocks here: nothing leaves the queue
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            first = pool.submit(complete, url, "base", 3)
            wait_until(lambda: engine.queue_length == 1, "the first request is queued")
            r = complete(url, "a0", 3)
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and "max 1" in err["message"] and err["code"] is None
            streamed = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": PROMPT, "max_tokens": 3,
                                                                 "stream": True}, timeout=30)
            assert streamed.status_code == 429 and streamed.json()["error"]["type"] == "rate_limit_error"
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert info.value.status_code == 429
            assert engine.queue_length == 1  # refused requests never entered the queue
            gate.set()
            paused.result(30)
            assert first.result(60).status_code == 200  # the queued request is served
    finally:
        gate.set()
    assert requests_total(url, "completions", "rate_limited") == before + 2
    assert requests_total(url, "chat", "rate_limited") >= 1
    later = complete(url, "a0", 5)  # and so is the next one
    assert later.status_code == 200 and later.json()["choices"][0]["text"] == greedy(tok, dirs, "a0", 5)
    assert engine.queue_length == 0 and metric(url, "peftkit_queue_length") == 0


def test_delete_of_an_adapter_in_use_is_409_then_succeeds_when_done(server):
    url, engine, tok, dirs = server
    h = httpx.Client(base_url=url, timeout=60)
    assert h.post("/v1/adapters", json={"name": "victim", "path": "extra"}).status_code == 201
    n = 8
    want = greedy(tok, dirs, "extra", n)
    with PauseInForward(engine, lambda: "victim" in engine.busy()) as pause, cf.ThreadPoolExecutor(2) as pool:
        running = pool.submit(complete, url, "victim", n)
        pause.wait()  # a decode step of the victim request: it holds a batch row and has more tokens to go
        deleting = pool.submit(h.delete, "/v1/adapters/victim")
        wait_until(lambda: engine.inbox.qsize() == 1, "the delete is queued for the engine")
        pause.release()  # the step ends; the delete runs before the next one, with the request still running
        r = deleting.result(60)
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["param"] == "name" and "'victim'" in err["message"] and err["type"] == "invalid_request_error"
        assert running.result(60).json()["choices"][0]["text"] == want  # the request was not disturbed
    assert "victim" in [m["id"] for m in h.get("/v1/models").json()["data"]]
    r = h.delete("/v1/adapters/victim")
    assert r.status_code == 200 and r.json() == {"id": "victim", "object": "model", "deleted": True}
    assert "victim" not in [m["id"] for m in h.get("/v1/models").json()["data"]]
    assert "victim" not in engine.table.names() and "victim" not in engine.table.loaded()
    assert complete(url, "victim", 2).status_code == 404


def test_delete_while_a_request_for_it_waits_is_409(server):
    url, engine, tok, dirs = server
    h = httpx.Client(base_url=url, timeout=60)
    assert h.post("/v1/adapters", json={"name": "queued", "path": "extra"}).status_code == 201
    gate = threading.Event()
    paused = engine.call(gate.wait)
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(complete, url, "queued", 3)
            wait_until(lambda: engine.inbox.qsize() == 1 and engine.queue_length == 1, "the request is queued")
            deleting = pool.submit(h.delete, "/v1/adapters/queued")
            wait_until(lambda: engine.inbox.qsize() == 2, "the delete is queued behind the request")
            gate.set()
            paused.result(30)
            r = deleting.result(60)
            assert r.status_code == 409 and "'queued'" in r.json()["error"]["message"], r.text
            assert waiting.result(60).json()["choices"][0]["text"] == greedy(tok, dirs, "extra", 3)
    finally:
        gate.set()
    assert h.delete("/v1/adapters/queued").status_code == 200


def test_request_for_an_adapter_deleted_before_it_was_admitted_is_404(server):
    """The request was checked against the known adapters, but the delete reached the engine first."""
    url, engine = server[:2]
    h = httpx.Client(base_url=url, timeout=60)
    assert h.post("/v1/adapters", json={"name": "gone", "path": "extra"}).status_code == 201
    gate = threading.Event()
    paused = engine.call(gate.wait)
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            deleting = pool.submit(h.delete, "/v1/adapters/gone")
            wait_until(lambda: engine.inbox.qsize() == 1, "the delete is queued")
            asking = pool.submit(complete, url, "gone", 3)
            wait_until(lambda: engine.inbox.qsize() == 2, "the request is queued behind the delete")
            gate.set()
            paused.result(30)
            assert deleting.result(60).status_code == 200  # nothing for it was running or waiting yet
            r = asking.result(60)
    finally:
        gate.set()
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "'gone'" in err["message"]
    assert engine.queue_length == 0 and complete(url, "a0", 2).status_code == 200


def test_request_for_an_evicted_adapter_waits_for_the_busy_one_and_is_served(server):
    url, engine, tok, dirs = server
    assert complete(url, "a0", 1).status_code == 200  # a0 is the one adapter in memory
    assert engine.table.loaded() == ["a0"]
    evictions = engine.table.evictions
    seen: list[tuple[frozenset, frozenset]] = []  # (adapters running, adapters waiting) at every forward
    record = engine.model.register_forward_pre_hook(lambda m, a: seen.append(
        (frozenset(r.adapter for r in engine.running), frozenset(r.adapter for r in engine.waiting))))
    try:
        with PauseInForward(engine, lambda: "a0" in engine.busy()) as pause, cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(complete, url, "a0", 8)
            pause.wait()
            second = pool.submit(complete, url, "a1", 6)  # a1 is not in memory and a0 (the only slot) is busy
            wait_until(lambda: engine.inbox.qsize() == 1, "the a1 request reached the engine")
            pause.release()
            assert first.result(60).json()["choices"][0]["text"] == greedy(tok, dirs, "a0", 8)
            got = second.result(60)
            assert got.status_code == 200, got.text
            assert got.json()["choices"][0]["text"] == greedy(tok, dirs, "a1", 6)
    finally:
        record.remove()
    assert (frozenset({"a0"}), frozenset({"a1"})) in seen  # a1 waited while a0's row decoded, with a batch row free
    assert not any({"a0", "a1"} <= running for running, _ in seen)  # they never shared a forward
    assert engine.table.loaded() == ["a1"] and engine.table.evictions == evictions + 1


def test_client_disconnect_mid_stream_cancels_the_request(server):
    url, engine, tok, dirs = server
    cancelled = engine.metrics.requests.get(("generate", "cancelled"), 0)
    generated = metric(url, "peftkit_generation_tokens_total")
    n = 60
    greedy(tok, dirs, "a0", n)  # without the disconnect the request would run all 60 steps
    body = {"model": "a0", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True}
    with PauseInForward(engine, lambda: "a0" in engine.busy()) as pause:
        with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions", json=body) as s:
            assert s.status_code == 200
            pause.wait()  # the request is running, the engine stopped in its first decode step
            row = engine.running[0]
        # the connection is closed: the server notices and cancels the request while the engine is paused
        wait_until(lambda: row.cancelled, "the server cancels the request of the closed stream")
    wait_until(lambda: engine.running_rows == 0, "the cancelled row leaves the batch")
    assert len(row.tokens) < n
    assert metric(url, "peftkit_running_requests") == 0 and metric(url, "peftkit_queue_length") == 0
    assert engine.metrics.requests[("generate", "cancelled")] == cancelled + 1
    assert requests_total(url, "generate", "cancelled") == cancelled + 1
    assert metric(url, "peftkit_generation_tokens_total") - generated < n
    r = complete(url, "a0", 4)  # the server keeps serving
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(tok, dirs, "a0", 4)


def test_client_disconnect_during_a_plain_request_cancels_it(server):
    """A non-streamed request notices the closed connection within a second (it polls) and cancels."""
    url, engine, tok, dirs = server
    greedy(tok, dirs, "a0", 60)
    body = json.dumps({"model": "a0", "prompt": PROMPT, "max_tokens": 60, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    host, port = url.removeprefix("http://").split(":")
    with PauseInForward(engine, lambda: "a0" in engine.busy()) as pause:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(head + body)
            pause.wait()
            row = engine.running[0]
        wait_until(lambda: row.cancelled, "the server cancels the request of the closed connection")
    wait_until(lambda: engine.running_rows == 0, "the cancelled row leaves the batch")
    assert len(row.tokens) < 60
    assert complete(url, "a0", 3).status_code == 200


def test_max_waiting_is_validated(capsys):
    from peftkit.cli.main import main
    from peftkit.core.errors import ConfigError
    from peftkit.serve import AdapterTable, Engine

    model, tok = tiny_lm()
    with pytest.raises(ConfigError, match="max_waiting must be at least 1, got 0"):
        Engine(model, tok, AdapterTable(model, 1), max_waiting=0)
    assert main(["serve", "--model", "smollm2-135m", "--max-waiting", "0"]) == 2  # before any model is loaded
    assert "--max-waiting must be at least 1, got 0" in capsys.readouterr().err
