"""The command line as a new user meets it (issue 14) and its hostile-input cases (issue 12): exit codes, one-line
errors with the right hint, flag spellings, outputs, info/export/--version. Tiny local models only."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

import peftkit
from peftkit.cli.main import main

from .tiny_tokenizers import WORDS

LM_BASE = ["--task", "causal-lm", "--method", "lora", "--r", "4", "--batch-size", "4"]


def _run(capsys, argv):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip()


def _one_line(err):
    return len(err.splitlines()) == 1


def _cls_data(tmp_path, n=6):
    data = tmp_path / "cls.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{w} good movie\t1\n{w} bad movie\t0\n" for w in WORDS[:n]))
    return data


def _lm_run(llama_dir, lm_data, out, *flags):
    train, evald = lm_data
    return ["train", "--model", str(llama_dir), *LM_BASE, "--data", str(train), "--eval-data", str(evald),
            "--output", str(out), *flags]


# -- refusals: one line, exit 2, nothing written -----------------------------------------------------
@pytest.mark.parametrize("flags,expected", [
    (["--max-step", "2"], "unknown option --max-step (did you mean --max-steps"),
    (["--rnak", "2"], "--rank"),
    (["--lr", "0"], "--lr 0: the learning rate must be > 0"),
    (["--lr", "-1e-3"], "--lr -0.001: the learning rate must be > 0"),
    (["--alpha=-1"], "--alpha: '-1' is negative"),
    (["--epochs", "1", "--max-steps", "2"], "--epochs 1 and --max-steps 2 contradict each other"),
    (["--rank", "8"], "--r is given twice (as --rank too)"),
    (["--warmup", "-2"], "warmup: expected a number >= 0, got -2.0"),
])
def test_bad_flags_refused(llama_dir, lm_data, tmp_path, capsys, flags, expected):
    out = tmp_path / "never"
    rc, _, err = _run(capsys, _lm_run(llama_dir, lm_data, out, *flags))
    assert rc == 2 and _one_line(err) and expected in err, err
    assert not out.exists()


def test_flag_spellings_from_transformers_and_peft(llama_dir, lm_data, tmp_path, capsys):
    """Underscores as dashes, --learning-rate / --learning_rate, --lora-alpha, --lora-dropout, --rank."""
    train, _ = lm_data
    out = tmp_path / "run"
    rc, _, err = _run(capsys, ["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", "lora",
                               "--rank", "2", "--lora_alpha", "4", "--lora-dropout", "0.1", "--target_modules", "q_proj",
                               "--data", str(train), "--output", str(out), "--max_steps", "1", "--learning_rate", "1e-3",
                               "--batch_size", "4"])
    assert rc == 0, err
    meta = json.loads((out / "adapter" / "peftkit_adapter.json").read_text())
    assert (meta["config"]["r"], meta["config"]["alpha"], meta["config"]["dropout"]) == (2, 4, 0.1)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1
    assert "| lr | 0.001 |" in (out / "report.md").read_text()


def test_yaml_errors_and_numeric_strings(llama_dir, lm_data, tmp_path, capsys):
    train, _ = lm_data
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\ntask: causal-lm\n  lr: [1e-3\n")
    rc, _, err = _run(capsys, ["train", str(bad)])
    assert rc == 2 and _one_line(err) and f"{bad}:3:" in err and "invalid YAML" in err, err
    listed = tmp_path / "list.yaml"
    listed.write_text("- model: x\n- task: y\n")
    rc, _, err = _run(capsys, ["train", str(listed)])
    assert rc == 2 and _one_line(err) and "expected a mapping" in err and "found a list" in err, err
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"model: {llama_dir}\ntask: causal-lm\nmethod: lora\ndata: {train}\noutput: {tmp_path / 'o'}\n"
                    "max_step: 3\n")
    rc, _, err = _run(capsys, ["train", str(typo)])
    assert rc == 2 and "did you mean --max-steps" in err, err
    good = tmp_path / "good.yaml"  # PyYAML reads 1e-3 and "2" as strings: parsed for numeric fields
    good.write_text(f"model: {llama_dir}\ntask: causal-lm\nmethod: lora\nr: '2'\ndata: {train}\n"
                    f"output: {tmp_path / 'g'}\nlr: 1e-3\nmax_steps: '2'\nbatch-size: 4\nlearning_rate_typo: 1\n")
    rc, _, err = _run(capsys, ["train", str(good)])
    assert rc == 2 and "unknown option --learning-rate-typo" in err
    good.write_text(good.read_text().replace("learning_rate_typo: 1\n", ""))
    rc, _, err = _run(capsys, ["train", str(good)])
    assert rc == 0, err
    metrics = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert metrics["steps"] == 2
    notnum = tmp_path / "nn.yaml"
    notnum.write_text(good.read_text().replace("lr: 1e-3", "lr: fast"))
    rc, _, err = _run(capsys, ["train", str(notnum)])
    assert rc == 2 and "lr: 'fast' is not a number" in err


def test_output_folder_checks(llama_dir, lm_data, tmp_path, capsys):
    """A file, a read-only folder, a non-empty folder: refused before the model loads; --overwrite clears it."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, _, err = _run(capsys, _lm_run(llama_dir, lm_data, a_file, "--max-steps", "1"))
    assert rc == 2 and _one_line(err) and "is a file" in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        rc, _, err = _run(capsys, _lm_run(llama_dir, lm_data, ro / "sub", "--max-steps", "1"))
        assert rc == 2 and "not writable" in err
    out = tmp_path / "run"
    assert main(_lm_run(llama_dir, lm_data, out, "--max-steps", "2", "--save-every", "1")) == 0
    capsys.readouterr()
    stale = out / "stale.txt"
    stale.write_text("old run")
    rc, _, err = _run(capsys, _lm_run(llama_dir, lm_data, out, "--max-steps", "1"))
    assert rc == 2 and _one_line(err) and "is not empty" in err and "--overwrite" in err and "--resume" in err
    rc, _, err = _run(capsys, _lm_run(llama_dir, lm_data, out, "--max-steps", "1", "--overwrite", "--resume"))
    assert rc == 2 and "give one of them" in err
    rc, _, err = _run(capsys, _lm_run(llama_dir, lm_data, out, "--max-steps", "1", "--overwrite"))
    assert rc == 0, err
    assert not stale.exists() and not (out / "checkpoint").exists()  # cleared: no old checkpoint left to resume
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1


