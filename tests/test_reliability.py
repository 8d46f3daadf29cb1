"""Reliability: atomic whole-folder saves, concurrent writers, refusals of hostile input, no silent wrong results."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.core import files

from .models import MODELS, outputs


def llama(seed: int = 0):
    return MODELS["llama"](seed)


def lora_model(seed: int = 0, r: int = 2, alpha: float = 4.0, name: str = "default", perturb: int = 0):
    model, inputs, out = llama(0)
    peftkit.attach(model, peftkit.LoRA(r=r, alpha=alpha, target_modules=["q_proj", "v_proj"]), name)
    g = torch.Generator().manual_seed(perturb)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model, inputs, out


def snapshot(model) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["__structure__"] = torch.tensor([hash(tuple(type(m).__name__ for m in model.modules())) % 2**31])
    state["__grad__"] = torch.tensor([int(p.requires_grad) for p in model.parameters()])
    return state


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- atomic folder saves ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["peftkit", "hf"])
@pytest.mark.parametrize("fail", ["fsync", "rename", "write", "mkdtemp", "renameat2"])
def test_failed_save_leaves_old_adapter_loadable_and_equal(tmp_path, monkeypatch, fmt, fail):
    old, inputs, out = lora_model(perturb=1)
    d = tmp_path / "a"
    peftkit.save(old, d, format=fmt)
    before = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    expected = outputs(old, inputs, out)
    new, _, _ = lora_model(perturb=2, alpha=8.0)
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        raise OSError(28, "No space left on device")

    if fail == "fsync":
        monkeypatch.setattr(files.os, "fsync", boom)
    elif fail == "rename":
        monkeypatch.setattr(files.os, "rename", boom)
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    elif fail == "write":
        real_open = open

        def bad_open(path, mode="r", *a, **k):
            if "w" in mode and ".tmp" in str(path):
                raise OSError(28, "No space left on device")
            return real_open(path, mode, *a, **k)

        monkeypatch.setattr("builtins.open", bad_open)
    elif fail == "mkdtemp":
        monkeypatch.setattr(files.tempfile, "mkdtemp", boom)
    else:
        monkeypatch.setattr(files, "_exchange", boom)
    with pytest.raises(OSError):
        peftkit.save(new, d, format=fmt)
    monkeypatch.undo()
    after = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    fresh, _, _ = llama(0)
    peftkit.load(fresh, d)
    torch.testing.assert_close(outputs(fresh, inputs, out), expected, rtol=0, atol=0)


def test_save_keeps_foreign_files_and_drops_stale_adapter_files(tmp_path):
    m, _, _ = lora_model()
    d = tmp_path / "run"
    peftkit.attach(m, peftkit.LoRA(r=2, target_modules=["k_proj"]), "second")
    peftkit.save(m, d)  # two adapters: sub-folders
    (d / "README.md").write_text("notes")
    (d / "peftkit_task.json").write_text("{}")
    peftkit.save(m, d, name="default")  # now one adapter at the root
    names = sorted(p.name for p in d.iterdir())
    assert names == ["README.md", "adapter.safetensors", "peftkit_adapter.json", "peftkit_task.json"]
    assert (d / "README.md").read_text() == "notes"


def test_save_refuses_empty_and_file_paths(tmp_path):
    m, _, _ = lora_model()
    for bad in ["", "   "]:
        with pytest.raises(peftkit.ConfigError, match="folder path is needed"):
            peftkit.save(m, bad)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(peftkit.ConfigError, match="not a directory"):
        peftkit.save(m, f)
    assert f.read_text() == "x"


def _writer(path: str, seed: int, rounds: int, fmt: str) -> None:
    torch.set_num_threads(1)
    m, _, _ = lora_model(perturb=seed, alpha=float(seed))
    for _ in range(rounds):
        peftkit.save(m, path, format=fmt)


@pytest.mark.parametrize("fmt", ["peftkit", "hf"])
def test_concurrent_writers_never_give_a_mixed_adapter(tmp_path, fmt):
    d = tmp_path / "shared"
    expected = {}
    for seed in (3, 5):  # what each writer writes
        m, _, _ = lora_model(perturb=seed, alpha=float(seed))
        state = peftkit.extract(m, "default")
        expected[float(seed)] = state.tensors
    _writer(str(d), 3, 1, fmt)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(d), s, 25, fmt)) for s in (3, 5)]
    for p in procs:
        p.start()
    loads = 0
    deadline = time.time() + 60
    while any(p.is_alive() for p in procs) and time.time() < deadline:
        (state,) = peftkit.read_adapters(d)
        ref = expected[float(state.config.alpha)]
        assert state.tensors.keys() == ref.keys()
        assert all(torch.equal(state.tensors[k], ref[k]) for k in ref), "weights of one writer, config of the other"
        loads += 1
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert loads > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- loads are all or nothing -----------------------------------------------------------------
def test_loading_several_adapters_is_all_or_nothing(tmp_path):
    m, _, _ = lora_model()
    peftkit.attach(m, peftkit.LoRA(r=2, target_modules=["k_proj"]), "b_second")
    d = tmp_path / "two"
    peftkit.save(m, d)
    t = load_file(d / "b_second" / "adapter.safetensors")
    key = sorted(t)[0]
    t[key] = t[key][:1]  # a later adapter is bad
    save_file(t, d / "b_second" / "adapter.safetensors", metadata={"save_id": "x"})
    meta = json.loads((d / "b_second" / "peftkit_adapter.json").read_text())
    meta["save_id"] = "x"
    meta["tensors"][key]["shape"] = list(t[key].shape)
    (d / "b_second" / "peftkit_adapter.json").write_text(json.dumps(meta))
    fresh, _, _ = llama(0)
    peftkit.attach(fresh, peftkit.LoRA(r=2, target_modules=["o_proj"]), "mine")
    fresh.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # the user's own choice: kept
    before = snapshot(fresh)
    with pytest.raises(peftkit.AdapterLoadError, match="shape"):
        peftkit.load(fresh, d)
    assert same(snapshot(fresh), before)
    assert peftkit.adapter_names(fresh) == ["mine"] and peftkit.active_names(fresh) == ["mine"]


def test_load_keeps_other_adapters_trainable_and_can_leave_active_set(tmp_path):
    m, _, _ = lora_model()
    d = tmp_path / "a"
    peftkit.save(m, d)
    user, _, _ = llama(0)
    peftkit.attach(user, peftkit.LoRA(r=2, target_modules=["o_proj"]), "mine")
    peftkit.load(user, d, name="ref")
    assert all(p.requires_grad for p in peftkit.adapter_parameters(user, "mine").values())
    assert not any(p.requires_grad for p in peftkit.adapter_parameters(user, "ref").values())
    state = peftkit.extract(m, "default")
    peftkit.install(user, state, name="third", activate=False)
    assert peftkit.active_names(user) == ["ref"]


# -- refusals, not silent wrong results ----------------------------------------------------------
def test_mixed_batch_refuses_merged_adapters_and_bad_rows():
    m, _inputs, _out = lora_model()
    peftkit.merge(m)
    with pytest.raises(peftkit.PeftkitError, match="merged into the weights"), peftkit.mixed_batch(m, ["default"] * 4):
        pass
    peftkit.unmerge(m)
    for bad, msg in [("default", "one adapter name"), ([1, None, None, None], "got 1")]:
        with pytest.raises(peftkit.ConfigError, match=msg), peftkit.mixed_batch(m, bad):
            pass


def test_mixed_batch_leaves_nothing_behind_and_is_per_thread():
    import threading

    m, inputs, out = lora_model()
    base = None
    with peftkit.disabled(m):
        base = outputs(m, inputs, out)
    adapted = outputs(m, inputs, out)
    with pytest.raises(RuntimeError), peftkit.mixed_batch(m, [None] * 4):
        raise RuntimeError("user error inside the block")
    torch.testing.assert_close(outputs(m, inputs, out), adapted)
    results = {}

    def run(tag, rows):
        with peftkit.mixed_batch(m, rows):
            for _ in range(5):
                results[tag] = outputs(m, inputs, out)

    threads = [threading.Thread(target=run, args=("base", [None] * 4)),
               threading.Thread(target=run, args=("lora", ["default"] * 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(results["base"], base)
    torch.testing.assert_close(results["lora"], adapted)


@pytest.mark.parametrize("method", ["dora", "oft", "lora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_repeated_disable_of_merged_half_precision_adapters_does_not_drift(method, dtype):
    model, _inputs, _out = llama(0)
    model.to(dtype)
    config = {"dora": peftkit.DoRA(r=4, target_modules=["q_proj", "v_proj"]),
              "oft": peftkit.OFT(oft_block_size=8, target_modules=["q_proj", "v_proj"]),
              "lora": peftkit.LoRA(r=4, target_modules=["q_proj", "v_proj"])}[method]
    peftkit.attach(model, config)
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    peftkit.merge(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(200):
        with peftkit.disabled(model):
            pass
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged[k]), k
    peftkit.unmerge(model)
    fresh, _, _ = llama(0)
    fresh.to(dtype)
    for k, v in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[k.replace("q_proj.", "q_proj.base.").replace("v_proj.", "v_proj.base.")]
                           if k.endswith(("q_proj.weight", "v_proj.weight")) else model.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["a/b", "..", "a\x00b", "x" * 256, " lead", "", "_private", "a.b", "c:d",
                                  "training", "forward", 5, None])
def test_bad_adapter_names_are_refused_at_attach(name):
    m, _, _ = llama(0)
    with pytest.raises(peftkit.ConfigError, match="adapter name"):
        peftkit.attach(m, peftkit.LoRA(target_modules=["q_proj"]), name)
    assert not peftkit.adapter_names(m)


def test_catastrophic_patterns_do_not_hang(tmp_path):
    """The issue's pattern hung ``re`` for minutes; the regex engine matches it at once, in configs and files."""
    m, _, _ = lora_model()
    d = tmp_path / "a"
    peftkit.save(m, d)
    meta = json.loads((d / "peftkit_adapter.json").read_text())
    meta["config"]["rank_pattern"] = {"(.*.*)*z": 2, "(x+x+)+y": 3}
    (d / "peftkit_adapter.json").write_text(json.dumps(meta))
    start = time.time()
    fresh, _, _ = llama(0)
    peftkit.load(fresh, d)
    with pytest.raises(peftkit.TargetError, match="matches no module"):
        peftkit.attach(fresh, peftkit.LoRA(target_modules=["re:(.*.*)*z"]), "b")
    assert time.time() - start < 10


