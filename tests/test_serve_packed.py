"""The packed engine layout (peftkit.serve.packed): slot cache, packed attention, token-wise mixed batches, layout choice."""

from __future__ import annotations

import threading

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError, PeftkitError
from peftkit.serve import packed
from peftkit.serve.adapters import AdapterTable
from peftkit.serve.engine import Engine
from peftkit.serve.packed import SlotKV

from .serve_fixtures import make_adapters, tiny_lm


def _fill(kv: SlotKV, layer: int = 0) -> None:
    """Write each slot's column c as the value 100*slot + c (one kv head, d = 1) so moves are visible."""
    like = torch.zeros(1, 1, 1, 1)
    k, v = kv.storage(layer, like, like)
    for i, n in enumerate(kv.lengths):
        k[i, 0, :n, 0] = 100 * i + torch.arange(n, dtype=k.dtype)
        v[i, 0, :n, 0] = -(100 * i + torch.arange(n, dtype=k.dtype))


def test_slot_cache_plan_commit_remove_and_growth():
    cpu = torch.device("cpu")
    kv = SlotKV(slots=4, capacity=4)
    plan = kv.plan([], [(0, 3), (1, 2)], cpu)
    assert plan.decode == 0 and [(g.slot, g.first, g.n, g.past) for g in plan.segments] == [(0, 0, 3, 0), (1, 3, 2, 0)]
    assert plan.mask is None
    kv.commit(plan)
    assert kv.lengths == [3, 2]
    plan = kv.plan([0, 1], [(2, 4)], cpu)  # rows decode at columns 3 and 2; the prompt takes slot 2
    assert plan.decode == 2 and plan.prefix and plan.cols.tolist() == [3, 2] and plan.width == 4
    assert plan.mask[:, 0, 0].tolist() == [[True, True, True, True], [True, True, True, False]]
    assert [(g.slot, g.first, g.n, g.past) for g in plan.segments] == [(2, 2, 4, 0)]
    kv.commit(plan)
    assert kv.lengths == [4, 3, 4]
    _fill(kv)
    kv.plan([0, 1, 2], [], cpu)  # row 0 needs column 4: the capacity doubles, the contents stay
    assert kv.capacity == 8 and kv.keys[0].shape == (4, 1, 8, 1)
    assert kv.keys[0][1, 0, :3, 0].tolist() == [100, 101, 102]
    # row 1 decodes while row 2 takes a second piece of its prompt: a gather, and a mask over cached + new
    plan = kv.plan([1], [(2, 2)], cpu)
    assert not plan.prefix and plan.rows.tolist() == [1]
    seg = plan.segments[0]
    assert (seg.past, seg.n) == (4, 2) and seg.mask.tolist() == [[True] * 5 + [False], [True] * 6]
    kv.commit(plan)
    assert kv.lengths == [4, 4, 6]
    with pytest.raises(PeftkitError, match="new rows must take slots 3"):
        kv.plan([], [(3, 1), (3, 1)], cpu)
    kv.remove(0)  # the last row moves into slot 0
    assert kv.lengths == [6, 4]
    assert kv.keys[0][0, 0, :4, 0].tolist() == [200, 201, 202, 203]
    assert kv.values[0][0, 0, :4, 0].tolist() == [-200, -201, -202, -203]
    kv.remove(1)
    kv.remove(0)
    assert kv.rows == 0 and kv.capacity == 4  # an empty cache shrinks back
    with pytest.raises(PeftkitError, match="exceed 4 slots"):
        kv.plan([], [(i, 1) for i in range(5)], cpu)


def _engine(model, tok, **kw):
    return Engine(model, tok, AdapterTable(model, 2), max_batch=4, **kw)


