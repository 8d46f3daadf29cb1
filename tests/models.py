"""Tiny random models for the unit tests: Llama, BERT, GPT-2 (transformers, built from configs) and a CNN.

Each factory returns ``(model, inputs, out)`` where ``inputs`` is the keyword dict to call the
model with and ``out(result)`` extracts the tensor to compare.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 96


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(seed + 1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, lambda r: r.logits


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(seed + 1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, lambda r: r.logits


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(seed + 1))
    return model, {"input_ids": ids}, lambda r: r.logits


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        h = self.seq(h.flatten(2)).mean(-1)
        return self.head(torch.relu(self.fc(h)))


def small_cnn(seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN().eval()
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(seed + 1))
    return model, {"x": x}, lambda r: r


def outputs(model, inputs, out):
    """The compared tensor of one forward pass without gradients."""
    with torch.no_grad():
        return out(model(**inputs))


MODELS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2, "cnn": small_cnn}
