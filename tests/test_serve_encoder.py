"""Embedding and classification requests over several adapters of one tiny BERT, through the real server."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.serve import build

from .serve_fixtures import running_server
from .tiny_tokenizers import bert_tok

openai = pytest.importorskip("openai")
TEXTS = ["hello world", "what is two plus three four five", "good movie", "a b c d e f g"]


def tiny_encoder(classifier: bool, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tok = bert_tok()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                     num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    model = (BertForSequenceClassification(cfg) if classifier else BertModel(cfg, add_pooling_layer=False)).eval()
    return model, tok


def adapters(root, classifier: bool) -> dict[str, object]:
    out = {}
    for k, name in enumerate(["e0", "e1"]):
        model, _ = tiny_encoder(classifier)
        peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=["query", "value"]), name=name)
        g = torch.Generator().manual_seed(50 + k)
        with torch.no_grad():
            for p in peftkit.adapter_parameters(model).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        out[name] = peftkit.save(model, root / name)
    return out


def alone(classifier: bool, adapter_dir, texts: list[str]) -> torch.Tensor:
    model, tok = tiny_encoder(classifier)
    if adapter_dir is not None:
        peftkit.load(model, adapter_dir)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    if classifier:
        return torch.softmax(out.logits, -1)
    m = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((out.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)


def test_embeddings_of_mixed_adapters_equal_each_adapter_alone(tmp_path):
    dirs = adapters(tmp_path, classifier=False)
    model, tok = tiny_encoder(False)
    app, engine = build(model, tok, list(dirs.items()), max_adapters=2, max_batch=8)
    jobs = [(name, TEXTS[i % 4:i % 4 + 2]) for i, name in enumerate(["base", "e0", "e1"] * 3)]
    with running_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with cf.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda j: c.embeddings.create(model=j[0], input=j[1]), jobs))
        r = httpx.post(url + "/v1/embeddings", json={"model": "e0", "input": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        r = httpx.post(url + "/v1/embeddings", json={"model": "e0", "input": "a", "encoding_format": "int8"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"
        plain = httpx.post(url + "/v1/embeddings", json={"model": "e1", "input": TEXTS[0]}).json()["data"][0]["embedding"]
        torch.testing.assert_close(torch.tensor([plain]), alone(False, dirs["e1"], TEXTS[:1]), atol=1e-5, rtol=1e-4)
        assert httpx.post(url + "/v1/completions", json={"model": "e0", "prompt": "a"}).status_code == 404
    for (name, texts), resp in zip(jobs, got, strict=True):
        want = alone(False, dirs.get(name), texts)
        vecs = torch.tensor([d.embedding for d in resp.data])
        torch.testing.assert_close(vecs, want, atol=1e-5, rtol=1e-4)
        assert resp.usage.prompt_tokens == sum(len(tok(t)["input_ids"]) for t in texts)
    e0, e1 = (alone(False, dirs[n], TEXTS[:1]) for n in ("e0", "e1"))
    assert not torch.allclose(e0, e1, atol=1e-3)  # the adapters differ, so the comparison above can fail
    assert engine.mixed_steps > 0


def test_classification_uses_each_adapter_and_names_labels(tmp_path):
    dirs = adapters(tmp_path, classifier=True)
    model, tok = tiny_encoder(True)
    app, _ = build(model, tok, list(dirs.items()), max_adapters=2)
    with running_server(app) as url:
        for name in ["base", "e0", "e1"]:
            r = httpx.post(url + "/v1/classifications", json={"model": name, "input": TEXTS}, timeout=30)
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            probs = torch.tensor([[d["probabilities"][k] for k in ("neg", "neu", "pos")] for d in data])
            torch.testing.assert_close(probs, alone(True, dirs.get(name), TEXTS), atol=1e-5, rtol=1e-4)
            assert [d["label"] for d in data] == [["neg", "neu", "pos"][i] for i in probs.argmax(-1).tolist()]


def test_classification_with_each_adapters_own_head_in_mixed_batches(tmp_path):
    """Adapters trained with their own head (``modules_to_save``): rows of one batch get their adapter's head."""
    dirs = {}
    for k, name in enumerate(["h0", "h1"]):
        model, _ = tiny_encoder(True)
        peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=["query"], modules_to_save=["classifier"]),
                       name=name)
        g = torch.Generator().manual_seed(70 + k)
        with torch.no_grad():
            for p in peftkit.adapter_parameters(model).values():
                p.add_(torch.randn(p.shape, generator=g))
        dirs[name] = peftkit.save(model, tmp_path / name)
    model, tok = tiny_encoder(True)
    app, engine = build(model, tok, list(dirs.items()), max_adapters=2, max_batch=8)
    jobs = [(name, TEXTS[i % 3:i % 3 + 2]) for i, name in enumerate(["h0", "h1", "base"] * 3)]
    with running_server(app) as url:
        def ask(job):
            r = httpx.post(url + "/v1/classifications", json={"model": job[0], "input": job[1]}, timeout=30)
            assert r.status_code == 200, r.text
            return torch.tensor([[d["probabilities"][k] for k in ("neg", "neu", "pos")] for d in r.json()["data"]])

        with cf.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(ask, jobs))
    for (name, texts), probs in zip(jobs, got, strict=True):
        torch.testing.assert_close(probs, alone(True, dirs.get(name), texts), atol=1e-5, rtol=1e-4)
    heads = [alone(True, dirs[n], TEXTS) for n in ("h0", "h1")]
    assert not torch.allclose(heads[0], heads[1], atol=1e-3)
    assert engine.mixed_steps > 0


