"""`peftkit train --method svfit|sorsa|paca` and `peftkit info` on a tiny Llama (options from the config fields)."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.cli.main import main


@pytest.mark.parametrize("method, options", [
    ("svfit", ["--energy", "0.9"]),
    ("sorsa", ["--r", "2", "--gamma", "0.01"]),
    ("paca", ["--r", "3", "--seed", "1"]),
])
def test_train_and_info(method, options, llama_dir, lm_data, tmp_path, capsys):
    train, _ = lm_data
    out = tmp_path / method
    assert main(["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", method, *options,
                 "--data", str(train), "--output", str(out), "--max-steps", "2", "--batch-size", "4"]) == 0
    state = peftkit.read_adapters(out / "adapter")[0]
    assert state.method == method
    capsys.readouterr()
    assert main(["info", str(out / "adapter")]) == 0
    assert method in capsys.readouterr().out
