"""The real server on a loopback port, driven by the `openai` client and httpx.

Every completion is checked against greedy ``model.generate`` of a fresh model carrying only the
request's adapter (or none), so batching, adapter grouping, merging and eviction must all be
invisible in the output.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest
import torch

from peftkit.serve import Limits, build
from peftkit.serve.adapters import BASE

from .serve_fixtures import make_adapters, reference, running_server, tiny_lm

openai = pytest.importorskip("openai")

PROMPTS = ["hello world what is", "two plus three", "the answer is yes no good bad movie", "a b c", "alpha beta gamma"]
NAMES = ["a0", "a1", "a2"]


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = make_adapters(root, [*NAMES, "extra"], hf=("a1",))  # a1 in peft's format; "extra" loaded over HTTP
    return root, dirs


@pytest.fixture(scope="module")
def server(adapter_root):
    """max_adapters=2 with three adapters: mixed traffic also exercises eviction and reload."""
    root, dirs = adapter_root
    model, tok = tiny_lm()
    app, engine = build(model, tok, [(n, dirs[n]) for n in NAMES], max_adapters=2, adapter_root=root, max_batch=6,
                        limits=Limits(max_tokens=64, max_prompt_tokens=100, max_body_bytes=20_000))
    with running_server(app) as url:
        yield url, engine, tok, dirs


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def expected(tok, dirs, adapter: str, prompt: str, max_tokens: int) -> str:
    ids = tok(prompt)["input_ids"]
    gen = reference(None if adapter == BASE else dirs[adapter], ids, max_tokens)
    return tok.decode(gen, skip_special_tokens=True)


def test_completion_equals_generate_with_the_adapter_alone(server):
    url, _, tok, dirs = server
    c = client(url)
    texts = {}
    for name in [BASE, *NAMES]:
        r = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        texts[name] = r.choices[0].text
        assert texts[name] == expected(tok, dirs, name, PROMPTS[0], 12), name
        assert r.usage.prompt_tokens == len(tok(PROMPTS[0])["input_ids"])
        assert r.usage.completion_tokens >= 1 and r.model == name
    assert len(set(texts.values())) == len(texts)  # the adapters really change the output


def test_mixed_concurrent_stream_gives_each_request_its_adapter_alone(server):
    url, engine, tok, dirs = server
    jobs = [(name, PROMPTS[i % len(PROMPTS)], 4 + (3 * i) % 11) for i, name in
            enumerate([BASE, *NAMES] * 5)]
    mixed_before = engine.mixed_steps

    def ask(job):
        name, prompt, n = job
        with httpx.Client(timeout=60) as h:
            r = h.post(url + "/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": n, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, prompt, n), ans in zip(jobs, answers, strict=True):
        assert ans["text"] == expected(tok, dirs, name, prompt, n), (name, prompt, n)
        assert ans["finish_reason"] in ("stop", "length")
    assert engine.mixed_steps > mixed_before  # rows of different adapters did share forwards


def test_streaming_completion_and_chat(server):
    url, _, tok, dirs = server
    c = client(url)
    whole = c.completions.create(model="a2", prompt=PROMPTS[2], max_tokens=10, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="a2", prompt=PROMPTS[2], max_tokens=10, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    messages = [{"role": "user", "content": "what is two plus three"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want = tok.decode(reference(dirs["a0"], ids, 9), skip_special_tokens=True)
    r = c.chat.completions.create(model="a0", messages=messages, max_tokens=9, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    parts = list(c.chat.completions.create(model="a0", messages=messages, max_tokens=9, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want
    assert parts[-1].usage.prompt_tokens == len(ids)

    with httpx.stream("POST", url + "/v1/completions", json={"model": "a1", "prompt": "a b", "max_tokens": 3,
                                                            "stream": True}, timeout=30) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    json.loads(lines[0][len("data: "):])


def test_stop_strings_seed_and_nucleus(server):
    url, _, tok, dirs = server
    c = client(url)
    full = expected(tok, dirs, "a1", PROMPTS[1], 12)
    words = full.split(" ")
    assert len(words) >= 3
    stop = words[2]
    r = c.completions.create(model="a1", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="a1", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=stop, stream=True))
    assert streamed == r.choices[0].text  # held-back text never leaks past the stop string

    def sampled(seed, top_p=1.0):
        return c.completions.create(model="a0", prompt=PROMPTS[3], max_tokens=12, temperature=1.5, top_p=top_p,
                                    seed=seed).choices[0].text

    assert sampled(7) == sampled(7)  # a seed reproduces the sample whatever shares the batch
    assert len({sampled(s) for s in range(6)}) > 1
    # a nucleus holding only the most likely token is greedy decoding
    assert sampled(3, top_p=1e-9) == expected(tok, dirs, "a0", PROMPTS[3], 12)


def test_eviction_reload_and_models(server):
    url, engine, tok, dirs = server
    c = client(url)
    first = c.completions.create(model="a0", prompt=PROMPTS[4], max_tokens=8, temperature=0).choices[0].text
    loads, evictions = engine.table.loads, engine.table.evictions
    c.completions.create(model="a1", prompt=PROMPTS[4], max_tokens=2)
    c.completions.create(model="a2", prompt=PROMPTS[4], max_tokens=2)  # at most 2 in memory: a0 is evicted
    assert "a0" not in engine.table.loaded() and len(engine.table.loaded()) <= 2
    again = c.completions.create(model="a0", prompt=PROMPTS[4], max_tokens=8, temperature=0).choices[0].text
    assert again == first == expected(tok, dirs, "a0", PROMPTS[4], 8)
    assert engine.table.evictions > evictions and engine.table.loads > loads
    models = {m.id: m for m in c.models.list().data}
    assert set(models) >= {BASE, *NAMES}
    metrics = httpx.get(url + "/metrics").text
    assert f"peftkit_adapter_evictions_total {engine.table.evictions}" in metrics
    assert "peftkit_adapters_loaded 2" in metrics and "peftkit_queue_length 0" in metrics
    assert 'peftkit_requests_total{endpoint="completions",outcome="ok"}' in metrics
    assert "peftkit_generation_tokens_per_second" in metrics


def test_load_and_unload_endpoints_stay_inside_the_root(server, tmp_path):
    url, engine, tok, dirs = server
    h = httpx.Client(base_url=url, timeout=30)
    r = h.post("/v1/adapters", json={"name": "x1", "path": "extra"})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "x1"
    got = h.post("/v1/completions", json={"model": "x1", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0})
    assert got.json()["choices"][0]["text"] == expected(tok, dirs, "extra", PROMPTS[0], 6)
    outside = tmp_path / "outside"
    make_adapters(tmp_path, ["outside"])
    for body, status, param in [
        ({"name": "x2", "path": "../outside"}, 400, "path"),
        ({"name": "x2", "path": str(outside)}, 400, "path"),
        ({"name": "x2", "path": "a0/../../outside"}, 400, "path"),
        ({"name": "x2", "path": "missing"}, 400, "path"),
        ({"name": "base", "path": "extra"}, 400, "name"),
        ({"name": "bad/name", "path": "extra"}, 400, "name"),
        ({"name": "x1", "path": "extra"}, 409, "name"),
        ({"name": "x2"}, 400, "path"),
    ]:
        r = h.post("/v1/adapters", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    assert "x2" not in engine.table.names()
    assert h.delete("/v1/adapters/x1").json()["deleted"] is True
    r = h.post("/v1/completions", json={"model": "x1", "prompt": "a", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert h.delete("/v1/adapters/x1").status_code == 404


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"prompt": "a"}, 400, "model"),
    ("/v1/completions", {"model": "a9", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"model": "a0"}, 400, "prompt"),
    ("/v1/completions", {"model": "a0", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "a0", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "a0", "prompt": "a", "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/completions", {"model": "a0", "prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "a0", "prompt": "a", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"model": "a0", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "a0", "prompt": "a", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "a0", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "a0", "prompt": "a", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"model": "a0", "prompt": [1, 2, 10_000]}, 400, "prompt"),
    ("/v1/completions", {"model": "a0", "prompt": "a " * 110}, 400, "prompt"),
    ("/v1/completions", {"model": "a0", "prompt": "a " * 80, "max_tokens": 60}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "a0", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": "a0", "messages": "hello"}, 400, "messages"),
])
def test_bad_requests_get_4xx_naming_the_field(server, path, body, status, param):
    url = server[0]
    r = httpx.post(url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_malformed_and_oversized_bodies_leave_the_server_alive(server):
    url = server[0]
    for content, status in [(b"{not json", 400), (b"[1, 2]", 400), (b"", 400), (b"x" * 30_000, 413)]:
        r = httpx.post(url + "/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == "body"
    assert httpx.get(url + "/v1/nothing").status_code == 404
    assert httpx.get(url + "/health").json()["status"] == "ok"
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="nope", prompt="a", max_tokens=2)


def test_merged_fast_path_is_exact_and_restores_the_base_bit_for_bit(server):
    url, engine, tok, dirs = server
    sites = {n: p.detach().clone() for n, p in engine.model.named_parameters() if ".adapters." not in n}
    merged = engine.merged_steps
    c = client(url)
    text = c.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=10, temperature=0).choices[0].text
    assert engine.merged_steps > merged  # a lone adapter ran merged into the weights
    assert text == expected(tok, dirs, "a2", PROMPTS[0], 10)
    c.completions.create(model=BASE, prompt=PROMPTS[1], max_tokens=3)  # the base alone: a2 must be unmerged
    assert engine.merged.name is None
    for n, p in engine.model.named_parameters():
        if n in sites:
            assert torch.equal(p, sites[n]), n


def test_several_prompts_in_one_request_give_one_choice_each(server):
    url, _, tok, dirs = server
    body = {"model": "a1", "prompt": PROMPTS[:3], "max_tokens": 7, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for p, c in zip(PROMPTS[:3], r["choices"], strict=True):
        assert c["text"] == expected(tok, dirs, "a1", p, 7)
    assert r["usage"]["prompt_tokens"] == sum(len(tok(p)["input_ids"]) for p in PROMPTS[:3])
    streamed = ["", "", ""]
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    streamed[c["index"]] += c["text"]
    assert streamed == [c["text"] for c in r["choices"]]


def test_hot_load_and_unload_between_decode_steps_leave_running_requests_intact(server):
    url, _, tok, dirs = server
    body = {"model": "a0", "prompt": PROMPTS[2], "max_tokens": 40, "temperature": 0, "stream": True}
    pieces: list[str] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as s:
        lines = s.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
                break
        # the a0 request is mid-generation: load another adapter (evicting an idle one), use it, unload it
        assert httpx.post(url + "/v1/adapters", json={"name": "hot", "path": "extra"}, timeout=60).status_code == 201
        r = httpx.post(url + "/v1/completions", json={"model": "hot", "prompt": PROMPTS[0], "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)
        assert r.json()["choices"][0]["text"] == expected(tok, dirs, "extra", PROMPTS[0], 4)
        assert httpx.delete(url + "/v1/adapters/hot", timeout=60).status_code == 200
        for line in lines:
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(pieces) == expected(tok, dirs, "a0", PROMPTS[2], 40)
