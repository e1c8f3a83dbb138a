"""Supervised fine-tuning data for causal LMs: load records, build prompts, tokenize, batch.

Two record formats are recognised, per record:

* Alpaca / LLM-Adapters: `instruction`, optional `input`, `output` (an extra `answer` field, the
  LLM-Adapters label, is kept as `Record.label`);
* GSM8K: `question`, `answer` (the full worked solution, ending in `#### <number>`).

Files are `.json` (a JSON array of objects) or `.jsonl` (one object per line, blank lines skipped).
Every problem with a file is raised as `DataError`, naming the file and the line or item.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

IGNORE_INDEX = -100
"""Label value that `torch.nn.functional.cross_entropy` ignores (prompt tokens and padding)."""

SUPPORTED_EXTENSIONS = (".json", ".jsonl")

DEMO_DATA = Path(__file__).parent / "demo_data"
"""Vendored ARC-Easy slices (`arc_easy_train.json`, `arc_easy_test.json`); see its README.md."""

ALPACA_FIELDS = ("instruction", "input", "output")
GSM8K_FIELDS = ("question", "answer")
_EXPECTED = (f"expected Alpaca/LLM-Adapters fields ({', '.join(ALPACA_FIELDS)}) "
             f"or GSM8K fields ({', '.join(GSM8K_FIELDS)})")

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
    """One training/evaluation example, already in prompt/response form."""

    prompt: str
    """The full prompt text (template applied), ending in `### Response:\\n`."""
    response: str
    """The text the model is trained to produce after the prompt."""
    label: str | None = None
    """The reference answer, for evaluation: LLM-Adapters' `answer` field, or GSM8K's final
    number (after `####`, thousands separators removed). None when the record has none."""
    source: str = ""
    """Where the record came from, e.g. `data.jsonl line 17` or `data.json item 3`."""


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
    names = {dict: "object", list: "array", type(None): "null", bool: "bool", str: "string"}
    return names.get(type(value), type(value).__name__)


def _field(obj: Mapping[str, Any], name: str, where: str, *, required: bool = True,
           types: tuple[type, ...] = (str,)) -> Any:
    """`obj[name]`, checked for presence and type; errors name `where` and the field."""
    if name not in obj or (not required and obj[name] is None):
        if not required:
            return None
        has = ", ".join(obj) or "no fields"
        raise DataError(f"{where}: field {name!r} is missing (the record has: {has}); {_EXPECTED}")
    value = obj[name]
    if not isinstance(value, types) or isinstance(value, bool):
        wanted = "a string" if types == (str,) else "a string or a number"
        raise DataError(f"{where}: field {name!r} must be {wanted}, got {_json_type(value)}")
    return value


def parse_record(obj: Any, source: str = "<record>") -> Record:
    """Turn one decoded JSON object into a `Record`, detecting its format.

    Alpaca/LLM-Adapters when it has `instruction` or `output`; GSM8K when it has `question`.
    `source` names the record in errors and is stored in `Record.source`.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a JSON object, got {_json_type(obj)}; {_EXPECTED}")
    if "instruction" in obj or "output" in obj:
        instruction = _field(obj, "instruction", source)
        input_text = _field(obj, "input", source, required=False)
        output = _field(obj, "output", source)
        answer = _field(obj, "answer", source, required=False, types=(str, int, float))
        return Record(prompt=alpaca_prompt(instruction, input_text), response=output,
                      label=None if answer is None else str(answer), source=source)
    if "question" in obj:
        question = _field(obj, "question", source)
        answer = _field(obj, "answer", source)
        return Record(prompt=alpaca_prompt(question), response=answer,
                      label=gsm8k_label(answer), source=source)
    has = ", ".join(obj) or "no fields"
    raise DataError(f"{source}: unrecognised record (it has: {has}); {_EXPECTED}")


def load_records(path: str | Path) -> list[Record]:
    """Read every record of a `.json` or `.jsonl` file; raise `DataError` on any problem."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
                        f"supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    records = _load_jsonl(path, text) if suffix == ".jsonl" else _load_json(path, text)
    if not records:
        raise DataError(f"{path}: contains no records")
    return records


def _load_json(path: Path, text: str) -> list[Record]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from e
    if not isinstance(items, list):
        raise DataError(f"{path}: top-level JSON must be an array of records, "
                        f"got {_json_type(items)} (use .jsonl for one record per line)")
    return [parse_record(obj, f"{path} item {i}") for i, obj in enumerate(items)]


def _load_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}, column {e.colno}: invalid JSON: {e.msg}") from e
        records.append(parse_record(obj, f"{path} line {lineno}"))
    return records


def tokenize_record(tokenizer, record: Record, cutoff_len: int,
                    train_on_prompt: bool = False) -> dict[str, list[int]]:
    """Token ids and labels for one record.

    The prompt is tokenized with the tokenizer's special tokens (so BOS is added when the tokenizer
    adds one), the response without, then `eos_token_id` is appended (when the tokenizer has one).
    Tokenizing the parts separately makes the prompt/response boundary exact. The result is cut to
    `cutoff_len` tokens from the right. `labels` is `IGNORE_INDEX` on prompt tokens (unless
    `train_on_prompt`) and equals `input_ids` elsewhere; it may supervise nothing when the prompt
    fills `cutoff_len` (see `count_supervised`).

    Note: tokenizers that prepend a space to every text (SentencePiece's dummy prefix, as in
    Llama-2) tokenize the response as if it began a new text, which can differ by that space from
    tokenizing prompt and response together.
    """
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
    prompt_ids = list(tokenizer(record.prompt, add_special_tokens=True)["input_ids"])
    response_ids = list(tokenizer(record.response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    input_ids = (prompt_ids + response_ids)[:cutoff_len]
    prompt_labels = prompt_ids if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    labels = (prompt_labels + response_ids)[:cutoff_len]
    return {"input_ids": input_ids, "labels": labels}


def count_supervised(labels: Sequence[int] | torch.Tensor) -> int:
    """Number of labels that contribute to the loss (not `IGNORE_INDEX`)."""
    if isinstance(labels, torch.Tensor):
        return int((labels != IGNORE_INDEX).sum())
    return sum(1 for label in labels if label != IGNORE_INDEX)


class SFTDataset(Dataset):
    """Records tokenized once, up front; item `i` is `tokenize_record(records[i])`."""

    def __init__(self, records: Sequence[Record], tokenizer, cutoff_len: int,
                 train_on_prompt: bool = False):
        self.records = list(records)
        self.cutoff_len = cutoff_len
        self.train_on_prompt = train_on_prompt
        quiet = True if len(self.records) <= 2000 else None  # None: show only on a terminal
        self.examples = [tokenize_record(tokenizer, r, cutoff_len, train_on_prompt)
                         for r in tqdm(self.records, desc="tokenizing", disable=quiet)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def collate(examples: Sequence[Mapping[str, Sequence[int]]],
            pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: `input_ids` (with `pad_token_id`),
    `attention_mask` (1 on tokens, 0 on padding) and `labels` (`IGNORE_INDEX` on padding), all long."""
    if not examples:
        raise ValueError("collate: empty batch")
    length = max(len(ex["input_ids"]) for ex in examples)
    shape = (len(examples), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(f"collate: example {row} has {n} input_ids but {len(ex['labels'])} labels")
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_order(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of example indices for one epoch; the last batch may be smaller.

    Depends only on its arguments (a CPU `torch.Generator` seeded with `seed + epoch`), so a
    resumed run recomputes the same order and can skip the batches already done.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0