def test_packed_steps_give_each_row_the_models_own_logits():
    """Rows of different lengths decode while others join and leave; every row's logits equal a plain forward
    over its whole sequence (grouped-query attention: 4 heads over 2 key/value heads)."""
    model, tok = tiny_lm()
    engine = _engine(model, tok)
    assert engine.layout == "packed" and model.config.num_key_value_heads < model.config.num_attention_heads
    kv = SlotKV(4, capacity=2)
    seqs: list[list[int]] = []

    def check(logits, rows):
        for got, ids in zip(logits, rows, strict=True):
            want = model(input_ids=torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    with torch.no_grad():
        joining = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
        logits = engine._packed_forward(kv, [], list(enumerate(joining)), None)
        check(logits, joining)
        seqs = [list(p) for p in joining]
        for step in range(6):
            nxt = [int(t) for t in logits[: len(seqs)].argmax(-1)]
            for s, t in zip(seqs, nxt, strict=True):
                s.append(t)
            new = [[20 + step, 21, 22]] if step in (1, 3) else []
            logits = engine._packed_forward(kv, list(enumerate(nxt)), [(len(seqs) + j, p) for j, p in enumerate(new)],
                                            None)
            check(logits, seqs + new)
            seqs += [list(p) for p in new]
            if step in (2, 4):  # row 0 leaves: the last row takes its slot
                kv.remove(0)
                seqs[0] = seqs.pop()
                logits = torch.cat([logits[len(seqs):len(seqs) + 1], logits[1:len(seqs)]])
        assert kv.rows == len(seqs) and kv.capacity >= max(map(len, seqs))


def test_packed_mixed_batch_routes_each_token_to_its_request_adapter(tmp_path):
    """mixed_batch(tokens=True) on a packed sequence equals each adapter alone on its own tokens."""
    dirs = make_adapters(tmp_path, ["a", "b"])
    model, tok = tiny_lm()
    for n, d in dirs.items():
        peftkit.load(model, d, name=n)
    engine = _engine(model, tok)
    prompts, names = [[5, 6, 7], [8, 9, 10, 11], [12, 13]], ["a", None, "b"]
    with torch.no_grad():
        kv = SlotKV(4)
        per_token = [n for n, p in zip(names, prompts, strict=True) for _ in p]
        got = engine._packed_forward(kv, [], list(enumerate(prompts)), per_token)
        for i, (p, n) in enumerate(zip(prompts, names, strict=True)):
            if n is None:
                with peftkit.disabled(model):
                    want = model(input_ids=torch.tensor([p])).logits[0, -1]
            else:
                peftkit.activate(model, n)
                want = model(input_ids=torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
        with pytest.raises(PeftkitError, match="2 adapter names but the batch has 9 tokens"):
            with peftkit.mixed_batch(model, ["a", "b"], tokens=True):
                model(input_ids=torch.tensor([[t for p in prompts for t in p]]))


def test_token_wise_modules():
    from transformers.pytorch_utils import Conv1D

    from peftkit.core.site import token_wise

    model, _ = tiny_lm()
    layer = model.model.layers[0]
    assert token_wise(layer.self_attn.q_proj) and token_wise(layer.input_layernorm) and token_wise(Conv1D(4, 3))
    assert token_wise(model.model.embed_tokens)
    assert not token_wise(layer.self_attn) and not token_wise(layer) and not token_wise(torch.nn.Conv1d(2, 2, 3))


def test_layout_choice_and_refusals(monkeypatch):
    model, tok = tiny_lm()
    assert _engine(model, tok, layout="padded").layout == "padded"
    with pytest.raises(ConfigError, match=r"unknown engine layout 'paked'.*did you mean 'packed'"):
        _engine(model, tok, layout="paked")
    # a model whose attention a packed step cannot reproduce: auto falls back, packed refuses with the reason
    model.config.sliding_window = 2
    model.config.use_sliding_window = True
    assert packed.unsupported_reason(model) == "it uses sliding-window attention"
    assert _engine(model, tok).layout == "padded"
    with pytest.raises(ConfigError, match="sliding-window attention; use --engine padded"):
        _engine(model, tok, layout="packed")
    model.config.sliding_window = None
    # the numerical probe: a packed attention that drops one token's keys is caught
    real = packed.packed_attention

    def wrong(module, query, key, value, *a, **kw):
        out, w = real(module, query, key, value, *a, **kw)
        return out * 0.5, w

    monkeypatch.setattr(packed, "packed_attention", wrong)
    monkeypatch.setattr(packed, "_registered", False)
    engine = _engine(model, tok)
    assert engine.layout == "padded"
    with pytest.raises(ConfigError, match="differs from the model's own logits"):
        _engine(model, tok, layout="packed")
    monkeypatch.undo()
    packed._registered = False  # register the real function again for the tests that follow
    assert _engine(model, tok).layout == "packed"


def test_serve_command_loads_the_model_on_the_engine_thread(tmp_path, monkeypatch, capsys):
    """Every torch call of `peftkit serve` runs on one thread (OpenMP work on a second thread made forwards slower)."""
    import uvicorn

    from peftkit.cli.main import main
    from peftkit.serve import server

    model, tok = tiny_lm()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    seen = {}
    real = server._load_and_build

    def recording(*a, **kw):
        seen["loaded on"] = threading.current_thread()
        app, engine = real(*a, **kw)
        seen["engine"] = engine
        return app, engine

    def fake_run(app, **_kwargs):
        seen["engine thread"] = seen["engine"]._thread
        seen["layout"] = seen["engine"].layout

    monkeypatch.setattr(server, "_load_and_build", recording)
    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--model", str(tmp_path / "model"), "--engine", "packed"]) == 0
    assert seen["loaded on"] is seen["engine thread"] is not threading.main_thread()
    assert seen["layout"] == "packed"
    assert seen["engine"]._thread is None  # stopped when the server returned
    seen.clear()
    assert main(["serve", "--model", str(tmp_path / "model"), "--engine", "paded"]) == 2
    assert main(["serve", "--model", str(tmp_path / "model"), "--task", "embedding", "--engine", "packed"]) == 2
    err = capsys.readouterr().err
    assert "--engine 'paded' is unknown (did you mean 'padded'" in err
    assert "--engine packed applies to generation (--task causal-lm), not --task embedding" in err
    assert not seen  # refused before loading anything


@pytest.mark.parametrize("budget", [6, 4, 1])
def test_long_prompts_are_prefilled_in_pieces_within_the_step_budget(tmp_path, budget):
    """max_step_tokens bounds the prompt tokens of a step: a long prompt is prefilled over several steps (later pieces
    attend to the cached part) while other rows keep decoding, and every answer still equals generate alone."""
    from .serve_fixtures import reference

    dirs = make_adapters(tmp_path, ["a"])
    model, tok = tiny_lm()
    table = AdapterTable(model, 1)
    table.register("a", dirs["a"])
    engine = Engine(model, tok, table, max_batch=4, max_step_tokens=budget)
    pieces = []
    real = engine._packed_forward

    def recording(kv, decode, chunks, names):
        pieces.append([len(piece) for _, piece in chunks])
        return real(kv, decode, chunks, names)

    engine._packed_forward = recording
    jobs = [("a", list(range(5, 14)), 6), (None, [20, 21, 22], 8), ("a", [30, 31], 5), (None, [40, 41, 42, 43, 44], 4)]
    got = _run_jobs(engine, jobs)
    assert all(sum(p) <= budget for p in pieces) and max(map(sum, pieces)) == budget
    assert sum(map(sum, pieces)) == sum(len(ids) for _, ids, _ in jobs)  # every prompt token exactly once
    for k, (name, ids, n) in enumerate(jobs):
        want = reference(dirs[name] if name else None, ids, n)
        assert got[k].text == tok.decode(want, skip_special_tokens=True), (budget, k)
    with pytest.raises(ConfigError, match="max_step_tokens must be at least 1"):
        Engine(model, tok, AdapterTable(model, 1), max_step_tokens=0)


def _plain(model, ids):
    """The model's logits through F.linear everywhere (the prepacked forwards set aside)."""
    saved = {m: m.__dict__.pop("forward") for m in model.modules() if "forward" in m.__dict__}
    try:
        return model(input_ids=ids).logits
    finally:
        for m, f in saved.items():
            m.forward = f


def test_prepacked_weights_equal_dense_products_and_follow_weight_changes(tmp_path):
    from peftkit.serve import prepack

    if not prepack.available():
        pytest.skip("this torch has no oneDNN")
    dirs = make_adapters(tmp_path, ["a"])
    model, _ = tiny_lm()
    peftkit.load(model, dirs["a"], name="a")
    fast = prepack.Prepacked(model)
    fast.sync()
    linears = [m for n, m in model.named_modules() if type(m) is torch.nn.Linear and ".adapters." not in f".{n}."]
    assert linears and set(fast.packed) == set(linears)  # base layers and the head; nothing inside adapters
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, _plain(model, ids), rtol=1e-5, atol=1e-5)
        peftkit.merge(model, "a")  # the weights change under the packed copies: stale until synced
        merged = _plain(model, ids)
        assert not torch.allclose(model(input_ids=ids).logits, merged, atol=1e-3)
        fast.sync()
        torch.testing.assert_close(model(input_ids=ids).logits, merged, rtol=1e-5, atol=1e-5)
        peftkit.unmerge(model)
        peftkit.delete(model, "a")  # the sites are gone: their layers are packed again from the restored weights
        fast.sync()
        torch.testing.assert_close(model(input_ids=ids).logits, _plain(model, ids), rtol=1e-5, atol=1e-5)
        # a weight swapped in for one call (methods that override parameters) or replaced through .data: F.linear
        head, h = model.lm_head, torch.randn(2, 32)
        other = torch.randn_like(head.weight)
        torch.testing.assert_close(torch.func.functional_call(head, {"weight": other}, (h,)), h @ other.T)
        head.weight.data = other.clone()
        torch.testing.assert_close(head(h), h @ other.T)
        fast.sync()
        assert fast.packed[head][2] == head.weight.data_ptr()  # packed again from the new tensor
        torch.testing.assert_close(head(h), h @ other.T, rtol=1e-5, atol=1e-5)
    model.lm_head.weight.requires_grad_(True)
    loss = model(input_ids=ids, labels=ids).loss  # gradients take F.linear
    loss.backward()
    assert model.lm_head.weight.grad is not None
    fast.close()
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_engine_refreshes_prepacked_weights_when_the_merged_path_switches(tmp_path):
    """One adapter live: merged into the weights (packed again); another joins: restored (packed again)."""
    from peftkit.serve.decoding import SamplingParams
    from peftkit.serve.engine import Finished, GenerationRequest

    from .serve_fixtures import reference

    dirs = make_adapters(tmp_path, ["a", "b"])
    model, tok = tiny_lm()
    table = AdapterTable(model, 2)
    for n, d in dirs.items():
        table.register(n, d)
        table.ensure(n, set())
    engine = Engine(model, tok, table, max_batch=4, prepack=True)
    if engine.prepacked is None:
        pytest.skip("this torch has no oneDNN")
    got = {}
    for k, (name, steps) in enumerate([("a", 6), ("b", 3), ("a", 4)]):
        engine.submit(GenerationRequest([5 + k, 6, 7], name, SamplingParams(max_tokens=steps, temperature=0),
                                        lambda ev, k=k: got.__setitem__(k, ev) if isinstance(ev, Finished) else None))
        engine._drain(block=False)
        engine.work()  # request k joins alone or next to the running ones
        engine.work()
    while engine.running or engine.waiting:
        engine.work()
    assert engine.merged_steps > 0 and engine.mixed_steps > 0
    for k, (name, steps) in enumerate([("a", 6), ("b", 3), ("a", 4)]):
        want = reference(dirs[name], [5 + k, 6, 7], steps)
        assert got[k].text == tok.decode(want, skip_special_tokens=True), k
    engine.stop()
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_adapters_that_change_the_input_of_a_token_mixing_module_are_refused_for_packed_steps(monkeypatch):
    from peftkit.serve import adapters

    model, _ = tiny_lm()
    peftkit.attach(model, peftkit.IA3(target_modules=["down_proj"], feedforward_modules=["down_proj"]), name="x")
    assert adapters._not_packable(model, "x") is None  # a linear layer maps tokens one by one
    monkeypatch.setattr("peftkit.core.site.token_wise", lambda m: False)
    assert "ia3 at model.layers.0.mlp.down_proj changes the input of a Linear" in adapters._not_packable(model, "x")


def _run_jobs(engine: Engine, jobs: list) -> dict:
    """Submit ``(adapter, prompt ids, max_tokens)`` greedy requests and step the engine until all are done;
    the last event of each (``Finished`` or ``Failed``) by job index."""
    from peftkit.serve.decoding import SamplingParams
    from peftkit.serve.engine import Delta, GenerationRequest

    got: dict = {}
    for k, (name, ids, n) in enumerate(jobs):
        engine.submit(GenerationRequest(ids, name, SamplingParams(max_tokens=n, temperature=0),
                                        lambda ev, k=k: None if isinstance(ev, Delta) else got.__setitem__(k, ev)))
    engine._drain(block=False)
    while engine.running or engine.waiting:
        engine.work()
    return got


def _arch(name: str):
    from transformers import (
        GemmaConfig,
        GemmaForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        PhiConfig,
        PhiForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    from .tiny_tokenizers import llama_tok

    tok = llama_tok()
    v = len(tok)
    common = dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
        targets = ["c_attn"]
    elif name == "qwen3":  # q/k norms, explicit head_dim
        model = Qwen3ForCausalLM(Qwen3Config(**common, num_key_value_heads=2, head_dim=8))
        targets = ["q_proj", "v_proj"]
    elif name == "gemma":  # scaled embeddings, its own RMSNorm
        model = GemmaForCausalLM(GemmaConfig(**common, num_key_value_heads=1, head_dim=8))
        targets = ["q_proj", "v_proj"]
    else:  # phi: partial rotary, biases, parallel attention and MLP
        model = PhiForCausalLM(PhiConfig(**common))
        targets = ["q_proj", "dense"]
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # greedy choices far from ties
    return model.eval(), tok, targets


@pytest.mark.parametrize("arch", ["gpt2", "qwen3", "gemma", "phi"])
def test_packed_steps_on_other_architectures_equal_generate(arch, tmp_path):
    """Other attention layouts pass the start probe and serve mixed batches as generate does alone."""

    model, tok, targets = _arch(arch)
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=targets), name="a")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model, "a").values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    path = peftkit.save(model, tmp_path / "a")
    peftkit.delete(model, "a")
    table = AdapterTable(model, 1)
    table.register("a", path)
    engine = Engine(model, tok, table, max_batch=2, prepack=True)
    assert engine.layout == "packed"
    jobs = [("a", [5, 6, 7], 7), (None, [8, 9], 5), ("a", [10, 11, 12, 13], 4), (None, [14], 6)]
    got = _run_jobs(engine, jobs)
    assert engine.mixed_steps > 0
    engine.stop()
    for k, (name, ids, n) in enumerate(jobs):
        if name is None:
            ctx = peftkit.disabled(model)
        else:
            peftkit.activate(model, name)
            ctx = torch.no_grad()
        with ctx, torch.no_grad():
            x = torch.tensor([ids])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        if tok.eos_token_id in out:
            out = out[:out.index(tok.eos_token_id)]
        assert got[k].text == tok.decode(out, skip_special_tokens=True), (arch, k)


