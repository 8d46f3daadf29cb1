"""Causal-LM examples: prompt/completion pairs and chat conversations → ``input_ids`` and ``labels``.

The loss is taken only on what the model should learn to write: the completion (plus the end-of-sequence
token), or the assistant turns of a conversation. Every other position has the label ``-100``.

* Prompt/completion: the prompt is tokenized as the tokenizer does by default for one text, but only the
  *leading* special tokens are kept (a BOS, or BERT's ``[CLS]``); a trailing ``[SEP]`` never lands between
  prompt and completion. The completion is tokenized on its own, without special tokens, exactly as the
  model will see it when it generates after the prompt; then ``eos`` is appended (``[SEP]`` for
  tokenizers without an eos, nothing for tokenizers with neither).
* Chat ``messages``: the tokenizer's chat template renders the conversation. The assistant spans are found
  by rendering the conversation prefix by prefix (``messages[:i]`` with the generation prompt, then
  ``messages[:i+1]``) and comparing token prefixes, so whatever the template wraps around a turn is
  handled without knowing its markup.

Sequences longer than ``max_length`` keep their start (the prompt); an example with no trained token
left after truncation is dropped, and one :class:`DroppedExamplesWarning` says how many were.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.errors import ConfigError, did_you_mean

IGNORE_INDEX = -100


class DroppedExamplesWarning(UserWarning):
    """Some examples had no token left to train on after truncation to ``max_length``."""


def build_causal_lm_examples(records: Iterable[Mapping[str, Any]], tokenizer: Any, max_length: int,
                             prompt_col: str = "prompt", completion_col: str = "completion",
                             messages_col: str = "messages") -> list[dict[str, list[int]]]:
    """Tokenize prompt/completion or chat records into ``{"input_ids", "labels"}`` (plain lists of ints).

    Each record is either a prompt/completion pair (``prompt_col`` and ``completion_col``) or a chat
    (``messages_col``: a list of ``{"role", "content"}`` dicts, or that list as a JSON string); the two kinds
    may be mixed. ``labels`` is ``-100`` on the prompt (or non-assistant) tokens and equals ``input_ids``
    elsewhere.

    Raises:
        ConfigError: a record with neither schema (naming the missing column and the columns present), a
            non-text value, malformed messages, or chat data for a tokenizer without a chat template.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    records = list(records)
    pairs: list[int] = []
    chats: list[int] = []
    for i, r in enumerate(records):
        kind = _schema(r, i, prompt_col, completion_col, messages_col)
        (pairs if kind == "pair" else chats).append(i)
    built: dict[int, dict[str, list[int]] | None] = {}
    if pairs:
        prompts = [_text(records[i], prompt_col, i) for i in pairs]
        completions = [_text(records[i], completion_col, i) for i in pairs]
        prefix = leading_special_ids(tokenizer)
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
        end = _end_ids(tokenizer)
        for i, p, c in zip(pairs, p_ids, c_ids, strict=True):
            built[i] = _pair_example(prefix + list(p), list(c) + end, max_length)
    if chats:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"record {chats[0] + 1} is a chat ({messages_col!r} column) but the tokenizer has no chat "
                              "template; set tokenizer.chat_template, or use prompt/completion columns")
        for i in chats:
            built[i] = _chat_example(tokenizer, _messages(records[i], messages_col, i), max_length, i)
    examples = [built[i] for i in range(len(records)) if built[i] is not None]
    dropped = len(records) - len(examples)
    if dropped:
        warnings.warn(f"dropped {dropped} of {len(records)} examples: no completion/assistant token left within "
                      f"max_length={max_length} (the prompt alone fills it); raise max_length or shorten the prompts",
                      DroppedExamplesWarning, stacklevel=2)
    return examples


