"""Compressed adapters: peftkit.compress writes them, peftkit.load reads them transparently; the CLI; bad input."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.cli.main import main
from peftkit.core.errors import ConfigError
from tests.models import tiny_llama


@pytest.fixture
def saved(tmp_path):
    model, inputs, out = tiny_llama()
    peftkit.attach(model, peftkit.LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), "task")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in peftkit.get_adapter(model, "task").values():
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.1)
            mod.lora_A.add_(torch.randn(mod.lora_A.shape, generator=g) * 0.01)  # trained away from A₀
    peftkit.save(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "extra.safetensors").write_bytes(b"head")  # a side file travels unchanged
    return model, inputs, out, tmp_path


def test_compeft_folder_loads_transparently_and_is_smaller(saved):
    tmp = saved[3]
    state = peftkit.read_adapters(tmp / "adapter")[0]
    decoded = peftkit.compress(tmp / "adapter", tmp / "c", method="compeft", density=0.1)
    back = peftkit.read_adapters(tmp / "c")[0]
    assert back.config == state.config and back.targets == state.targets
    assert isinstance(state.config.init_seed, int)  # recorded at attach
    for k, t in state.tensors.items():
        assert torch.equal(back.tensors[k], decoded.tensors[k]) and back.tensors[k].dtype == t.dtype
        module, _, tensor = k.rpartition(".")
        start = state.config.initial_value(module, tensor, tuple(t.shape), state.layers[module])
        start = torch.zeros_like(t) if not isinstance(start, torch.Tensor) else start
        change, kept = t - start, back.tensors[k] - start  # the task vector and its ternary version
        nz = int((kept.abs() > 1e-6).sum())
        assert nz == int(torch.ceil(torch.tensor(0.1 * t.numel())))
        mask = kept.abs() > 1e-6
        assert torch.equal(kept[mask].sign(), change[mask].sign())
        torch.testing.assert_close(kept[mask].abs(), change[mask].abs().mean().expand(nz), atol=1e-6, rtol=1e-5)
    assert (tmp / "c" / "extra.safetensors").read_bytes() == b"head"
    size = sum(f.stat().st_size for f in (tmp / "c").iterdir() if f.name != "extra.safetensors")
    orig = sum(f.stat().st_size for f in (tmp / "adapter").iterdir() if f.name != "extra.safetensors")
    assert orig / size > 4
    fresh, _, _ = tiny_llama()
    peftkit.load(fresh, tmp / "c")  # through the ordinary load path
    assert peftkit.adapter_names(fresh) == ["task"]


def test_compeft_of_a_seeded_lora_keeps_the_random_start(saved):
    """A₀ is regenerated from the recorded seed, so only the (small) change is approximated: the
    decoded A is far closer to A than ComPEFT of A itself (what a seedless peft file gets)."""
    tmp = saved[3]
    state = peftkit.read_adapters(tmp / "adapter")[0]
    with_seed = peftkit.compress(state, method="compeft", density=0.1)
    seedless = state.replace(config=state.config.replace(init_seed=None))
    with pytest.warns(UserWarning, match="no init_seed"):
        without = peftkit.compress(seedless, method="compeft", density=0.1)
    for k, t in state.tensors.items():
        if k.endswith("lora_A"):
            err_seed = (with_seed.tensors[k] - t).norm() / t.norm()
            err_raw = (without.tensors[k] - t).norm() / t.norm()
            assert err_seed < 0.1 < err_raw


def test_lora_init_seed_reproduces_each_layer_and_differs_between_layers():
    a, _, _ = tiny_llama()
    b, _, _ = tiny_llama()
    cfg = peftkit.LoRA(r=4, target_modules=["q_proj", "v_proj"], init_seed=7)
    peftkit.attach(a, cfg)
    torch.manual_seed(123)  # the global generator plays no part
    peftkit.attach(b, cfg)
    sa, sb = peftkit.extract(a, "default"), peftkit.extract(b, "default")
    keys = [k for k in sa.tensors if k.endswith("lora_A")]
    assert all(torch.equal(sa.tensors[k], sb.tensors[k]) for k in keys)
    assert not torch.equal(sa.tensors[keys[0]], sa.tensors[keys[1]])
    module, _, tensor = keys[0].rpartition(".")
    again = cfg.initial_value(module, tensor, tuple(sa.tensors[keys[0]].shape), sa.layers[module])
    assert torch.equal(again, sa.tensors[keys[0]])


@pytest.mark.parametrize("method,tol", [("int8", 0.01), ("int4", 0.2)])
def test_lowbit_folders_are_close(saved, method, tol):
    model, inputs, out, tmp = saved
    state = peftkit.read_adapters(tmp / "adapter")[0]
    peftkit.compress(state, tmp / method, method=method)
    back = peftkit.read_adapters(tmp / method)[0]
    for k, t in state.tensors.items():
        rel = (back.tensors[k] - t).norm() / t.norm().clamp(min=1e-12)
        assert rel < tol
    with torch.no_grad():
        ref = out(model(**inputs))
        peftkit.delete(model, "task")
        peftkit.install(model, back)
        assert (out(model(**inputs)) - ref).abs().max() < 20 * tol * ref.abs().max()


def test_cli_compress_and_bad_input(saved, capsys):
    _, _, _, tmp = saved
    assert main(["compress", str(tmp / "adapter"), "--method", "compeft", "--density", "0.2"]) == 0
    assert "x smaller" in capsys.readouterr().out
    assert (tmp / "adapter-compeft" / "peftkit_compressed.json").is_file()
    assert main(["compress", str(tmp / "adapter"), "--method", "compeftt"]) == 2
    assert "did you mean 'compeft'" in capsys.readouterr().err
    assert main(["compress", str(tmp / "adapter"), "--density", "1.5", "--output", str(tmp / "z")]) == 2
    assert not (tmp / "z").exists()
    with pytest.raises(ConfigError, match="already exists"):
        peftkit.compress(tmp / "adapter", tmp / "adapter-compeft")
    with pytest.raises(ConfigError, match="did you mean 'std'"):
        peftkit.compress(tmp / "adapter", scale="sdt")


def test_corrupt_compressed_folder_is_refused_by_name(saved):
    _, _, _, tmp = saved
    peftkit.compress(tmp / "adapter", tmp / "c")
    (tmp / "c" / "adapter.pkc").write_bytes(b"garbage")
    with pytest.raises(peftkit.AdapterLoadError, match=r"adapter\.pkc: corrupt compressed adapter"):
        peftkit.read_adapters(tmp / "c")
