"""Prompt formats: how a prompt/completion pair is laid out for the model, in training and in generation alike.

* ``"plain"`` — the prompt, then the completion, exactly as written in the data (the prompt should end with
  whatever separates it from the answer, e.g. ``"...\\nAnswer:"``).
* ``"chat"`` — the pair becomes a two-turn conversation (``user``: prompt, ``assistant``: completion) rendered
  by the tokenizer's chat template; the natural choice for instruction-tuned models.
* a template holding ``{prompt}`` — e.g. ``"Question: {prompt}\\nAnswer: "``: the prompt is substituted in,
  the completion follows.

:func:`apply_prompt_format` rewrites records before :func:`~peftkit.data.build_causal_lm_examples`;
:func:`prompt_ids` gives the token ids generation starts from, identical to the prompt part of a training
example, so exact-match evaluation sees the model exactly as it was trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..core.errors import ConfigError, did_you_mean

PROMPT_FORMATS = ("plain", "chat")
PLACEHOLDER = "{prompt}"


def check_prompt_format(fmt: str | None, tokenizer: Any = None) -> str:
    """The format itself (``None`` → ``"plain"``) if valid, else :class:`ConfigError` naming it."""
    fmt = "plain" if fmt is None else fmt
    if not isinstance(fmt, str) or (fmt not in PROMPT_FORMATS and PLACEHOLDER not in fmt):
        raise ConfigError(f"prompt format {fmt!r} is neither one of {', '.join(PROMPT_FORMATS)} nor a template "
                          f"holding {PLACEHOLDER}{did_you_mean(str(fmt), PROMPT_FORMATS)}")
    if fmt == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("prompt format 'chat' needs a tokenizer with a chat template; this one has none "
                          f"(use 'plain' or a template such as 'Question: {PLACEHOLDER}\\nAnswer: ')")
    return fmt


def apply_prompt_format(records: Iterable[Mapping[str, Any]], fmt: str | None, prompt_col: str = "prompt",
                        completion_col: str = "completion", messages_col: str = "messages") -> list[dict[str, Any]]:
    """Records with the format applied to their prompt/completion pairs (chat records are left as they are)."""
    fmt = check_prompt_format(fmt)
    out = []
    for r in records:
        r = dict(r)
        if r.get(prompt_col) is not None and fmt != "plain":
            if fmt == "chat":
                prompt, completion = r.pop(prompt_col), r.pop(completion_col, None)
                r[messages_col] = [{"role": "user", "content": str(prompt)},
                                   {"role": "assistant", "content": "" if completion is None else str(completion)}]
            else:
                r[prompt_col] = fmt.replace(PLACEHOLDER, str(r[prompt_col]))
        out.append(r)
    return out


def prompt_ids(tokenizer: Any, prompts: list[str], fmt: str | None) -> list[list[int]]:
    """For each prompt, the token ids that generation starts from under ``fmt``: the prompt part of a training
    example, token for token."""
    from .causal import leading_special_ids, render_chat

    fmt = check_prompt_format(fmt)
    if fmt == "chat":
        return [render_chat(tokenizer, [{"role": "user", "content": p}], generation_prompt=True) for p in prompts]
    texts = prompts if fmt == "plain" else [fmt.replace(PLACEHOLDER, p) for p in prompts]
    prefix = leading_special_ids(tokenizer)
    return [prefix + list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
