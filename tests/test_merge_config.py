"""The YAML merge file and the `peftkit merge` command: keys checked before anything is read or written."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from peftkit.cli.main import main
from peftkit.core.errors import ConfigError
from peftkit.merging.config import load_spec, parse_size, parse_spec


@pytest.fixture
def ckpts(tmp_path):
    paths = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        p = tmp_path / f"m{i}.safetensors"
        save_file({"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g)}, str(p))
        paths.append(p)
    return paths


def _write(tmp_path, data):
    p = tmp_path / "merge.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_cli_merges_checkpoints_from_a_yaml_file(tmp_path, ckpts, capsys):
    cfg = _write(tmp_path, {"inputs": [{"path": str(ckpts[1]), "weight": 0.25}, {"path": str(ckpts[2]), "weight": 0.75}],
                            "method": "ties", "options": {"density": 1.0}, "base": str(ckpts[0]),
                            "output": str(tmp_path / "out")})
    assert main(["merge", str(cfg), "--no-progress"]) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    s0, s1, s2 = (load_file(str(p)) for p in ckpts)
    d1, d2 = s1["w"] - s0["w"], s2["w"] - s0["w"]
    agree = torch.sign(d1) == torch.sign(d2)  # density 1: TIES = mean of agreeing weighted entries
    elected = torch.sign(d1 + d2)
    num = 0.25 * d1 * (torch.sign(d1) == elected) + 0.75 * d2 * (torch.sign(d2) == elected)
    den = (torch.sign(d1) == elected).float() + (torch.sign(d2) == elected).float()
    torch.testing.assert_close(got["w"], s0["w"] + num / den.clamp(min=1))
    assert agree.any()


def test_unknown_keys_and_bad_values_are_refused_with_the_closest_name(tmp_path, ckpts, capsys):
    base = {"inputs": [str(ckpts[1]), str(ckpts[2])], "method": "task_arithmetic", "output": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match=r"unknown key 'wieghts'.*did you mean 'weights'"):
        parse_spec({**base, "wieghts": [1, 1]})
    with pytest.raises(ConfigError, match=r"inputs\[0\]: unknown key 'wegiht'"):
        parse_spec({**base, "inputs": [{"path": str(ckpts[1]), "wegiht": 1}]})
    with pytest.raises(ConfigError, match="does not exist"):
        parse_spec({**base, "inputs": [str(tmp_path / "nope.safetensors")]})
    with pytest.raises(ConfigError, match="missing key 'method'"):
        parse_spec({k: v for k, v in base.items() if k != "method"})
    with pytest.raises(ConfigError, match="'rank' applies to adapter merges"):
        parse_spec({**base, "rank": 4})
    with pytest.raises(ConfigError, match="either in 'weights' or per input"):
        parse_spec({**base, "weights": [1, 1], "inputs": [{"path": str(ckpts[1]), "weight": 2}, str(ckpts[2])]})
    assert parse_size("500MB") == 500 * 10**6 and parse_size("2GiB") == 2 * 2**30
    cfg = _write(tmp_path, {**base, "method": "tiess"})
    assert main(["merge", str(cfg), "--no-progress"]) == 2
    assert "did you mean 'ties'" in capsys.readouterr().err
    cfg = _write(tmp_path, {**base, "weights": [1, 2, 3]})
    assert main(["merge", str(cfg), "--no-progress"]) == 2
    assert "3 weights for 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_spec_reads_per_input_weights_and_seed(tmp_path, ckpts):
    spec = load_spec(_write(tmp_path, {"inputs": [{"path": str(ckpts[1]), "weight": 2}, str(ckpts[2])],
                                       "method": "dare_linear", "seed": 3, "output": "x", "base": str(ckpts[0]),
                                       "shard_size": "1MB"}))
    assert spec.weights == [2, 1.0] and spec.options == {"seed": 3} and spec.kind == "checkpoint"
    assert spec.shard_size == 10**6


def test_cli_merges_adapters_from_a_yaml_file(tmp_path, capsys):
    import peftkit
    from tests.models import tiny_llama

    model, _, _ = tiny_llama()
    for i, name in enumerate(("a", "b")):
        peftkit.attach(model, peftkit.LoRA(r=2 + i, target_modules=["q_proj"]), name)
        peftkit.save(model, tmp_path / name, name)
    cfg = _write(tmp_path, {"inputs": [str(tmp_path / "a"), str(tmp_path / "b")], "method": "dare_ties",
                            "options": {"density": 0.5}, "seed": 1, "rank": 3, "name": "both",
                            "output": str(tmp_path / "m"), "format": "hf"})
    assert main(["merge", str(cfg), "--no-progress"]) == 0
    state = peftkit.read_adapters(tmp_path / "m")[0]
    assert (tmp_path / "m" / "adapter_config.json").is_file() and state.config.r == 3
    bad = _write(tmp_path, {"inputs": [str(tmp_path / "a"), str(tmp_path / "b")], "method": "ties",
                            "base": str(tmp_path / "a"), "output": str(tmp_path / "n")})
    assert main(["merge", str(bad)]) == 2
    assert "'base' applies to checkpoint merges" in capsys.readouterr().err
