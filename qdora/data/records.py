"""Training records: read from a file, their format detected (or named), checked field by field.

Formats, detected per record from its fields (or named with `format=`; `qdora train --format`):

* `chat`: `messages`, a list of `{role, content}` with roles system, user, assistant (multi-turn
  allowed, at least one assistant turn), rendered with the tokenizer's own chat template; the loss
  is on the assistant turns (`qdora.data.chat`);
* `prompt-completion`: `prompt`, `completion` (plain strings, joined as they are); loss on the completion;
* `text`: `text`; loss on every token;
* `alpaca` (Alpaca / LLM-Adapters): `instruction`, optional `input`, `output` (an extra `answer`
  field, the LLM-Adapters label, is kept as `Record.label`), wrapped in the Alpaca template;
* `gsm8k`: `question`, `answer` (the worked solution, ending in `#### <number>`), wrapped the same way.

One file holds one format (Alpaca and GSM8K records may be mixed: both use the Alpaca template).
Files: `.json` (an array of objects), `.jsonl` (an object per line, blank lines skipped),
`.parquet`, `.arrow` (a `datasets` Arrow file), or a folder written by `datasets`' `save_to_disk`
(nothing is fetched from a hub). Every problem is raised as `DataError`, naming the file, the line,
item or row (each counted from 1, as an editor counts lines), the field and what was expected.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

IGNORE_INDEX = -100
"""Label value that `torch.nn.functional.cross_entropy` ignores (prompt tokens and padding)."""
FORMATS = ("chat", "prompt-completion", "text", "alpaca", "gsm8k")
"""Record formats; `auto` (the default everywhere) detects each record's from its fields."""
ROLES = ("system", "user", "assistant")
SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".parquet", ".arrow")
ALPACA_FIELDS = ("instruction", "input", "output")
PAIR_FIELDS = ("prompt", "chosen", "rejected")
"""A preference pair's fields (`qdora.data.preference`): not a training record of these formats."""
GSM8K_FIELDS = ("question", "answer")
_FIELDS = {"chat": "messages (a list of {role, content})", "prompt-completion": "prompt, completion",
           "text": "text", "alpaca": "instruction, input (optional), output", "gsm8k": "question, answer"}
_EXPECTED = "expected one of: " + "; ".join(f"{fmt} ({fields})" for fmt, fields in _FIELDS.items())
_FAMILY = {"alpaca": "alpaca/gsm8k", "gsm8k": "alpaca/gsm8k"}

# LLM-Adapters' `generate_prompt` (the Alpaca template), verbatim.
_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


class DataError(ValueError):
    """A data file or record that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Record:
    """One training/evaluation example."""

    prompt: str
    """The prompt text (for alpaca/gsm8k with the template applied, ending in `### Response:\\n`);
    empty for `text` and `chat`."""
    response: str
    """The text the model is trained to produce after the prompt (all of a `text` record)."""
    label: str | None = None
    """The reference answer, for evaluation: LLM-Adapters' `answer` field, or GSM8K's final
    number (after `####`, thousands separators removed). None when the record has none."""
    source: str = ""
    """Where the record came from, e.g. `data.jsonl line 17`, `data.json item 3`, `data.parquet row 5`."""
    format: str = "alpaca"
    """One of `FORMATS`."""
    messages: tuple[tuple[str, str], ...] = ()
    """`chat`: the conversation as (role, content) pairs."""


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """LLM-Adapters' / Alpaca's prompt; the no-input variant when `input` is None or empty."""
    if input:
        return _PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return _PROMPT_NO_INPUT.format(instruction=instruction)


def gsm8k_label(answer: str) -> str | None:
    """The final answer of a GSM8K solution: the text after `####`, commas removed
    (`"... #### 1,000"` -> `"1000"`); None if there is no `####`."""
    match = _GSM8K_ANSWER.search(answer)
    return match.group(1).replace(",", "") if match else None


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, as users see it in their file."""
    names = {dict: "object", list: "array", tuple: "array", type(None): "null", bool: "bool", str: "string"}
    return names.get(type(value), type(value).__name__)


