"""``peftkit train --method rosa|spiel|sara|hft`` and ``peftkit info`` on the tiny Llama: the schedules run in the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peftkit.cli.main import main

RUNS = {
    "rosa": ["--r", "2", "--density", "0.05", "--mask-warmup-steps", "1"],
    "spiel": ["--density", "0.05", "--update-every", "2", "--accumulation-steps", "1", "--drop-fraction", "0.5"],
    "sara": ["--quantile", "0.1", "--reselect-every", "2", "--nuclear-weight", "0.001"],
    "hft": ["--stage-steps", "1"],
}


@pytest.mark.parametrize("method", list(RUNS))
def test_train_and_info(method, llama_dir, lm_data, tmp_path, capsys):
    train, _ = lm_data
    out = tmp_path / "run"
    rc = main(["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", method, *RUNS[method],
               "--target-modules", "q_proj,v_proj", "--data", str(train), "--output", str(out),
               "--max-steps", "3", "--batch-size", "4", "--lr", "5e-2"])
    assert rc == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    tensors = load_file(out / "adapter" / "adapter.safetensors")
    if method == "rosa":  # the warm-up fixed the support (step 0) and the sparse values trained after it
        assert all(int(t) == 1 for k, t in tensors.items() if k.endswith("support_fixed"))
        assert all(torch.count_nonzero(t) > 0 for k, t in tensors.items() if k.endswith(".values"))
    capsys.readouterr()
    assert main(["info", str(out / "adapter")]) == 0
    assert method in capsys.readouterr().out
