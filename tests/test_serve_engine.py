"""The engine's parts without HTTP: text release with stop strings, nucleus sampling, the re-batched
KV cache, the adapter table's LRU and path checks, and continuous batching against generate."""

from __future__ import annotations

import queue
import subprocess
import sys

import pytest
import torch

import peftkit
from peftkit.core.errors import AdapterNotFoundError, ConfigError
from peftkit.serve import AdapterTable, Engine, Failed, Finished, GenerationRequest, SamplingParams
from peftkit.serve.decoding import TextStream, sample
from peftkit.serve.kv import BatchKV, left_padded, positions

from .serve_fixtures import make_adapters, reference, tiny_lm


class CharTok:
    """decode = the characters of the ids (enough to test the text stream)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(stream: TextStream, text: str) -> list[str]:
    out = []
    for ch in text:
        out.append(stream.push(ord(ch)))
        if stream.stopped:
            break
    return out


def test_text_stream_holds_back_possible_stop_strings():
    s = TextStream(CharTok(), ["END"])
    pieces = feed(s, "abEcdENxEND tail")
    assert "".join(pieces) == "abEcdENx" and s.stopped and s.text == "abEcdENx"
    assert pieces[2] == "" and pieces[3] == "Ec"  # 'E' waited until 'c' showed it was no stop string
    s = TextStream(CharTok(), ["END"])
    pieces = feed(s, "xyEN")
    assert "".join(pieces) == "xy" and not s.stopped
    assert s.flush() == "EN"  # generation ended: held-back text is released
    s = TextStream(CharTok(), [])
    assert feed(s, "a\ufffd") == ["a", ""]  # an incomplete character waits


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits, 1.0, 0.75, g) for _ in range(400)]
    assert set(draws) == {0, 1}  # 0.5 < 0.75 so token 1 is needed; 0.8 >= 0.75 so token 2 is not
    assert abs(draws.count(0) / 400 - 0.5 / 0.8) < 0.08  # renormalised within the nucleus
    assert {sample(logits, 1.0, 1e-9, g) for _ in range(20)} == {0}
    hot = [sample(logits, 100.0, 1.0, g) for _ in range(400)]
    assert min(hot.count(k) for k in range(4)) > 50  # high temperature flattens


def test_batch_cache_join_and_leave_matches_separate_caches():
    model, tok = tiny_lm()
    prompts = [tok(p)["input_ids"] for p in ["hello world", "two plus three four five", "a"]]

    def logits_alone(p, extra):
        ids = torch.tensor([p + extra])
        return model(input_ids=ids).logits[0, -1]

    with torch.no_grad():
        ids, mask = left_padded(prompts[:2], tok.pad_token_id, torch.device("cpu"))
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        kv = BatchKV(out.cache if getattr(out, "cache", None) is not None else out.past_key_values, mask)
        ids3, mask3 = left_padded(prompts[2:], tok.pad_token_id, torch.device("cpu"))
        out3 = model(input_ids=ids3, attention_mask=mask3, position_ids=positions(mask3), use_cache=True)
        kv.extend(BatchKV(out3.cache if getattr(out3, "cache", None) is not None else out3.past_key_values, mask3))
        kv.select(torch.tensor([1, 2]))  # the first request leaves; its columns are trimmed
        assert kv.width == len(prompts[1])
        nxt = torch.tensor([[7], [9]])
        pos = kv.lengths().unsqueeze(-1)
        kv.append_column()
        arg = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
        step = model(input_ids=nxt, attention_mask=kv.mask, position_ids=pos, use_cache=True, **{arg: kv.cache})
        torch.testing.assert_close(step.logits[0, -1], logits_alone(prompts[1], [7]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.logits[1, -1], logits_alone(prompts[2], [9]), atol=1e-5, rtol=1e-5)


def test_table_lru_eviction_skips_busy_adapters_and_checks_paths(tmp_path):
    dirs = make_adapters(tmp_path, ["a", "b", "c"])
    model, _ = tiny_lm()
    table = AdapterTable(model, max_adapters=2, root=tmp_path)
    for n in "abc":
        table.register(n, n, from_root=True)
    assert table.ensure("a", set()) and table.ensure("b", set())
    assert table.ensure("a", set())  # a is now the most recent
    assert table.ensure("c", set()) and table.loaded() == ["a", "c"]  # b was least recently used
    assert peftkit.adapter_names(model) == ["a", "c"]
    assert not table.ensure("b", busy={"a", "c"})  # everything loaded is in use: wait
    assert table.ensure("b", busy={"c"}) and set(table.loaded()) == {"b", "c"}
    with pytest.raises(ConfigError, match="outside the adapter root"):
        table.register("d", "../elsewhere", from_root=True)
    with pytest.raises(ConfigError, match="reserved"):
        table.register("base", dirs["a"])
    with pytest.raises(AdapterNotFoundError, match="did you mean"):
        table.check_known("bb")
    with pytest.raises(ConfigError, match="at least 1"):
        AdapterTable(model, max_adapters=0)


@pytest.mark.parametrize(("layout", "prepack"), [("packed", True), ("packed", False), ("padded", False)])
def test_engine_continuous_batching_equals_generate_per_request(tmp_path, layout, prepack):
    """More requests than batch rows, different lengths, adapters and base: rows join as others finish."""
    dirs = make_adapters(tmp_path, ["a", "b"])
    model, tok = tiny_lm()
    table = AdapterTable(model, max_adapters=2)
    for n, d in dirs.items():
        table.register(n, d)
    engine = Engine(model, tok, table, max_batch=3, layout=layout, prepack=prepack).start()
    assert engine.layout == layout and (engine.prepacked is not None) == prepack
    jobs = [(name, p, n) for name, p, n in zip(["a", "b", None, "a", "b", None, "b"],
                                                ["hello world", "two plus three", "yes no", "a b c d", "good bad movie",
                                                 "the", "alpha"], [3, 11, 6, 9, 2, 12, 7], strict=True)]
    sinks = []
    for name, p, n in jobs:
        q: queue.Queue = queue.Queue()
        engine.submit(GenerationRequest(tok(p)["input_ids"], name, SamplingParams(max_tokens=n, temperature=0), q.put))
        sinks.append(q)
    try:
        for (name, p, n), q in zip(jobs, sinks, strict=True):
            ev = q.get(timeout=60)
            while not isinstance(ev, (Finished, Failed)):
                ev = q.get(timeout=60)
            assert isinstance(ev, Finished)
            want = reference(dirs[name] if name else None, tok(p)["input_ids"], n)
            assert ev.text == tok.decode(want, skip_special_tokens=True), (name, p)
            assert ev.completion_tokens == len(want) + (len(want) < n)  # an eos counts as a generated token
    finally:
        engine.stop()
    assert engine.mixed_steps > 0 and engine.running == [] and engine.batch is None


def test_a_bfloat16_base_serves_bfloat16_adapters_as_each_alone(tmp_path):
    """The table casts loaded adapters to the base's dtype; mixed rows still equal each adapter alone."""
    dirs = make_adapters(tmp_path, ["a", "b"])
    model, tok = tiny_lm()
    model.to(torch.bfloat16)
    table = AdapterTable(model, max_adapters=2)
    for n, d in dirs.items():
        table.register(n, d)
        table.ensure(n, set())
    assert {p.dtype for p in peftkit.adapter_parameters(model).values()} == {torch.bfloat16}
    ids = torch.tensor([tok("hello world")["input_ids"]] * 3)
    rows = ["a", None, "b"]
    with torch.no_grad():
        with peftkit.mixed_batch(model, rows):
            mixed = model(input_ids=ids).logits
        for i, n in enumerate(rows):
            peftkit.activate(model, [n] if n else [])  # the plain (non-mixed) path of that adapter alone
            alone = model(input_ids=ids[i:i + 1]).logits[0]
            torch.testing.assert_close(mixed[i], alone, rtol=0.02, atol=0.05)
        peftkit.activate(model, [])
        with peftkit.mixed_batch(model, ["a"]):
            assert not torch.allclose(model(input_ids=ids[:1]).logits[0], mixed[1])  # the adapter changes the output
    assert mixed.dtype == torch.bfloat16


