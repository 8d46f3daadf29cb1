"""A seeded fuzz suite over adapter files in both formats.

Each case takes a valid saved adapter and breaks it one way (a config field replaced by a
value of another type, a key dropped or added, a tensor reshaped, retyped, truncated, made
non-finite or renamed, the files cut short). Loading must then either raise a
:class:`peftkit.PeftkitError` and leave the model bit-identical, or succeed with outputs equal to
loading the same tensors by hand. Anything else (a raw exception, a silent change) fails.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit

from .models import MODELS, outputs

CASES = 120  # per format
VALUES = [None, True, False, 0, -1, 1, 4.5, 1e308, float("nan"), "", "x", "false", "16", [], [1], ["q_proj", "q_proj"],
          {}, {"a": 1}, {"q_proj": "big"}, [[[]]], "re:(.*.*)*z", "(x+x+)+y", "\u0000", "a" * 5000]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model, _inputs, _out = MODELS["llama"](0)
    peftkit.attach(model, peftkit.LoRA(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in peftkit.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    for fmt in ("peftkit", "hf"):
        peftkit.save(model, root / fmt, format=fmt)
    return root


def files_of(fmt):
    return ("peftkit_adapter.json", "adapter.safetensors") if fmt == "peftkit" else ("adapter_config.json",
                                                                                     "adapter_model.safetensors")


def mutate(rng: random.Random, d, fmt) -> str:
    cfg_name, w_name = files_of(fmt)
    kind = rng.choice(["config_value", "config_drop", "config_add", "tensor_shape", "tensor_dtype", "tensor_nan",
                       "tensor_rename", "tensor_drop", "truncate_weights", "truncate_config", "meta_value"])
    if kind.startswith("config") or kind == "meta_value":
        meta = json.loads((d / cfg_name).read_text())
        target = meta["config"] if fmt == "peftkit" and kind != "meta_value" else meta
        key = rng.choice(sorted(target))
        if kind == "config_drop":
            target.pop(key)
        elif kind == "config_add":
            target[rng.choice(["lora_bias", "use_dora", "surprise", "r2", "layers_pattern", "target_parameters"])] = \
                rng.choice(VALUES)
        else:
            target[key] = rng.choice(VALUES)
        (d / cfg_name).write_text(json.dumps(meta, allow_nan=True))
        return f"{kind}:{key}"
    if kind.startswith("truncate"):
        path = d / (w_name if kind == "truncate_weights" else cfg_name)
        raw = path.read_bytes()
        path.write_bytes(raw[: rng.randrange(len(raw))])
        return kind
    t = load_file(d / w_name)
    key = rng.choice(sorted(t))
    if kind == "tensor_shape":
        t[key] = t[key].reshape(-1)[: max(1, t[key].numel() - 1)]
    elif kind == "tensor_dtype":
        t[key] = t[key].to(rng.choice([torch.int64, torch.float16, torch.bool, torch.float64]))
    elif kind == "tensor_nan":
        t[key] = t[key].clone()
        t[key].view(-1)[0] = rng.choice([float("nan"), float("inf")])
    elif kind == "tensor_rename":
        t[key + "x"] = t.pop(key)
    else:
        t.pop(key)
    meta = {"format": "pt"}
    if fmt == "peftkit":  # keep the save id so that the mutation, not the torn-folder check, is what is tested
        meta = {"save_id": json.loads((d / cfg_name).read_text()).get("save_id", "")}
    save_file(t, d / w_name, metadata=meta)
    return f"{kind}:{key}"


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()], \
        [type(m).__name__ for m in model.modules()]


@pytest.mark.parametrize("fmt", ["peftkit", "hf"])
def test_fuzzed_files_load_correctly_or_are_refused_cleanly(saved, tmp_path, fmt):
    import shutil

    rng = random.Random(1234 + (fmt == "hf"))
    refused = loaded = 0
    for i in range(CASES):
        d = tmp_path / f"{fmt}{i}"
        shutil.copytree(saved / fmt, d)
        what = mutate(rng, d, fmt)
        model, inputs, out = MODELS["llama"](0)
        before = state_of(model)
        try:
            peftkit.load(model, d)
        except peftkit.PeftkitError:
            after = state_of(model)
            assert after[1] == before[1] and after[2] == before[2], what
            assert all(torch.equal(after[0][k], before[0][k]) for k in before[0]), what
            refused += 1
            continue
        except Exception as e:  # a raw exception is a bug
            raise AssertionError(f"case {i} ({what}) raised {type(e).__name__}: {e}") from e
        # a load that succeeded must give the saved adapter's behaviour on the unchanged tensors
        assert torch.isfinite(outputs(model, inputs, out)).all(), what
        loaded += 1
    assert refused > CASES // 2
