"""Lazy checkpoint merges: same result as merging the loaded state dicts, sharding, atomicity, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftkit.core.errors import ConfigError
from peftkit.merging.checkpoint import merge_checkpoints
from peftkit.merging.registry import get_merge_method, make_options
from peftkit.merging.streaming import StreamWriter, TensorFile


def _state(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"emb.weight": torch.randn(20, 8, generator=g).to(dtype), "l1.weight": torch.randn(8, 8, generator=g).to(dtype),
            "l1.bias": torch.randn(8, generator=g).to(dtype), "pos_ids": torch.arange(5)}


@pytest.fixture
def ckpts(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"m{i}.safetensors"
        save_file(_state(i), str(p))
        paths.append(p)
    return paths


def test_stream_reader_and_writer_round_trip(tmp_path):
    st = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(6, dtype=torch.int64), "c": torch.zeros(0)}
    w = StreamWriter(tmp_path / "x.safetensors", [(k, tuple(v.shape), v.dtype) for k, v in st.items()], {"k": "v"})
    for k, v in st.items():
        w.write(k, v)
    w.close()
    back = load_file(str(tmp_path / "x.safetensors"))  # readable by the reference reader
    for k in st:
        assert torch.equal(back[k], st[k])
    tf = TensorFile(tmp_path / "x.safetensors")
    assert tf.metadata == {"k": "v"} and torch.equal(tf.get("a"), st["a"])


@pytest.mark.parametrize("method,opts", [("ties", {"density": 0.5}), ("task_arithmetic", {}),
                                         ("dare_ties", {"density": 0.5, "seed": 3})])
def test_lazy_merge_equals_eager_merge(tmp_path, ckpts, method, opts):
    base, a, b = ckpts
    out = merge_checkpoints([a, b], tmp_path / "out", method, [0.6, 0.4], opts, base=base, progress=False)
    got = load_file(str(out / "model.safetensors"))
    sb, sa, sbb = (load_file(str(p)) for p in ckpts)
    m = get_merge_method(method)
    o = make_options(m, opts, 2)
    from peftkit.merging.registry import MaskSource

    masks = MaskSource(opts.get("seed"))
    for k in sb:
        if not sb[k].is_floating_point():
            assert torch.equal(got[k], sa[k])
            continue
        ref = sb[k] + m([sa[k] - sb[k], sbb[k] - sb[k]], [0.6, 0.4], o, masks)
        torch.testing.assert_close(got[k], ref)


def test_no_base_for_linear_and_slerp_only(tmp_path, ckpts):
    a, b = ckpts[1:]
    out = merge_checkpoints([a, b], tmp_path / "avg", "task_arithmetic", [0.5, 0.5], progress=False)
    sa, sb = load_file(str(a)), load_file(str(b))
    torch.testing.assert_close(load_file(str(out / "model.safetensors"))["l1.weight"], (sa["l1.weight"] + sb["l1.weight"]) / 2)
    with pytest.raises(ConfigError, match="give the base checkpoint"):
        merge_checkpoints([a, b], tmp_path / "t", "ties", progress=False)


def test_sharded_output_with_index(tmp_path, ckpts):
    out = merge_checkpoints(ckpts[1:], tmp_path / "sh", "task_arithmetic", base=ckpts[0], shard_size=400, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    # a sharded directory is itself a valid merge input
    again = merge_checkpoints([out, out], tmp_path / "again", "task_arithmetic", [0.5, 0.5], progress=False)
    one = load_file(str(again / "model.safetensors"))
    assert set(one) == set(index["weight_map"])


def test_bad_input_is_refused_before_writing(tmp_path, ckpts):
    odd = _state(7)
    odd["l1.weight"] = torch.randn(8, 9)
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ConfigError, match=r"'l1.weight' has shape \(8, 9\)"):
        merge_checkpoints([ckpts[1], tmp_path / "odd.safetensors"], tmp_path / "o1", "task_arithmetic", progress=False)
    missing = _state(8)
    del missing["l1.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match=r"lacks tensor 'l1\.bias'"):
        merge_checkpoints([ckpts[1], tmp_path / "missing.safetensors"], tmp_path / "o2", "task_arithmetic", progress=False)
    with pytest.raises(ConfigError, match="did you mean 'density'"):
        merge_checkpoints(ckpts[1:], tmp_path / "o3", "ties", options={"dens": 0.2}, base=ckpts[0], progress=False)
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())


def test_failed_merge_leaves_existing_output_untouched(tmp_path, ckpts, monkeypatch):
    out = merge_checkpoints(ckpts[1:], tmp_path / "out", "task_arithmetic", progress=False)
    before = (out / "model.safetensors").read_bytes()
    from peftkit.merging import checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "_merge_one", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_checkpoints(ckpts[1:], out, "task_arithmetic", overwrite=True, progress=False)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(ConfigError, match="already exists"):
        merge_checkpoints(ckpts[1:], out, "task_arithmetic", progress=False)
