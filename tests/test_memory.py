"""peftkit.memory_report: the components add up to the measured peak; the live-allocation probe is exact."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.memory import LiveMemory, memory_report, weight_bytes


def _llama(hidden: int = 128, vocab: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def _batch(vocab: int = 512, rows: int = 4, length: int = 64) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, : length // 3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_live_memory_follows_allocations_and_frees():
    with LiveMemory() as mem:
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(500, dtype=torch.float64)
        view = a.view(10, 100).t()  # a view allocates nothing
        del b
        c = torch.empty(250, dtype=torch.float32)
        del view, a, c
        torch.empty(1)
    assert mem.peak == 4000 + 4000
    assert mem.current == 4  # the last tensor: freed storages are swept at each op, this one at the next

@pytest.mark.parametrize("chunked", [True, False])
def test_estimate_within_ten_percent_of_the_measured_peak(chunked):
    model = _llama()
    peftkit.attach(model, peftkit.LoRA(r=8, target_modules="all-linear"))
    r = memory_report(model, _batch(), measure=True, chunked_loss=chunked)
    assert r.activations > r.weights / 2 and r.loss_working_set > 0
    assert abs(r.estimated_peak - r.measured_peak) / r.measured_peak < 0.10
    assert "| activations |" in r.markdown() and "measured peak" in r.markdown()


def test_components_weights_gradients_optimizer():
    model = _llama()
    peftkit.attach(model, peftkit.LoRA(r=8, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    total, _ = weight_bytes(model)
    assert total == sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    batch = _batch()
    r = memory_report(model, batch)
    assert r.gradients == 4 * n and r.optimizer_state == 8 * n and not r.optimizer_measured
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    model(**batch).loss.backward()
    opt.step()
    r = memory_report(model, batch, optimizer=opt)
    assert r.optimizer_measured and 8 * n <= r.optimizer_state <= 8 * n + 8 * len(trainable)


def test_quantized_weights_count_at_their_real_size():
    pytest.importorskip("torchao")
    from peftkit import quant

    model = _llama()
    before, _ = weight_bytes(model)
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    quant.quantize(model, "nf4")
    after, _ = weight_bytes(model)
    saved = before - after
    assert 4 * linear * 0.85 < saved < 4 * linear * (1 - 4 / 32)  # 32 bits -> ~4.1 bits per quantized weight


def test_train_report_has_a_memory_section(tmp_path):
    from peftkit.train import TrainConfig, train

    model = _llama(hidden=32, vocab=96)
    peftkit.attach(model, peftkit.LoRA(r=2, target_modules=["q_proj"]))
    ids = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    metrics = train(model, TrainConfig(output=str(tmp_path), max_steps=2, batch_size=4, progress=False), examples)
    assert metrics["memory"]["activations"] > 0
    text = (tmp_path / "report.md").read_text()
    assert "## Memory" in text and "| estimated peak |" in text