@pytest.mark.parametrize(("layout", "prepack"), [("packed", True), ("packed", False), ("padded", True)])
def test_methods_that_change_inputs_or_parameters_serve_as_alone(tmp_path, layout, prepack):
    """OFT (input transform), SparseFT (parameter override: the weight swapped per call) and LayerNorm tuning next to
    LoRA and the base, over prepacked weights or not (SparseFT also adapts the output head, which then sees every
    packed token): each request gets its adapter's own generate."""
    from peftkit.serve.engine import Finished

    from .serve_fixtures import reference

    configs = {"oft": peftkit.OFT(r=4, target_modules=["q_proj", "down_proj"]),
               "sparse": peftkit.SparseFT(density=0.2, target_modules=["v_proj", "up_proj", "lm_head"]),
               "ln": peftkit.LayerNormTuning()}
    dirs = make_adapters(tmp_path, ["lora"])
    for k, (name, cfg) in enumerate(configs.items()):
        model, _ = tiny_lm()
        peftkit.attach(model, cfg, name=name)
        g = torch.Generator().manual_seed(50 + k)
        with torch.no_grad():
            for p in peftkit.adapter_parameters(model, name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        dirs[name] = peftkit.save(model, tmp_path / name)
    model, tok = tiny_lm()
    table = AdapterTable(model, len(dirs))
    for n, d in dirs.items():
        table.register(n, d)
    engine = Engine(model, tok, table, max_batch=3, prepack=prepack, layout=layout)
    assert engine.layout == layout
    jobs = [(n, [5 + k, 6, 7], 6) for k, n in enumerate(dirs)] + [(None, [9, 10], 5)]
    got = _run_jobs(engine, jobs)
    engine.stop()
    for k, (name, ids, n) in enumerate(jobs):
        assert isinstance(got.get(k), Finished), (name, got.get(k))
        want = reference(dirs[name] if name else None, ids, n)
        assert got[k].text == tok.decode(want, skip_special_tokens=True), name