def test_ctrl_c_exits_130_with_checkpoint(llama_dir, lm_data, tmp_path, capsys, monkeypatch):
    from peftkit.train import loop

    original = loop._Run.after_step

    def interrupt(self, logs):
        original(self, logs)
        if self.s["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop._Run, "after_step", interrupt)
    out = tmp_path / "run"
    rc, _, err = _run(capsys, _lm_run(llama_dir, lm_data, out, "--max-steps", "4"))
    assert rc == 130
    assert "interrupted: checkpoint saved" in err
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    monkeypatch.undo()
    rc, _, err = _run(capsys, _lm_run(llama_dir, lm_data, out, "--max-steps", "4", "--resume"))
    assert rc == 0, err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_corrupt_task_records_and_zero_eval_rows(llama_dir, lm_data, tmp_path, capsys):
    train, evald = lm_data
    out = tmp_path / "run"
    assert main(_lm_run(llama_dir, lm_data, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    task = out / "adapter" / "peftkit_task.json"
    for text, expected in (("{not json", "corrupt task record, not valid JSON (line 1"),
                           ("[1, 2]", "expected a JSON object, found list"),
                           (json.dumps({"model": "m"}), "has no 'task'"),
                           (json.dumps({"task": "causal-lm"}), "has no 'model'")):
        task.write_text(text)
        for argv in (["eval", str(out / "adapter"), "--data", str(evald)],
                     ["generate", "--adapter", str(out / "adapter"), "--prompt", "x"]):
            rc, _, err = _run(capsys, argv)
            assert rc == 2 and _one_line(err) and expected in err, (argv, err)
    long = tmp_path / "long.jsonl"  # every completion is cut off by --max-length: no eval row is left
    long.write_text(json.dumps({"prompt": " ".join(WORDS[:30]), "completion": "hello"}) + "\n")
    rc, _, err = _run(capsys, ["train", "--model", str(llama_dir), *LM_BASE, "--data", str(train), "--eval-data",
                               str(long), "--output", str(tmp_path / "e"), "--max-steps", "1", "--max-length", "12"])
    assert rc == 2 and "no usable eval rows" in err, err
    assert not (tmp_path / "e").exists()
    rc, _, err = _run(capsys, ["eval", "--model", str(llama_dir), "--task", "causal-lm", "--data", str(long),
                               "--max-length", "12"])
    assert rc == 2 and "no usable eval rows" in err, err


def test_generate_refuses_a_classification_adapter_and_eval_is_quiet(bert_dir, tmp_path, capfd):
    data = _cls_data(tmp_path)
    out = tmp_path / "cls"
    assert main(["train", "--model", str(bert_dir), "--task", "classification", "--method", "lora", "--r", "2",
                 "--data", str(data), "--eval-data", str(data), "--output", str(out), "--max-steps", "2"]) == 0
    capfd.readouterr()
    assert main(["generate", "--adapter", str(out / "adapter"), "--prompt", "hello"]) == 2
    err = capfd.readouterr().err.strip()
    assert _one_line(err) and "is a classification adapter" in err and "peftkit eval" in err
    # the head is restored by peftkit: transformers' "newly initialized" warning and load report are silenced
    assert main(["eval", str(out / "adapter"), "--data", str(data)]) == 0
    cap = capfd.readouterr()
    assert "eval_accuracy" in cap.out
    assert "newly initialized" not in cap.err and "LOAD REPORT" not in cap.err and "MISMATCH" not in cap.err


def test_classification_defaults_and_columns_hint(bert_dir, tmp_path, capsys):
    """The task's defaults apply (head lr, eval each epoch, best adapter kept); a missing text column hints --columns."""
    data = tmp_path / "s.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{w} good\t1\n{w} bad\t0\n" for w in WORDS[:4]))
    rc, _, err = _run(capsys, ["train", "--model", str(bert_dir), "--task", "classification", "--method", "lora",
                               "--data", str(data), "--output", str(tmp_path / "x")])
    assert rc == 2 and _one_line(err) and "--columns text=sentence" in err, err
    out = tmp_path / "run"
    rc, stdout, err = _run(capsys, ["train", "--model", str(bert_dir), "--task", "classification", "--method", "lora",
                                    "--r", "2", "--data", str(data), "--eval-data", str(data), "--columns",
                                    "text=sentence", "--output", str(out), "--batch-size", "4"])
    assert rc == 0, err
    report = (out / "report.md").read_text()
    defaults = peftkit.tasks.TASK_DEFAULTS["classification"]
    assert f"| head_lr | {defaults['head_lr']:.4g} |" in report and f"| lr | {defaults['lr']:.4g} |" in report
    evals = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_" in line]
    assert evals == [2 * (e + 1) for e in range(defaults["epochs"])]  # 8 rows, batch 4: 2 steps per epoch
    assert "metric: eval_accuracy" not in stdout and "eval_accuracy" in stdout


def test_report_has_exact_match_and_curves_mark_single_points(llama_dir, lm_data, tmp_path):
    out = tmp_path / "run"
    assert main(_lm_run(llama_dir, lm_data, out, "--max-steps", "1", "--exact-match", "2", "--max-new-tokens",
                        "2")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"| eval_exact_match | {metrics['eval_exact_match']:.4g} |" in (out / "report.md").read_text()
    plt = pytest.importorskip("matplotlib.pyplot")
    from peftkit.train.report import curves_figure

    fig = curves_figure(plt, [{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 2.1}], "eval_loss")
    assert [line.get_marker() for line in fig.axes[0].lines] == ["o", "o"]
    fig = curves_figure(plt, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}], "eval_loss")
    assert fig.axes[0].lines[0].get_marker() in (None, "None", "")