def _field(obj: Mapping[str, Any], name: str, where: str, fmt: str, *, required: bool = True,
           types: tuple[type, ...] = (str,)) -> Any:
    """`obj[name]`, checked for presence and type; errors name `where`, the field and the format."""
    if name not in obj or (not required and obj[name] is None):
        if not required:
            return None
        has = ", ".join(obj) or "no fields"
        raise DataError(f"{where}: field {name!r} is missing (the record has: {has}); the {fmt} format has "
                        f"{_FIELDS[fmt]}")
    value = obj[name]
    if not isinstance(value, types) or isinstance(value, bool):
        wanted = {(str,): "a string", (list, tuple): "a list"}.get(types, "a string or a number")
        raise DataError(f"{where}: field {name!r} must be {wanted}, got {_json_type(value)}")
    return value


def detect_format(obj: Mapping[str, Any]) -> str | None:
    """The format a record's fields say, or None."""
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "question" in obj:
        return "gsm8k"
    if "prompt" in obj or "completion" in obj:
        return "prompt-completion"
    if "text" in obj:
        return "text"
    return None


def _messages(obj: Mapping[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    messages = obj["messages"]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects, "
                        f"got {_json_type(messages) if messages else 'an empty list'}")
    turns = []
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, Mapping):
            raise DataError(f"{at} must be an object with 'role' and 'content', got {_json_type(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string, got {_json_type(content)}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at}: the assistant's content is empty, so there is nothing to learn from it; drop the "
                            "turn (with the user turn it answers) or the record")
        turns.append((role, content))
    roles = [role for role, _ in turns]
    if "assistant" not in roles:
        raise DataError(f"{where}: the chat has no assistant turn (roles: {', '.join(roles)}); there is nothing to "
                        "train on")
    dialogue = [(i, role) for i, role in enumerate(roles) if role != "system"]
    if dialogue[0][1] != "user":
        raise DataError(f"{where}: messages[{dialogue[0][0]}]: the conversation starts with the assistant (roles: "
                        f"{', '.join(roles)}); a chat starts with the user, after any system message")
    for (i, a), (j, b) in zip(dialogue, dialogue[1:]):
        if a == b:
            raise DataError(f"{where}: messages[{i}] and messages[{j}] are both {a!r} (roles: {', '.join(roles)}); "
                            "user and assistant turns must alternate: join the two into one message")
    return tuple(turns)


