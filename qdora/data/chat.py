"""Chat records, rendered with the tokenizer's own chat template and supervised on the assistant turns.

The conversation is rendered once (`apply_chat_template(..., tokenize=False)`) and tokenized once,
with character offsets. Each assistant turn's characters are found in that text: the turn starts
where the conversation up to it, rendered with the generation prompt, ends, and it ends where the
conversation through it ends (its end-of-turn token included, trailing whitespace not), when the
template renders every prefix of the conversation as a prefix of the whole. Templates that do not
(some drop earlier turns' reasoning) fall back to rendering the conversation with the turn's text
replaced by a marker: what precedes and follows the marker frames the turn in the real text. A
token is trained on if its characters overlap an assistant turn. Nothing is tokenized twice, so
the labels agree with the tokens the model sees.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from pathlib import Path
from typing import Sequence

from jinja2 import TemplateError  # a dependency of transformers, which renders chat templates with it

from qdora.data.records import IGNORE_INDEX, DataError, Record


def set_chat_template(tokenizer, path: str | os.PathLike) -> str:
    """Give `tokenizer` the Jinja chat template in file `path`; returns the template."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--chat-template {file}: file not found (a Jinja chat template is expected)")
    try:
        template = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"--chat-template {file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if "messages" not in template:
        raise DataError(f"--chat-template {file}: does not read `messages`; is it a Jinja chat template?")
    tokenizer.chat_template = template
    return template


def check_chat_template(tokenizer, data: str) -> None:
    """Raise unless `tokenizer` has a chat template (chat records need one)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{data}: chat records are rendered with the tokenizer's chat template, and this tokenizer "
                        "has none; pass --chat-template FILE (a Jinja template, e.g. the one of the model's "
                        "instruct version)")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{data}: chat records need a fast tokenizer (its character offsets tell which tokens "
                        f"belong to the assistant); {type(tokenizer).__name__} is not one")


def _render(tokenizer, messages: Sequence[tuple[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, record: Record, text: str) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of `text` (the rendered conversation) holding assistant turns."""
    spans, cursor = [], 0
    for i, (role, content) in enumerate(record.messages):
        if role != "assistant":
            continue
        try:
            before = _render(tokenizer, record.messages[:i], generation_prompt=True) if i else None
            through = _render(tokenizer, record.messages[:i + 1]).rstrip()
        except Exception:  # a template that cannot render a prefix (jinja's own errors)
            before = through = None
        if before is not None and through is not None and text.startswith(before) and text.startswith(through) \
                and cursor <= len(before) < len(through):
            spans.append((len(before), len(through)))
            cursor = len(through)
            continue
        start, end = _rewritten_turn(tokenizer, record, i, text)
        if start < cursor:
            raise DataError(f"{record.source}: the chat template does not render assistant turn {i} (messages[{i}]) "
                            "where it can be found, so its tokens cannot be told apart; check the template")
        spans.append((start, end))
        cursor = end
    return spans


_SENTINEL = "\x00qdora-turn\x00"


def _rewritten_turn(tokenizer, record: Record, i: int, text: str) -> tuple[int, int]:
    """The span of assistant turn `i` in `text`, for a template that does not render prefixes of a
    conversation as prefixes of it (e.g. it drops earlier turns' reasoning): the conversation is
    rendered again with that turn's content replaced by a marker; what precedes and follows the
    marker there must frame the turn in `text`. The end-of-turn token is included when it follows."""
    messages = list(record.messages)
    messages[i] = ("assistant", _SENTINEL)
    try:
        marked = _render(tokenizer, messages)
    except Exception:  # jinja's own errors
        marked = ""
    if marked.count(_SENTINEL) != 1:
        raise DataError(f"{record.source}: the chat template does not show assistant turn {i} (messages[{i}]), so "
                        "its tokens cannot be found; check the template or the record")
    before, after = marked.split(_SENTINEL)
    if not (text.startswith(before) and text.endswith(after) and len(before) + len(after) <= len(text)):
        raise DataError(f"{record.source}: the chat template renders the turns around assistant turn {i} "
                        f"(messages[{i}]) differently depending on it, so its tokens cannot be found")
    start, end = len(before), len(text) - len(after)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and after.lstrip(" ").startswith(eos):
        end += len(after) - len(after.lstrip(" ")) + len(eos)
    return start, end


def tokenize_chat(tokenizer, record: Record, cutoff_len: int | None,
                  train_on_prompt: bool = False) -> dict[str, list[int]]:
    """Token ids and labels of a chat record: labels are the ids on assistant-turn tokens (on every
    token with `train_on_prompt`) and `IGNORE_INDEX` elsewhere; cut to `cutoff_len` from the right
    (`None`: whole)."""
    check_chat_template(tokenizer, record.source)
    try:
        text = _render(tokenizer, record.messages)
    except TemplateError as err:  # e.g. the template's raise_exception("... roles must alternate ...")
        roles = ", ".join(role for role, _ in record.messages)
        raise DataError(f"{record.source}: the chat template refuses this conversation (roles: {roles}): {err}; "
                        "change the record, or pass --chat-template FILE with a template that accepts it") from None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    spans = assistant_spans(tokenizer, record, text)
    ends = [end for _, end in spans]  # spans come in order and do not overlap: their ends are sorted too
    labels = []
    for token, (a, b) in zip(ids, offsets):
        # the first span that ends after the token starts: the token overlaps an assistant turn if
        # and only if it overlaps that one (every later span starts where that one ends or later)
        j = bisect_right(ends, a)
        inside = j < len(spans) and spans[j][0] < b
        labels.append(token if inside or train_on_prompt else IGNORE_INDEX)
    return {"input_ids": ids[:cutoff_len], "labels": labels[:cutoff_len]}