def test_slow_patterns_are_refused_naming_the_pattern(monkeypatch):
    from peftkit.core import patterns

    monkeypatch.setattr(patterns, "MATCH_TIMEOUT", 1e-9)  # any match now runs out of time
    m, _, _ = llama(0)
    with pytest.raises(peftkit.ConfigError, match=r"pattern key '\(x\+x\+\)\+y'.*takes too long"):
        peftkit.attach(m, peftkit.LoRA(target_modules=["q_proj"], rank_pattern={"(x+x+)+y": 2}))
    with pytest.raises(peftkit.ConfigError, match="takes too long"):
        peftkit.attach(m, peftkit.LoRA(target_modules=["re:(x+x+)+y"]))
    assert not peftkit.adapter_names(m)


def test_invalid_regular_expressions_name_the_pattern():
    m, _, _ = llama(0)
    with pytest.raises(peftkit.ConfigError, match=r"'re:\(unclosed'.*not a valid regular expression"):
        peftkit.attach(m, peftkit.LoRA(target_modules=["re:(unclosed"]))


@pytest.mark.parametrize("fmt", ["peftkit", "hf"])
def test_nonfinite_tensors_are_refused_by_name(tmp_path, fmt):
    m, _inputs, _out = lora_model()
    d = tmp_path / "a"
    peftkit.save(m, d, format=fmt)
    wfile = d / ("adapter.safetensors" if fmt == "peftkit" else "adapter_model.safetensors")
    t = load_file(wfile)
    key = sorted(t)[0]
    t[key][0, 0] = float("nan")
    save_file(t, wfile, metadata=None if fmt == "hf" else {})
    fresh, _, _ = llama(0)
    before = snapshot(fresh)
    with pytest.raises(peftkit.AdapterLoadError, match=r"non-finite.*\n.*allow_nonfinite"):
        peftkit.load(fresh, d)
    assert same(snapshot(fresh), before)
    peftkit.load(fresh, d, allow_nonfinite=True)
    assert peftkit.adapter_names(fresh) == ["default"]


