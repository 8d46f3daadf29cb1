"""`peftkit train --quantize nf4|int8 [--optimizer ...]` end to end on a tiny local Llama."""

from __future__ import annotations

import json

import pytest

from peftkit.cli.main import main

pytest.importorskip("torchao")


@pytest.mark.parametrize(("scheme", "method", "optimizer"), [("nf4", "lora", "lora-fa"), ("int8", "dora", "adamw")])
def test_train_on_a_quantized_base(llama_dir, lm_data, tmp_path, capsys, scheme, method, optimizer):
    train, evald = lm_data
    out = tmp_path / "run"
    rc = main(["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", method, "--r", "4",
               "--target-modules", "all-linear", "--data", str(train), "--eval-data", str(evald), "--output", str(out),
               "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--quantize", scheme, "--optimizer", optimizer])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["memory"]["weights"] > 0
    report = (out / "report.md").read_text()
    assert "## Memory" in report and f"| optimizer | {optimizer} |" in report
    assert (out / "adapter" / "adapter.safetensors").is_file()


def test_quantize_with_full_fine_tuning_is_refused(llama_dir, lm_data, tmp_path, capsys):
    train, _ = lm_data
    rc = main(["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", "full", "--data", str(train),
               "--output", str(tmp_path / "o"), "--quantize", "nf4"])
    assert rc == 2 and "--quantize needs an adapter method" in capsys.readouterr().err
