"""Default target modules per model family (``config.model_type``), for every method, in one place.

When a config's ``target_modules`` is None, the method's table below gives the modules for the
model's family. The tables follow peft's defaults where peft has the method, so that an
adapter made with defaults in either library targets the same layers.
"""

from __future__ import annotations

from typing import Any

#: low-rank methods and OFT: the query and value projections (peft's LoRA mapping)
ATTENTION_QV: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "opt": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "vit": ["query", "value"],
}

#: IA3: keys, values and the feed-forward output (peft's IA3 mapping)
IA3_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

#: IA3: which of those are feed-forward layers (their input is scaled, not their output)
IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

#: LayerNorm tuning: the normalisation layers (peft's LN_TUNING mapping)
NORMS: dict[str, list[Any]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}

#: sparse fine-tuning: every linear layer but the head
ALL_LINEAR: dict[str, list[str]] = {
    family: ["all-linear"] for family in ("llama", "mistral", "qwen2", "gemma", "bert", "roberta", "gpt2", "opt", "t5", "vit")
}

#: bottleneck adapters, per placement: after attention and FFN outputs (Houlsby), after the FFN (Pfeiffer),
#: beside the FFN (parallel)
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
_BERT_FFN_OUT = r"re:.*layer\.\d+\.output\.dense"
_LLAMA = {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": ["mlp.down_proj"], "parallel": ["mlp"]}
_BERT = {"houlsby": ["attention.output.dense", _BERT_FFN_OUT], "pfeiffer": [_BERT_FFN_OUT],
         "parallel": ["intermediate.dense"]}
_GPT2 = {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"], "parallel": ["mlp"]}
_FAMILIES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gemma": _LLAMA,
             "bert": _BERT, "roberta": _BERT, "gpt2": _GPT2}
#: ``{placement: {model_type: [target patterns]}}``
BOTTLENECK_DEFAULT_TARGETS: dict[str, dict[str, list[str]]] = {
    p: {family: list(t[p]) for family, t in _FAMILIES.items()} for p in PLACEMENTS
}

#: prompt tuning: the input (word) embedding
INPUT_EMBEDDING_NAMES = {
    "embed_tokens": ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt", "olmo"),
    "word_embeddings": ("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert", "bloom",
                        "falcon"),
    "wte": ("gpt2", "gptj", "codegen"),
    "embed_in": ("gpt_neox",),
}

INPUT_EMBEDDING = {model_type: [name] for name, types in INPUT_EMBEDDING_NAMES.items() for model_type in types}


def table(name: str) -> dict[str, Any]:
    """A table by name: ``attention_qv``, ``ia3``, ``norms``, ``all_linear``, ``input_embedding``."""
    tables = {"attention_qv": ATTENTION_QV, "ia3": IA3_TARGETS, "norms": NORMS, "all_linear": ALL_LINEAR,
              "input_embedding": INPUT_EMBEDDING}
    return tables[name]

#: names of output-head modules (a task head trained in full or left alone, never the frozen body)
OUTPUT_HEADS = ("lm_head", "classifier", "score", "qa_outputs", "head", "cls")


def in_output_head(path: str) -> bool:
    """Whether the module or parameter ``path`` lies in an output head (any component named as one)."""
    return any(part in OUTPUT_HEADS for part in path.split("."))
