"""Prompt tuning (Lester, Al-Rfou and Constant, 2021, arXiv:2104.08691).

``n`` trainable virtual token embeddings ``P ∈ R^{n×d}`` are prepended to the input embeddings
of a frozen model:

    h_0 = [P; E(x)] ∈ R^{(n+L)×d},      E the model's input (word) embedding table

and the model runs unchanged on the longer sequence. Only ``P`` is trained; every weight of the
model, the embedding table included, is frozen. Nothing can be merged (there is no weight that
``P`` could be folded into) and rows cannot mix with other adapters in one batch (the sequence
length changes).

How it is wired (the conventions of Hugging Face PEFT 0.21.2, ``PeftModelFor*.forward``):

* the site is the model's input embedding (``model.get_input_embeddings()``); the adapter keeps
  ``P`` there, so it is saved and loaded like every other adapter;
* ``on_attach`` registers a forward pre-hook (``with_kwargs=True``) on the model passed to
  ``attach``. On the first step (no cache, or an empty one) it computes ``E(x)`` through the
  embedding site (so other adapters on the embedding still apply), passes
  ``inputs_embeds = [P; E(x)]`` instead of ``input_ids``, prepends ``-100`` to token-level
  ``labels`` (causal LM, token classification), and zeros to ``token_type_ids`` (classifiers;
  peft drops them for causal LMs and feature extraction). On every step it prepends ``n`` ones
  to a 2-D ``attention_mask`` and drops ``position_ids`` (peft: "position ids are not supported"),
  so positions run ``0..n+L-1`` from the cache length. With a KV cache (``generate``) the virtual
  tokens enter at the first step only and later steps only extend the mask.
* A sequence classifier pools the first position, which is then the first virtual token (as in
  peft). Causal LM logits include the ``n`` virtual positions (as in peft).
* The hook does nothing while the adapter is not active, is disabled (``peftkit.disabled``), or
  a mixed batch is running; ``on_detach`` removes it.

Initialisation (``prompt_tuning_init``): ``"RANDOM"`` draws ``P ~ N(0, 1)`` (peft's
``nn.Embedding`` default); ``"TEXT"`` copies the embedding rows of the tokenised
``prompt_tuning_init_text`` (or of ``init_token_ids``), repeated or truncated to ``n`` tokens;
``"SAMPLE_VOCAB"`` copies the rows of ``n`` random vocabulary ids.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig, one_of, positive_int
from ..core.errors import ConfigError, PeftkitError
from ..core.layers import EMBEDDING, layer_kind
from ..core.registry import register
from ..core.targets import INPUT_EMBEDDING
from ..formats.codec import HFCodec
from .model_hook import ModelHookAdapter

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
#: tasks whose labels are per token (peft prepends -100 for the virtual tokens)
_TOKEN_LABEL_TASKS = ("CAUSAL_LM", "TOKEN_CLS")
#: tasks for which peft prepends zeros to token_type_ids (for the others it drops them)
_KEEP_TOKEN_TYPE_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
#: embeddings that are never the input (word) embedding
_NOT_INPUT = ("wpe", "position_embeddings", "position_embedding", "token_type_embeddings", "embed_positions")
_FALLBACK_TARGET = r"re:(.*\.)?(embed_tokens|word_embeddings|wte|embed_in|tok_embeddings)"


class _InputEmbeddingDefaults(dict):
    """``model_type → [name of the input embedding]``, with a generic pattern for other families."""

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(key, [_FALLBACK_TARGET])


DEFAULT_TARGETS = _InputEmbeddingDefaults(INPUT_EMBEDDING)


@register
@dataclass
class PromptTuning(AdapterConfig):
    """``num_virtual_tokens`` trainable embeddings prepended to the input (peft's ``PromptTuningConfig``).

    ``prompt_tuning_init``: ``"RANDOM"`` (default), ``"TEXT"`` or ``"SAMPLE_VOCAB"`` (any case).
    TEXT takes its token ids from ``init_token_ids``, else from ``tokenizer`` (an object, not saved)
    applied to ``prompt_tuning_init_text``, else from ``AutoTokenizer.from_pretrained(tokenizer_name_or_path)``.
    ``task_type`` (peft's: ``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...) decides how labels and token type ids
    are extended; None infers it from the model class. ``target_modules`` defaults to the model's
    input embedding.
    """

    method: ClassVar[str] = "prompt_tuning"
    family: ClassVar[str] = "prompt"
    paper: ClassVar[str] = "Lester et al. 2021 (arXiv:2104.08691)"
    formula: ClassVar[str] = "model([P; E(x)]), virtual token embeddings P ∈ R^{n×d}; P"
    mergeable: ClassVar[bool] = False
    supported_layers: ClassVar[tuple[str, ...] | None] = (EMBEDDING,)
    default_targets: ClassVar[dict[str, list[str]]] = DEFAULT_TARGETS

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    init_token_ids: list[int] | None = None
    task_type: str | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)  # not saved

    def __post_init__(self) -> None:
        if isinstance(self.prompt_tuning_init, str):
            self.prompt_tuning_init = self.prompt_tuning_init.upper()
        if isinstance(self.task_type, str):
            self.task_type = self.task_type.upper()
        if self.tokenizer is not None and self.tokenizer_name_or_path is None:
            self.tokenizer_name_or_path = getattr(self.tokenizer, "name_or_path", None) or None
        if self.init_token_ids is not None and not isinstance(self.init_token_ids, list):
            self.init_token_ids = list(self.init_token_ids)

    def validate(self) -> None:
        owner = type(self).__name__
        positive_int(owner, "num_virtual_tokens", self.num_virtual_tokens)
        one_of(owner, "prompt_tuning_init", self.prompt_tuning_init, INITS)
        if self.task_type is not None:
            if self.task_type == "SEQ_2_SEQ_LM":
                raise ConfigError(f"{owner}: task_type='SEQ_2_SEQ_LM' (encoder-decoder models) is not supported")
            one_of(owner, "task_type", self.task_type, TASK_TYPES)
        if self.init_token_ids is not None:
            ids = self.init_token_ids
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError(f"{owner}: init_token_ids must be a non-empty list of token ids >= 0, got {ids!r}")
        if self.prompt_tuning_init == "TEXT" and self.init_token_ids is None:
            if not self.prompt_tuning_init_text:
                raise ConfigError(f"{owner}: prompt_tuning_init='TEXT' needs prompt_tuning_init_text (or init_token_ids), "
                                  f"got prompt_tuning_init_text={self.prompt_tuning_init_text!r}")
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ConfigError(f"{owner}: prompt_tuning_init='TEXT' needs a tokenizer to tokenise "
                                  f"{self.prompt_tuning_init_text!r}: pass tokenizer=..., tokenizer_name_or_path=... "
                                  "or init_token_ids=[...]")

    def check_layer(self, base: nn.Module, module_name: str) -> str | None:
        if layer_kind(base) != EMBEDDING:
            return (f"prompt tuning goes on the model's input embedding (model.get_input_embeddings()), "
                    f"not on a {type(base).__name__}")
        if module_name.rsplit(".", 1)[-1] in _NOT_INPUT:
            return "this is a position/token-type embedding, not the input embedding (model.get_input_embeddings())"
        ids = self.init_token_ids if self.prompt_tuning_init == "TEXT" else None
        if ids and max(ids) >= base.num_embeddings:
            return f"init_token_ids contains id {max(ids)}, outside the vocabulary of {base.num_embeddings} tokens"
        return None

    def check_model(self, model: nn.Module, module_names: list[str]) -> str | None:
        """A reason the targets do not fit: prompt tuning needs exactly the model's input embedding."""
        return _check_targets(model, [model.get_submodule(n) for n in module_names])

    def build(self, base: nn.Module, module_name: str) -> PromptEmbedding:
        return PromptEmbedding(copy.copy(self), base)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("tokenizer", None)
        return out

    # -- helpers -------------------------------------------------------------------------
    def text_token_ids(self) -> list[int]:
        """The token ids of the TEXT init, before repeating/truncating to ``num_virtual_tokens``."""
        if self.init_token_ids is not None:
            return list(self.init_token_ids)
        tok = self.tokenizer
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        ids = list(tok(self.prompt_tuning_init_text)["input_ids"])
        if not ids:
            raise ConfigError(f"PromptTuning: prompt_tuning_init_text={self.prompt_tuning_init_text!r} gives no tokens")
        return ids


def fit_token_ids(ids: list[int], n: int) -> list[int]:
    """peft's rule: truncate to ``n`` ids, or repeat the whole list until there are ``n``."""
    if len(ids) < n:
        ids = ids * math.ceil(n / len(ids))
    return ids[:n]


def _check_targets(model: nn.Module, bases: list[nn.Module]) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return f"{type(model).__name__} has no get_input_embeddings(); prompt tuning needs a transformers-style model"
    emb = get()
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "encoder-decoder models (peft's SEQ_2_SEQ_LM) are not supported by prompt tuning"
    if len(bases) != 1:
        return f"prompt tuning takes exactly one target, the input embedding; the targets match {len(bases)} modules"
    if bases[0] is not emb and getattr(emb, "base", None) is not bases[0]:
        return "the target is not the model's input embedding (model.get_input_embeddings())"
    return None


def infer_task_type(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def _model_facts(model: nn.Module) -> dict[str, Any]:
    """num_layers / num_attention_heads of the model, read as peft's ``_prepare_prompt_learning_config``."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def first(*names: str) -> Any:
        return next((getattr(text, n) for n in names if getattr(text, n, None) is not None), None)

    return {"num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
            "num_attention_heads": first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")}


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2]) if len(cache) and len(cache[0]) else 0
    return 0


class PromptEmbedding(ModelHookAdapter):
    """The virtual tokens ``prompt_embeddings`` ``(num_virtual_tokens, embedding_dim)`` and the model hook."""

    unmergeable_reason = "prompt tuning adds virtual tokens; there is no weight to fold into"
    label = "prompt tuning"

    def __init__(self, config: PromptTuning, base: nn.Module) -> None:
        super().__init__(config, base)
        n, d = config.num_virtual_tokens, base.embedding_dim
        self.num_virtual_tokens = n
        self.prompt_embeddings = nn.Parameter(torch.empty(n, d))
        self._init(config, base)
        config.token_dim = d  # exported to peft's adapter_config.json (not a config field)

    @torch.no_grad()
    def _init(self, config: PromptTuning, base: nn.Module) -> None:
        n = self.num_virtual_tokens
        nn.init.normal_(self.prompt_embeddings)  # RANDOM: N(0, 1), as peft's nn.Embedding
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, base.num_embeddings, (n,), dtype=torch.long).tolist()
        elif config.prompt_tuning_init == "TEXT":
            ids = fit_token_ids(config.text_token_ids(), n)
            config.init_token_ids = list(config.init_token_ids or ids)  # saved: reloading needs no tokenizer
        else:
            return
        rows = base.weight.detach()[torch.tensor(ids, device=base.weight.device)]
        self.prompt_embeddings.copy_(rows.float())

    # -- model hook ------------------------------------------------------------------------
    def on_attach(self, model: nn.Module, site: Any) -> None:
        cfg: PromptTuning = self.config
        if cfg.task_type is None:
            cfg.task_type = infer_task_type(model)
        cfg.__dict__.update(_model_facts(model))
        super().on_attach(model, site)

    def rewrite(self, model: nn.Module, kwargs: dict) -> tuple[tuple, dict] | None:
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else ids
        if ref is None:
            return None
        n, batch = self.num_virtual_tokens, ref.shape[0]
        task = self.config.task_type
        first = _cache_length(kwargs.get("cache", kwargs.get("past_key_values"))) == 0
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise PeftkitError("prompt tuning needs a 2-D attention_mask (batch, sequence); "
                                   f"got {getattr(mask, 'shape', type(mask).__name__)}")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if kwargs.get("position_ids") is not None:
            warnings.warn("Position ids are not supported for prompt tuning (as in peft). Ignoring position ids.",
                          stacklevel=2)
            kwargs["position_ids"] = None
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            if task not in _KEEP_TOKEN_TYPE_TASKS:
                warnings.warn("Token type ids are not supported for prompt tuning (as in peft). Ignoring token type ids",
                              stacklevel=2)
                kwargs["token_type_ids"] = None
            elif first:
                kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(batch, n), token_types], dim=1)
        if not first:
            return (), kwargs
        if embeds is None:
            embeds = self._site(ids)  # the embedding site: other adapters on it still apply
        prompts = self.prompt_embeddings.to(device=embeds.device, dtype=embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
        kwargs["input_ids"] = None
        labels = kwargs.get("labels")
        if labels is not None and task in _TOKEN_LABEL_TASKS and labels.dim() >= 2:
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        return (), kwargs

    def extra_repr(self) -> str:
        return f"method=prompt_tuning, num_virtual_tokens={self.num_virtual_tokens}"


# -- Hugging Face PEFT format ------------------------------------------------------------------
def prompt_tuning_to_hf(config: PromptTuning) -> dict[str, Any]:
    init = config.prompt_tuning_init
    if init == "TEXT" and not config.tokenizer_name_or_path:
        init = "RANDOM"  # peft refuses TEXT without a tokenizer path; the weights are in the file anyway
    return {
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": getattr(config, "token_dim", None),
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_layers": getattr(config, "num_layers", None),
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": config.prompt_tuning_init_text,
        "tokenizer_name_or_path": config.tokenizer_name_or_path,
        "tokenizer_kwargs": None,
        # peft's SEQ_CLS/TOKEN_CLS/QUESTION_ANS models expect a trained copy of the head in the file
        # (modules_to_save); peftkit keeps the head frozen, so those are written as FEATURE_EXTRACTION,
        # whose forward prepends the prompt the same way (it drops token_type_ids instead of extending them)
        "task_type": "FEATURE_EXTRACTION" if config.task_type in _KEEP_TOKEN_TYPE_TASKS else config.task_type,
        "modules_to_save": None,
    }


def prompt_tuning_from_hf(d: dict[str, Any]) -> PromptTuning:
    if (d.get("num_transformer_submodules") or 1) != 1 or d.get("task_type") == "SEQ_2_SEQ_LM":
        raise ConfigError("encoder-decoder prompt tuning (num_transformer_submodules=2, SEQ_2_SEQ_LM) is not supported")
    init = str(d.get("prompt_tuning_init") or "RANDOM").upper()
    return PromptTuning(
        num_virtual_tokens=int(d["num_virtual_tokens"]),
        # the weights come from the file: a TEXT init is not redone (it would need the tokenizer)
        prompt_tuning_init="RANDOM" if init == "TEXT" else init,
        prompt_tuning_init_text=d.get("prompt_tuning_init_text"),
        tokenizer_name_or_path=d.get("tokenizer_name_or_path"),
        # FEATURE_EXTRACTION may be peftkit's export of a classifier: infer the task from the model again
        task_type=None if d.get("task_type") in (None, "FEATURE_EXTRACTION") else d.get("task_type"),
    )


PromptTuning.hf_codec = HFCodec(
    peft_type="PROMPT_TUNING",
    config_to_hf=lambda c, targets: prompt_tuning_to_hf(c),
    config_from_hf=prompt_tuning_from_hf,
    read_names={"prompt_embeddings": "prompt_embeddings"},
    options=frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                       "num_layers", "modules_to_save", "prompt_tuning_init", "prompt_tuning_init_text",
                       "tokenizer_name_or_path", "tokenizer_kwargs"}),
    module_level=False,
)