def test_serve_command_takes_labels_and_heads_from_trained_adapters(bert_dir, tmp_path, monkeypatch):
    """``peftkit train --task classification`` twice, then ``peftkit serve --task classification`` on both: the label
    names come from the adapters' task records and each adapter answers with its own head."""
    import uvicorn

    from peftkit import tasks
    from peftkit.cli.main import main

    from .tiny_tokenizers import WORDS

    data = tmp_path / "train.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{w} good movie\tpos\n{w} bad movie\tneg\n" for w in WORDS[:6]))
    dirs = {}
    for k, name in enumerate(["s0", "s1"]):
        assert main(["train", "--model", str(bert_dir), "--task", "classification", "--method", "lora", "--r", "2",
                     "--target-modules", "query", "--data", str(data), "--output", str(tmp_path / name), "--seed", str(k),
                     "--max-steps", "2", "--batch-size", "4", "--head-lr", "0.5"]) == 0
        dirs[name] = tmp_path / name / "adapter"
    labels = tasks.read_task(dirs["s0"])["labels"]
    got = {}

    def fake_run(app, **_kwargs):  # serve the built app on a loopback port and ask it
        with running_server(app) as url:
            for name in dirs:
                r = httpx.post(url + "/v1/classifications", json={"model": name, "input": TEXTS}, timeout=30)
                assert r.status_code == 200, r.text
                got[name] = r.json()["data"]

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--model", str(bert_dir), "--task", "classification", "--adapters",
                 *[f"{n}={d}" for n, d in dirs.items()]]) == 0
    for name, d in dirs.items():
        assert {x["label"] for x in got[name]} <= set(labels)
        probs = torch.tensor([[x["probabilities"][label] for label in labels] for x in got[name]])
        model, tok = tasks.load_adapted(d, tasks.read_task(d))
        with torch.no_grad():
            want = torch.softmax(model(**tok(TEXTS, padding=True, return_tensors="pt")).logits, -1)
        torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(torch.tensor([[x["probabilities"][label] for label in labels] for x in got["s0"]]),
                              torch.tensor([[x["probabilities"][label] for label in labels] for x in got["s1"]]),
                              atol=1e-4)
