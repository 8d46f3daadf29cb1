"""peft parity cases: one row per (method, model, options), run by ``tests/test_parity.py``.

Each case gives a peft config and the equivalent peftkit config. The suite checks, for every
case: a peft-trained adapter (random non-zero weights) saved with ``save_pretrained`` loads in
peftkit with the same outputs, and peftkit's Hugging Face export of a randomised adapter loads
in ``peft.PeftModel`` with the same outputs. Adding a method with a peft form = adding rows here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peftkit


@dataclass
class ParityCase:
    id: str
    model: str  # a key of tests.models.MODELS
    peft: Callable[[], Any]  # () -> peft config
    ours: Callable[[], Any] | None  # () -> peftkit config (None: only the peft → peftkit direction)
    atol: float = 1e-5


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(init_lora_weights=False, **kw)


def _ours_lora(kw: dict[str, Any], cls=peftkit.LoRA):
    return cls(r=kw["r"], alpha=kw["lora_alpha"], use_rslora=kw.get("use_rslora", False),
               target_modules=kw["target_modules"], rank_pattern=kw.get("rank_pattern", {}),
               alpha_pattern=kw.get("alpha_pattern", {}))


_LORA = [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])),
    ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "embed_tokens"],
                   rank_pattern={"k_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 5})),
    ("gpt2", dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"])),
    ("bert", dict(r=4, lora_alpha=16, target_modules=["query", "value", "output.dense"])),
    ("cnn", dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "seq", "fc"])),
]


def _cases() -> list[ParityCase]:
    from peft import IA3Config, LNTuningConfig, OFTConfig

    out = [ParityCase(f"lora-{arch}-{i}", arch, lambda kw=kw: _lora(**kw), lambda kw=kw: _ours_lora(kw))
           for i, (arch, kw) in enumerate(_LORA)]
    out.append(ParityCase("lora-gpt2-fan-in-fan-out", "gpt2",
                          lambda: _lora(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True), None))
    dora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    out.append(ParityCase("dora-llama", "llama", lambda: _lora(use_dora=True, **dora),
                          lambda: _ours_lora(dora, peftkit.DoRA), atol=1e-4))
    out.append(ParityCase("ia3-llama", "llama",
                          lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                            feedforward_modules=["down_proj"], init_ia3_weights=False),
                          lambda: peftkit.IA3(target_modules=["k_proj", "v_proj", "down_proj"],
                                              feedforward_modules=["down_proj"])))
    out.append(ParityCase("ia3-bert", "bert",
                          lambda: IA3Config(target_modules=["key", "value", "output.dense"],
                                            feedforward_modules=["output.dense"], init_ia3_weights=False), None))
    out.append(ParityCase("oft-llama", "llama",
                          lambda: OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj", "v_proj"], init_weights=False),
                          lambda: peftkit.OFT(oft_block_size=8, target_modules=["q_proj", "v_proj"]), atol=1e-4))
    out.append(ParityCase("ln-tuning-llama", "llama", lambda: LNTuningConfig(target_modules=["input_layernorm", "norm"]),
                          lambda: peftkit.LayerNormTuning(target_modules=["input_layernorm", "norm"])))
    return out


CASES = _cases()