@pytest.mark.parametrize("key,value", [("alora_invocation_tokens", [1, 2]), ("use_qalora", True),
                                       ("trainable_token_indices", [3]), ("lora_bias", True),
                                       ("layer_replication", [[0, 1]]), ("brand_new_option", 3)])
def test_hf_options_that_change_the_math_are_refused_by_name(tmp_path, key, value):
    m, _, _ = lora_model()
    d = tmp_path / "a"
    peftkit.save(m, d, format="hf")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[key] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(peftkit.AdapterLoadError, match=key):
        peftkit.load(llama(0)[0], d)


def test_unknown_switched_off_hf_options_are_ignored_with_a_warning(tmp_path):
    m, inputs, out = lora_model()
    d = tmp_path / "a"
    peftkit.save(m, d, format="hf")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["future_option"] = None
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    fresh, _, _ = llama(0)
    with pytest.warns(UserWarning, match="future_option"):
        peftkit.load(fresh, d)
    torch.testing.assert_close(outputs(fresh, inputs, out), outputs(m, inputs, out))


@pytest.mark.parametrize("fmt,field,value,msg", [
    ("peftkit", "r", 4.5, "r must be an integer"),
    ("peftkit", "use_rslora", "false", "use_rslora must be true or false"),
    ("peftkit", "rank_pattern", "q_proj", "rank_pattern must be a mapping"),
    ("peftkit", "alpha_pattern", {"q_proj": "big"}, "alpha_pattern must map"),
    ("peftkit", "method", 5, "method name must be a string"),
    ("peftkit", "method", None, "method name must be a string"),
    ("peftkit", "target_modules", 7, "target_modules must be"),
    ("peftkit", "target_modules", ["q_proj", "q_proj"], "lists 'q_proj' twice"),
    ("hf", "r", 4.5, "r must be an integer"),
    ("hf", "use_rslora", "false", "use_rslora must be true or false"),
    ("hf", "lora_alpha", "16", "alpha must be"),
])
def test_config_fields_are_typed_strictly(tmp_path, fmt, field, value, msg):
    m, _, _ = lora_model()
    d = tmp_path / "a"
    peftkit.save(m, d, format=fmt)
    name = "peftkit_adapter.json" if fmt == "peftkit" else "adapter_config.json"
    meta = json.loads((d / name).read_text())
    (meta["config"] if fmt == "peftkit" else meta)[field] = value
    (d / name).write_text(json.dumps(meta))
    fresh, _, _ = llama(0)
    before = snapshot(fresh)
    with pytest.raises(peftkit.PeftkitError, match=msg):
        peftkit.load(fresh, d)
    assert same(snapshot(fresh), before)