def test_cli_serve_rejects_bad_arguments_before_loading(tmp_path, capsys):
    from peftkit.cli.main import main

    base = ["serve", "--model", "smollm2-135m"]
    for extra, culprit in [(["--adapters", str(tmp_path / "nope")], "does not exist"),
                           (["--max-adapters", "0"], "--max-adapters"),
                           (["--task", "embeding"], "did you mean 'embedding'"),
                           (["--dtype", "bf16"], "--dtype 'bf16' is unknown"),
                           (["--model", str(tmp_path / "missing")], "neither an alias")]:
        args = base + extra if extra[0] != "--model" else ["serve", *extra]
        assert main(args) == 2
        assert culprit in capsys.readouterr().err


def test_cli_serve_starts_answers_and_stops_on_sigterm(tmp_path):
    """`peftkit serve` as a user runs it: a model directory, an adapter, a free port; SIGTERM ends it."""
    import os
    import signal
    import time

    import httpx

    from .serve_fixtures import free_port

    model, tok = tiny_lm()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    dirs = make_adapters(tmp_path / "adapters", ["a"])
    port = free_port()
    cmd = [sys.executable, "-m", "peftkit.cli.main", "serve", "--model", str(tmp_path / "model"), "--adapters",
           f"mine={dirs['a']}", "--port", str(port), "--adapter-root", str(tmp_path / "adapters")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
            assert time.monotonic() < deadline, "the server did not start"
        r = httpx.post(url + "/v1/completions", json={"model": "mine", "prompt": "hello world", "max_tokens": 5,
                                                      "temperature": 0}, timeout=60)
        want = reference(dirs["a"], tok("hello world")["input_ids"], 5)
        assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["base", "mine"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown


def test_queue_bound_and_cancelled_requests_leave(tmp_path):
    from peftkit.serve.engine import QueueFull

    model, tok = tiny_lm()
    engine = Engine(model, tok, AdapterTable(model, 1), max_batch=2, max_waiting=2)
    events: queue.Queue = queue.Queue()
    reqs = [GenerationRequest(tok("hello")["input_ids"], None, SamplingParams(max_tokens=100, temperature=0), events.put)
            for _ in range(2)]
    for r in reqs:
        engine.submit(r)
    with pytest.raises(QueueFull, match="max 2"):
        engine.submit(GenerationRequest([1], None, SamplingParams(), events.put))
    reqs[0].cancel()  # gone before it was admitted
    engine.start()
    try:
        first = events.get(timeout=60)
        reqs[1].cancel()  # gone while decoding
        deadline = 600
        while (engine.running or engine.waiting or engine.queue_length) and deadline:
            import time

            time.sleep(0.05)
            deadline -= 1
        assert engine.running == [] and engine.waiting == [] and engine.queue_length == 0
        assert first is not None and len(reqs[1].tokens) < 100  # stopped early
        assert engine.metrics.requests[("generate", "cancelled")] == 2
    finally:
        engine.stop()


def test_a_request_for_an_unloadable_adapter_is_not_starved(tmp_path):
    """max_adapters=1: a request for b waits for a's rows to drain, and later requests for a wait behind it."""
    dirs = make_adapters(tmp_path, ["a", "b"])
    model, tok = tiny_lm()
    table = AdapterTable(model, max_adapters=1)
    for n, d in dirs.items():
        table.register(n, d)
    engine = Engine(model, tok, table, max_batch=8)
    order: list[str] = []
    done: queue.Queue = queue.Queue()

    def sink(tag):
        def emit(ev):
            if isinstance(ev, (Finished, Failed)):
                order.append(tag)
                done.put(ev)
        return emit

    for tag, name, n in [("a1", "a", 12), ("b1", "b", 2), ("a2", "a", 2)]:
        engine.submit(GenerationRequest(tok("hello world")["input_ids"], name, SamplingParams(max_tokens=n, temperature=0),
                                        sink(tag)))
    engine.start()
    try:
        events = [done.get(timeout=60) for _ in range(3)]
    finally:
        engine.stop()
    assert all(isinstance(e, Finished) for e in events)
    assert order.index("b1") < order.index("a2")  # a2 did not jump the queue past b1
    assert table.evictions >= 2  # a → b → a
