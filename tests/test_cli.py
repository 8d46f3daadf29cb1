"""The ``peftkit`` command line on tiny local models: train → info → eval → generate, YAML configs, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peftkit.cli.main import main

from .models import tiny_bert
from .tiny_tokenizers import WORDS


def test_train_info_eval_generate_causal_lm(llama_dir, lm_data, tmp_path, capsys):
    train, evald = lm_data
    out = tmp_path / "run"
    rc = main(["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", "lora", "--r", "4", "--alpha", "8",
               "--target-modules", "q_proj,v_proj", "--data", str(train), "--eval-data", str(evald), "--output", str(out),
               "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--eval-every", "2"])
    assert rc == 0
    for f in ("metrics.json", "metrics.jsonl", "report.md", "adapter/adapter.safetensors", "adapter/peftkit_task.json"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and "eval_loss" in metrics
    assert metrics["trainable_params"] == 2 * 4 * ((32 + 32) + (32 + 16))  # 2 layers; q 32→32, v 32→16, r=4
    capsys.readouterr()
    assert main(["info", str(out / "adapter")]) == 0
    text = capsys.readouterr().out
    assert "lora" in text and "peftkit" in text and "causal-lm" in text
    assert main(["eval", str(out / "adapter"), "--data", str(evald)]) == 0
    text = capsys.readouterr().out
    assert "eval_loss" in text and "eval_perplexity" in text
    assert main(["generate", "--adapter", str(out / "adapter"), "--prompt", "what is hello", "--max-new-tokens", "3"]) == 0


def test_train_classification_from_yaml_with_flag_override(bert_dir, tmp_path, capsys):
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{w} good movie\tpositive\n{w} bad movie\tnegative\n" for w in WORDS[:10]))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {bert_dir}\ntask: classification\nmethod: lora\nr: 2\ntarget_modules: [query, value]\n"
                   f"data: {data}\neval_data: {data}\ncolumns: {{text: sentence}}\nmax_steps: 50\nbatch_size: 4\nlr: 0.01\n"
                   f"output: {tmp_path / 'ignored'}\n")
    out = tmp_path / "cls"
    assert main(["train", str(cfg), "--output", str(out), "--max-steps", "4", "--eval-every", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_macro_f1" in metrics
    assert not (tmp_path / "ignored").exists()
    task = json.loads((out / "adapter" / "peftkit_task.json").read_text())
    assert task["labels"] == ["negative", "positive"]
    capsys.readouterr()
    assert main(["eval", str(out / "adapter"), "--data", str(data)]) == 0
    assert "eval_accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("flags,expected", [
    (["--method", "lorra"], "did you mean 'lora'"),
    (["--method", "lora", "--rr", "4"], "did you mean --r"),
    (["--method", "lora", "--r", "four"], "--r: 'four' is not a valid int"),
    (["--method", "lora", "--task", "clasification"], "did you mean 'classification'"),
    (["--method", "lora", "--columns", "prompt=questoin"], "questoin"),
    (["--method", "lora", "--data", "missing.jsonl"], "missing.jsonl"),
    (["--method", "lora", "--prompt-format", "chatt"], "did you mean 'chat'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(llama_dir, lm_data, tmp_path, capsys, flags, expected):
    train, _ = lm_data
    out = tmp_path / "never"
    base = {"--model": str(llama_dir), "--task": "causal-lm", "--data": str(train), "--output": str(out)}
    args = ["train"]
    for k, v in base.items():
        if k not in flags:
            args += [k, v]
    args += [f if f != "missing.jsonl" else str(tmp_path / f) for f in flags]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "peftkit.cli.main", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "eval", "generate", "info", "demo"):
        assert cmd in out.stdout


def test_full_fine_tuning_for_comparison(bert_dir, tmp_path, capsys):
    data = tmp_path / "train.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{w} good movie\t1\n{w} bad movie\t0\n" for w in WORDS[:6]))
    out = tmp_path / "full"
    assert main(["train", "--model", str(bert_dir), "--task", "classification", "--method", "full", "--data", str(data),
                 "--eval-data", str(data), "--output", str(out), "--max-steps", "2", "--batch-size", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    model, _, _ = tiny_bert()
    n_params = sum(p.numel() for p in model.parameters()) - 32 - 1  # the saved 3-label head is resized to 2 labels
    assert metrics["trainable_params"] == n_params
    assert (out / "adapter" / "extra.safetensors").is_file() and not (out / "adapter" / "adapter.safetensors").exists()
    capsys.readouterr()
    assert main(["eval", str(out / "adapter"), "--data", str(data)]) == 0
    assert "eval_accuracy" in capsys.readouterr().out
    assert main(["train", "--model", str(bert_dir), "--task", "classification", "--method", "full", "--r", "4",
                 "--data", str(data), "--output", str(tmp_path / "never")]) == 2


def test_prompt_format_is_recorded_and_base_model_eval(llama_dir, lm_data, tmp_path, capsys):
    """A template prompt format is used in training, recorded with the adapter, and reused by eval and
    generate; ``peftkit eval`` without an adapter scores the base model (the "before" figure)."""
    train, evald = lm_data
    out = tmp_path / "run"
    fmt = "Q: {prompt}\nA:"
    assert main(["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", "lora", "--r", "4",
                 "--data", str(train), "--eval-data", str(evald), "--output", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--prompt-format", fmt, "--exact-match", "2", "--max-new-tokens", "3"]) == 0
    task = json.loads((out / "adapter" / "peftkit_task.json").read_text())
    assert task["prompt_format"] == fmt
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["eval_exact_match"] <= 1.0
    capsys.readouterr()
    assert main(["eval", str(out / "adapter"), "--data", str(evald), "--exact-match", "2", "--max-new-tokens", "2"]) == 0
    assert "eval_exact_match" in capsys.readouterr().out
    assert main(["eval", "--model", str(llama_dir), "--task", "causal-lm", "--data", str(evald),
                 "--prompt-format", "chat", "--exact-match", "2", "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert "eval_loss" in text and "eval_exact_match" in text
    assert main(["generate", "--adapter", str(out / "adapter"), "--prompt", "what is hello", "--max-new-tokens", "2"]) == 0
    assert main(["eval", "--data", str(evald)]) == 2
    assert "--model and --task" in capsys.readouterr().err


def test_eval_and_generate_an_adapter_written_by_peft(llama_dir, lm_data, tmp_path, capsys):
    """An adapter directory from `peft` (no peftkit task record) is scored with --model and --task, and gives
    the same loss as peft's own model."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.data import batches
    from peftkit.train import default_evaluate

    from .tiny_tokenizers import llama_tok

    _, evald = lm_data
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "hf")
    assert main(["eval", str(tmp_path / "hf"), "--data", str(evald)]) == 2
    assert "--model and --task causal-lm" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "hf"), "--model", str(llama_dir), "--task", "causal-lm", "--data", str(evald)]) == 0
    ours = float(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("eval_loss")).split()[1])
    from peftkit.data import load_records
    from peftkit.tasks import examples

    ex, _ = examples("causal-lm", load_records(evald), llama_tok(), 256)
    with torch.no_grad():
        want = default_evaluate(pm.eval(), batches(ex, 32, 0, shuffle=False, seed=0, bucket=False))["eval_loss"]
    assert ours == pytest.approx(want, abs=1e-4)
    assert main(["generate", "--adapter", str(tmp_path / "hf"), "--model", str(llama_dir), "--prompt", "what is",
                 "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_train_under_torchrun_two_processes(llama_dir, lm_data, tmp_path, fsdp):
    """`torchrun --nproc_per_node=2 -m peftkit.cli.main -- train ...` (DDP, or FSDP2 with --fsdp): rank 0 writes one
    adapter, which equals a single-process run on the same global batches (2 × 2 rows = 4 rows)."""
    import os

    import torch
    from safetensors.torch import load_file

    if fsdp:
        pytest.importorskip("torch.distributed.fsdp", reason="no FSDP")
    train, evald = lm_data
    common = ["--model", str(llama_dir), "--task", "causal-lm", "--method", "lora", "--r", "4", "--data", str(train),
              "--eval-data", str(evald), "--max-steps", "3", "--lr", "1e-2", "--seed", "3", "--exact-match", "2",
              "--max-new-tokens", "2"]
    dist_out = tmp_path / "dist"
    flags = ["--fsdp"] if fsdp else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "peftkit.cli.main", "--", "train", *common, "--batch-size", "2", "--output", str(dist_out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert main(["train", *common, "--batch-size", "4", "--output", str(tmp_path / "single")]) == 0
    got = load_file(dist_out / "adapter" / "adapter.safetensors")
    want = load_file(tmp_path / "single" / "adapter" / "adapter.safetensors")
    assert got.keys() == want.keys()
    for k in got:
        assert torch.allclose(got[k], want[k], atol=1e-5, rtol=0), k
    metrics = json.loads((dist_out / "metrics.json").read_text())
    assert "eval_exact_match" in metrics and (dist_out / "adapter" / "peftkit_task.json").is_file()