def test_info_validates_files_accepts_a_file_and_full_outputs(llama_dir, bert_dir, lm_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_lm_run(llama_dir, lm_data, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    rc, stdout, _ = _run(capsys, ["info", str(out / "adapter" / "adapter.safetensors")])
    assert rc == 0 and " lora " in stdout and "causal-lm" in stdout
    # the HF format exported from it says lora too (peft writes LORA)
    rc, stdout, err = _run(capsys, ["export", str(out / "adapter"), "--format", "hf", str(tmp_path / "hf")])
    assert rc == 0, err
    rc, stdout, _ = _run(capsys, ["info", str(tmp_path / "hf")])
    assert rc == 0 and "hf peft" in stdout and " lora " in stdout and "LORA" not in stdout
    weights = out / "adapter" / "adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])  # truncated
    rc, _, err = _run(capsys, ["info", str(out / "adapter")])
    assert rc == 2 and _one_line(err) and "truncated" in err and "adapter.safetensors" in err
    weights.write_bytes(b"\xff" * 4)
    rc, _, err = _run(capsys, ["info", str(out / "adapter")])
    assert rc == 2 and "too short" in err
    rc, _, err = _run(capsys, ["info", str(tmp_path / "nowhere" / "adapter.safetensors")])
    assert rc == 2 and "does not exist" in err
    full = tmp_path / "full"
    data_file = _cls_data(tmp_path)
    assert main(["train", "--model", str(bert_dir), "--task", "classification", "--method", "full", "--data",
                 str(data_file), "--output", str(full), "--max-steps", "1", "--batch-size", "4"]) == 0
    capsys.readouterr()
    rc, stdout, _ = _run(capsys, ["info", str(full / "adapter")])
    assert rc == 0 and "full fine-tuning" in stdout and "classification" in stdout


def test_export_hf_loads_in_peft_with_the_same_outputs(llama_dir, lm_data, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(_lm_run(llama_dir, lm_data, out, "--max-steps", "2", "--lr", "1e-2")) == 0
    rc, _, err = _run(capsys, ["export", str(out / "adapter"), "--format", "hff", str(tmp_path / "x")])
    assert rc == 2 and "did you mean 'hf'" in err
    rc, _, err = _run(capsys, ["export", str(out / "adapter"), str(tmp_path / "hf")])
    assert rc == 0, err
    assert (tmp_path / "hf" / "adapter_config.json").is_file()
    ids = torch.tensor([[1, 5, 9, 3]])
    ours = AutoModelForCausalLM.from_pretrained(llama_dir)
    peftkit.load(ours, out / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
    rc, _, err = _run(capsys, ["export", str(out / "adapter"), str(tmp_path / "hf")])
    assert rc == 2 and "not an empty directory" in err


def test_version_and_help():
    run = subprocess.run([sys.executable, "-m", "peftkit.cli.main", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"peftkit {peftkit.__version__}"
    run = subprocess.run([sys.executable, "-m", "peftkit.cli.main", "train", "--help"], capture_output=True, text=True)
    text = " ".join(run.stdout.split())
    assert "fraction of the optimizer steps when below 1" in text and "--learning-rate" in text
    assert "--overwrite" in text and "--head-lr" in text


def test_oft_trains_with_its_default_block_size(llama_dir, lm_data, tmp_path, capsys):
    train, _ = lm_data
    out = tmp_path / "oft"
    rc, _, err = _run(capsys, ["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", "oft",
                               "--target-modules", "q_proj", "--data", str(train), "--output", str(out),
                               "--max-steps", "1", "--batch-size", "4"])
    assert rc == 0, err
    meta = json.loads((out / "adapter" / "peftkit_adapter.json").read_text())
    assert meta["config"]["oft_block_size"] == 32 and meta["config"]["r"] is None


def test_resume_from_a_damaged_checkpoint_is_one_line(llama_dir, lm_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_lm_run(llama_dir, lm_data, out, "--max-steps", "2", "--save-every", "1")) == 0
    capsys.readouterr()
    state_file = out / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    state["rng"]["python"] = "garbage"
    state_file.write_text(json.dumps(state))
    rc, _, err = _run(capsys, _lm_run(llama_dir, lm_data, out, "--max-steps", "2", "--save-every", "1", "--resume"))
    assert rc == 2 and _one_line(err) and "state.json: the saved random-number-generator state is unusable" in err