def _schema(r: Mapping[str, Any], i: int, prompt_col: str, completion_col: str, messages_col: str) -> str:
    if prompt_col in r and r[prompt_col] is not None:
        if completion_col not in r or r[completion_col] is None:
            others = [k for k in r if k != prompt_col]
            guess = did_you_mean(completion_col, others)
            if not guess and others:
                guess = (f"; map another column to it, e.g. columns={{{completion_col!r}: {others[0]!r}}} "
                         f"(CLI: --columns {prompt_col}=...,{completion_col}={others[0]})")
            raise ConfigError(f"record {i + 1} has a {prompt_col!r} column but no {completion_col!r} column{guess}; "
                              f"columns present: {_cols(r)}")
        return "pair"
    if messages_col in r and r[messages_col] is not None:
        return "chat"
    guess = did_you_mean(prompt_col, r) or did_you_mean(messages_col, r) or did_you_mean(completion_col, r)
    raise ConfigError(f"record {i + 1} has neither a {prompt_col!r} column (with {completion_col!r}) nor a "
                      f"{messages_col!r} column{guess}; columns present: {_cols(r)}. Rename columns, e.g. "
                      "columns={'prompt': 'question', 'completion': 'answer'} (CLI: --columns prompt=question,completion=answer)")


def _cols(r: Mapping[str, Any]) -> str:
    return ", ".join(repr(k) for k in r) or "(none)"


def _text(r: Mapping[str, Any], col: str, i: int) -> str:
    v = r[col]
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise ConfigError(f"record {i + 1}: column {col!r} must be text, got {type(v).__name__}")


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts *before* a single text by default (BOS, [CLS]); never trailing ones."""
    probe = "a"
    full = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    extra = len(full) - len(plain)
    k = 0
    while k < extra and full[k] in special:
        k += 1
    return full[:k]


def _end_ids(tokenizer: Any) -> list[int]:
    """Appended to every completion: eos, else sep (BERT-style vocabularies), else nothing."""
    for name in ("eos_token_id", "sep_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            return [tid]
    return []


def _pair_example(prompt: list[int], completion: list[int], max_length: int) -> dict[str, list[int]] | None:
    ids = (prompt + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def _messages(r: Mapping[str, Any], col: str, i: int) -> list[dict[str, Any]]:
    msgs = r[col]
    if isinstance(msgs, str):  # a chat stored as a JSON string in a CSV/TSV cell
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise ConfigError(f"record {i + 1}: column {col!r} is text but not a JSON list of messages") from None
    if not isinstance(msgs, list) or not msgs:
        raise ConfigError(f"record {i + 1}: column {col!r} must be a non-empty list of {{'role', 'content'}} messages")
    for j, m in enumerate(msgs):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            found = list(m) if isinstance(m, Mapping) else type(m).__name__
            raise ConfigError(f"record {i + 1}: message {j} must have 'role' and 'content' keys, found {found}")
    if not any(m["role"] == "assistant" for m in msgs):
        roles = sorted({str(m["role"]) for m in msgs})
        raise ConfigError(f"record {i + 1}: the conversation has no 'assistant' message to train on (roles: {roles})")
    return [dict(m) for m in msgs]


def render_chat(tokenizer: Any, msgs: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    # The template writes any BOS it wants itself: tokenizing with special tokens would add a second one.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _chat_example(tokenizer: Any, msgs: list[dict[str, Any]], max_length: int, i: int) -> dict[str, list[int]] | None:
    try:
        ids = render_chat(tokenizer, msgs, generation_prompt=False)
    except Exception as e:  # jinja errors raised by the template itself (e.g. "roles must alternate")
        raise ConfigError(f"record {i + 1}: the tokenizer's chat template failed on this conversation: {e}") from None
    labels = [IGNORE_INDEX] * len(ids)
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = _prefix_len(tokenizer, msgs[:j], ids)
        end = _common_prefix(ids, render_chat(tokenizer, msgs[: j + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def _prefix_len(tokenizer: Any, prefix: list[dict[str, Any]], full: list[int]) -> int:
    """Tokens of ``full`` before an assistant turn: the prefix rendered with the generation prompt (the
    ``<|assistant|>`` header is not trained on), falling back to the plain prefix when that fails."""
    if not prefix:
        return 0
    for gen in (True, False):
        try:
            return _common_prefix(full, render_chat(tokenizer, prefix, generation_prompt=gen))
        except Exception:  # some templates refuse a generation prompt after certain roles
            continue
    return 0
