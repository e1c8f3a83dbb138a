"""Preference pairs: a prompt, a chosen reply and a rejected one, as TRL's explicit-prompt formats hold them.

* text: `prompt`, `chosen`, `rejected` strings; the replies get the tokenizer's end-of-sequence token
  (unless they end with it), the prompt the tokenizer's own special tokens (its BOS), as TRL does;
* chat: `prompt` a list of `{role, content}` messages (system, user, assistant turns before the reply,
  ending with the user), `chosen` and `rejected` each a list with the assistant's reply; rendered with
  the model's own chat template (the prompt with the generation prompt), the loss on the reply's tokens.

Read from the files SFT data is read from (`.json`, `.jsonl`, `.parquet`, `.arrow`, a `datasets` folder);
every problem is a `DataError` naming the file and the line, item or row: a missing or empty field, a
chosen reply equal to the rejected one. Tokenizing follows TRL's `DPOTrainer`: the reply starts where the
tokens of the prompt alone and of prompt + reply diverge; a pair longer than `cutoff_len` keeps its start
(the prompt) and loses the end of its replies, and is counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdora.data.records import PAIR_FIELDS, ROLES, DataError, read_rows

FIELDS = PAIR_FIELDS


@dataclass(frozen=True)
class Pair:
    """One preference pair. `chat`: the prompt is messages and each reply one assistant message."""

    prompt: str | tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    source: str = ""

    @property
    def chat(self) -> bool:
        return not isinstance(self.prompt, str)


def _reply(obj: Mapping[str, Any], name: str, where: str, chat: bool) -> str:
    value = obj[name]
    if chat:
        if isinstance(value, str):
            raise DataError(f"{where}: field {name!r} is a string but 'prompt' is messages; give the reply as "
                            f"[{{\"role\": \"assistant\", \"content\": ...}}]")
        if not isinstance(value, (list, tuple)) or len(value) != 1 or not isinstance(value[0], Mapping) \
                or value[0].get("role") != "assistant" or not isinstance(value[0].get("content"), str):
            raise DataError(f"{where}: field {name!r} must be one assistant message, "
                            "[{\"role\": \"assistant\", \"content\": ...}]")
        value = value[0]["content"]
    elif not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string (the prompt is a string), "
                        f"got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty: a pair needs two replies to compare")
    return value


def parse_pair(obj: Any, where: str = "<pair>") -> Pair:
    """One decoded JSON object (or table row) as a `Pair`, every field checked."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object with prompt, chosen, rejected")
    missing = [f for f in FIELDS if f not in obj or obj[f] is None]
    if missing:
        has = ", ".join(obj) or "no fields"
        raise DataError(f"{where}: field {missing[0]!r} is missing (the record has: {has}); a preference pair has "
                        "prompt, chosen, rejected (text, or chat messages)")
    prompt = obj["prompt"]
    chat = not isinstance(prompt, str)
    if chat:
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise DataError(f"{where}: field 'prompt' must be a string or a non-empty list of messages")
        turns = []
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: prompt[{i}] must be {{role, content}} with a role of {', '.join(ROLES)}")
            turns.append((m["role"], m["content"]))
        if turns[-1][0] != "user":
            raise DataError(f"{where}: the prompt's last message is {turns[-1][0]!r}; it must be the user's, which "
                            "the replies answer")
        prompt = tuple(turns)
    chosen, rejected = _reply(obj, "chosen", where, chat), _reply(obj, "rejected", where, chat)
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same reply: the pair prefers nothing")
    return Pair(prompt, chosen, rejected, where)


def load_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a data file or `datasets` folder (`DataError` on any problem)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = list(read_rows(path))
    if rows and not is_pair(rows[0][1]):  # SFT data, one line before anything else
        has = ", ".join(rows[0][1]) if isinstance(rows[0][1], Mapping) else type(rows[0][1]).__name__
        raise DataError(f"{path}: preference training needs preference pairs (prompt, chosen, rejected), and this "
                        f"data has none ({rows[0][0]} has: {has}); train it with --objective sft")
    pairs = [parse_pair(obj, where) for where, obj in rows]
    if not pairs:
        raise DataError(f"{path}: contains no pairs")
    if len({p.chat for p in pairs}) > 1:
        first = next(p for p in pairs if p.chat != pairs[0].chat)
        raise DataError(f"{path}: mixes text and chat pairs ({pairs[0].source} and {first.source}); keep one per file")
    return pairs


def is_pair(obj: Any) -> bool:
    """Whether a decoded record has a preference pair's fields."""
    return isinstance(obj, Mapping) and all(f in obj for f in FIELDS)


def has_pairs(path: str | Path) -> bool:
    """Whether the first record of a data file is a preference pair."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return any(is_pair(obj) for _, obj in list(read_rows(path))[:1])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer, pair: Pair, cutoff_len: int | None = None) -> dict[str, Any]:
    """`{prompt_ids, chosen_ids, rejected_ids, truncated, length}`: the prompt's tokens and each reply's, as TRL's
    `DPOTrainer` tokenizes them; with `cutoff_len`, each sequence cut to it from the end (`truncated`: a
    sequence was cut; `length`: the longer sequence's tokens before the cut)."""
    if pair.chat:
        messages = [{"role": r, "content": c} for r, c in pair.prompt]

        def render(reply=None):
            if reply is None:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:
                text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                                     tokenize=False)
            return tokenizer(text, add_special_tokens=False).input_ids
        prompt, chosen, rejected = render(), render(pair.chosen), render(pair.rejected)
    else:
        eos = tokenizer.eos_token or ""

        def with_eos(reply: str) -> str:
            return reply if reply.endswith(eos) else reply + eos
        prompt = tokenizer(pair.prompt).input_ids
        chosen = tokenizer(pair.prompt + with_eos(pair.chosen)).input_ids
        rejected = tokenizer(pair.prompt + with_eos(pair.rejected)).input_ids
    start = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    out = {"prompt_ids": prompt[:start], "chosen_ids": chosen[start:], "rejected_ids": rejected[start:],
           "truncated": False, "length": max(len(chosen), len(rejected))}
    if cutoff_len is not None:
        room = max(0, cutoff_len - start)
        for key in ("chosen_ids", "rejected_ids"):
            if len(out[key]) > room:
                out[key], out["truncated"] = out[key][:room], True
    return out
