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
    peftkit.save(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "extra.safetensors").write_bytes(b"head")  # a side file travels unchanged
    return model, inputs, out, tmp_path


def test_compeft_folder_loads_transparently_and_is_smaller(saved):
    tmp = saved[3]
    state = peftkit.read_adapters(tmp / "adapter")[0]
    decoded = peftkit.compress(tmp / "adapter", tmp / "c", method="compeft", density=0.1)
    back = peftkit.read_adapters(tmp / "c")[0]
    assert back.config == state.config and back.targets == state.targets
    for k, t in state.tensors.items():
        assert torch.equal(back.tensors[k], decoded.tensors[k])
        nz = int((back.tensors[k] != 0).sum())
        assert nz == int(torch.ceil(torch.tensor(0.1 * t.numel()))) and back.tensors[k].dtype == t.dtype
        assert torch.equal(back.tensors[k][back.tensors[k] != 0].sign(), t[back.tensors[k] != 0].sign())
    assert (tmp / "c" / "extra.safetensors").read_bytes() == b"head"
    size = sum(f.stat().st_size for f in (tmp / "c").iterdir() if f.name != "extra.safetensors")
    orig = sum(f.stat().st_size for f in (tmp / "adapter").iterdir() if f.name != "extra.safetensors")
    assert orig / size > 4
    fresh, _, _ = tiny_llama()
    peftkit.load(fresh, tmp / "c")  # through the ordinary load path
    assert peftkit.adapter_names(fresh) == ["task"]


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