def parse_record(obj: Any, source: str = "<record>", format: str = "auto") -> Record:
    """Turn one decoded JSON object (or table row) into a `Record`. `format` names the record's
    format, or `auto` detects it from the fields. `source` names the record in errors."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{source}: expected a JSON object, got {_json_type(obj)}; {_EXPECTED}")
    if format == "auto" and all(f in obj for f in PAIR_FIELDS):
        raise DataError(f"{source}: holds preference pairs (prompt, chosen, rejected): train them with --objective "
                        "dpo or simpo")
    fmt = detect_format(obj) if format == "auto" else format
    if fmt is None:
        has = ", ".join(obj) or "no fields"
        raise DataError(f"{source}: unrecognised record (it has: {has}); {_EXPECTED}")
    if fmt not in FORMATS:
        raise DataError(f"format={fmt!r} is unknown; use auto or one of {', '.join(FORMATS)}")
    if fmt == "chat":
        _field(obj, "messages", source, fmt, types=(list, tuple))
        return Record(prompt="", response="", source=source, format=fmt, messages=_messages(obj, source))
    if fmt == "prompt-completion":
        completion = _field(obj, "completion", source, fmt)
        if not completion.strip():
            raise DataError(f"{source}: field 'completion' is empty, so there is nothing to learn from the record")
        return Record(prompt=_field(obj, "prompt", source, fmt), response=completion, source=source, format=fmt)
    if fmt == "text":
        text = _field(obj, "text", source, fmt)
        if not text.strip():
            raise DataError(f"{source}: field 'text' is empty")
        return Record(prompt="", response=text, source=source, format=fmt)
    if fmt == "alpaca":
        instruction = _field(obj, "instruction", source, fmt)
        input_text = _field(obj, "input", source, fmt, required=False)
        output = _field(obj, "output", source, fmt)
        answer = _field(obj, "answer", source, fmt, required=False, types=(str, int, float))
        return Record(prompt=alpaca_prompt(instruction, input_text), response=output,
                      label=None if answer is None else str(answer), source=source, format=fmt)
    question = _field(obj, "question", source, fmt)
    answer = _field(obj, "answer", source, fmt)
    return Record(prompt=alpaca_prompt(question), response=answer, label=gsm8k_label(answer), source=source,
                  format=fmt)


def load_records(path: str | Path, format: str = "auto") -> list[Record]:
    """Every record of a data file or `datasets` folder; `DataError` on any problem (see the module
    docstring). One file holds one format."""
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise DataError(f"format={format!r} is unknown; use auto or one of {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = read_rows(path)
    records = [parse_record(obj, where, format) for where, obj in rows]
    if not records:
        raise DataError(f"{path}: contains no records")
    first = records[0]
    for record in records[1:]:
        if _FAMILY.get(record.format, record.format) != _FAMILY.get(first.format, first.format):
            raise DataError(f"{path}: mixes record formats ({first.source} is {first.format}, {record.source} is "
                            f"{record.format}); keep one format per file")
    return records


def read_rows(path: Path) -> Iterable[tuple[str, Any]]:
    """(where, object) for every record of `path`, read whole before any is parsed."""
    if path.is_dir():
        return _table_rows(path, _load_datasets_folder(path))
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
                        f"supported: {', '.join(SUPPORTED_EXTENSIONS)}, or a datasets save_to_disk folder")
    if suffix in (".parquet", ".arrow"):
        return _table_rows(path, _load_table(path, suffix))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return _jsonl_rows(path, text) if suffix == ".jsonl" else _json_rows(path, text)


def _json_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from e
    if not isinstance(items, list):
        raise DataError(f"{path}: top-level JSON must be an array of records, "
                        f"got {_json_type(items)} (use .jsonl for one record per line)")
    return [(f"{path} item {i}", obj) for i, obj in enumerate(items, start=1)]


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}, column {e.colno}: invalid JSON: {e.msg}") from e
    return rows


def _pyarrow():
    try:
        import pyarrow  # optional: Parquet and Arrow files only
        return pyarrow
    except ImportError:
        raise DataError("reading Parquet or Arrow data needs pyarrow: pip install pyarrow") from None


def _load_table(path: Path, suffix: str):
    pa = _pyarrow()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # optional, with pyarrow
            return pq.read_table(path)
        with pa.memory_map(str(path)) as source:  # datasets writes the Arrow stream format
            try:
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:
        kind = "Parquet" if suffix == ".parquet" else "Arrow"
        raise DataError(f"{path}: cannot be read as {kind} ({err})") from None


def _load_datasets_folder(path: Path):
    """The table of a folder written by `datasets.Dataset.save_to_disk` (its Arrow files, in order)."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise DataError(f"{path}: a DatasetDict folder (splits: {', '.join(splits)}); pass one split's folder, "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    state = path / "state.json"
    if not state.is_file():
        raise DataError(f"{path}: a folder, but not one written by datasets' save_to_disk (no state.json); "
                        f"pass a data file ({', '.join(SUPPORTED_EXTENSIONS)}) or such a folder")
    pa = _pyarrow()
    try:
        files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{state}: unreadable ({err})") from None
    if not files:
        raise DataError(f"{path}: contains no records")
    return pa.concat_tables([_load_table(f, ".arrow") for f in files])


def _table_rows(path: Path, table) -> list[tuple[str, Any]]:
    try:
        rows = table.to_pylist()
    except Exception as err:  # pyarrow's own errors (e.g. invalid UTF-8 in a string column)
        raise DataError(f"{path}: cannot be read ({err})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(rows, start=1)]


def holdout(records: list[Record], fraction: float, seed: int) -> set[int]:
    """The indices of a seeded random `fraction` of `records` (at least one) held out for validation."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_split={fraction!r} must be in (0, 1), e.g. 0.05")
    if len(records) < 2:
        where = records[0].source if records else "the data"
        raise DataError(f"{where}: one record cannot be split into training and validation; pass --val-data "
                        "FILE or more data")
    return set(random.Random(seed).sample(range(len(records)), max(1, round(fraction * len(records)))))