@pytest.mark.parametrize("targets,msg", [("model.layers.0.self_attn.q_proj", "targets must be a list"),
                                         ([1, 2], "targets must be a list"),
                                         (["model.layers.0.self_attn.q_proj"] * 2, "twice")])
def test_targets_must_be_a_list_of_distinct_names(tmp_path, targets, msg):
    m, _, _ = lora_model()
    d = tmp_path / "a"
    peftkit.save(m, d)
    meta = json.loads((d / "peftkit_adapter.json").read_text())
    meta["targets"] = targets
    (d / "peftkit_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(peftkit.AdapterLoadError, match=msg):
        peftkit.load(llama(0)[0], d)


@pytest.mark.parametrize("raw,msg", [(b"\xff\xfe{", "not UTF-8"), (b"[" * 100000 + b"]" * 100000, "JSON nested too deeply"),
                                     (b"[1, 2]", "expected a JSON object"), (b"{,}", "not valid JSON")])
def test_broken_config_json_is_an_error_naming_the_file(tmp_path, raw, msg):
    m, _, _ = lora_model()
    d = tmp_path / "a"
    peftkit.save(m, d)
    (d / "peftkit_adapter.json").write_bytes(raw)
    with pytest.raises(peftkit.AdapterLoadError, match=f"peftkit_adapter.json: {msg}"):
        peftkit.load(llama(0)[0], d)


def test_files_of_two_saves_are_refused(tmp_path):
    a, _, _ = lora_model(perturb=1)
    b, _, _ = lora_model(perturb=2)
    peftkit.save(a, tmp_path / "a")
    peftkit.save(b, tmp_path / "b")
    os.replace(tmp_path / "b" / "adapter.safetensors", tmp_path / "a" / "adapter.safetensors")
    with pytest.raises(peftkit.AdapterLoadError, match="different saves"):
        peftkit.load(llama(0)[0], tmp_path / "a")


def test_values_round_trip_without_a_model(tmp_path):
    m, inputs, out = lora_model(perturb=4)
    state = peftkit.extract(m, "default")
    peftkit.write_adapters([state.replace(name="copy")], tmp_path / "v", format="hf")
    (back,) = peftkit.read_adapters(tmp_path / "v")
    fresh, _, _ = llama(0)
    peftkit.install(fresh, back)
    torch.testing.assert_close(outputs(fresh, inputs, out), outputs(m, inputs, out))
    assert Path(tmp_path / "v" / "adapter_config.json").is_file()
