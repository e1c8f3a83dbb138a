"""Supervised fine-tuning data for causal LMs: tokenize records, batch them.

Records (their formats, files and checks) are `qdora.data.records`, re-exported here; a chat record is
tokenized by `qdora.data.chat` (the tokenizer's own template, loss on the assistant turns); packing
several examples per row is `qdora.data.packing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from qdora.data.chat import tokenize_chat
from qdora.data.records import (  # noqa: F401  (the record API, also from here)
    ALPACA_FIELDS,
    FORMATS,
    GSM8K_FIELDS,
    IGNORE_INDEX,
    SUPPORTED_EXTENSIONS,
    DataError,
    Record,
    alpaca_prompt,
    detect_format,
    gsm8k_label,
    holdout,
    load_records,
    parse_record,
)

DEMO_DATA = Path(__file__).parent.parent / "demo_data"
"""Vendored ARC-Easy and GSM8K slices; see its README.md."""


def tokenize_whole(tokenizer, record: Record, train_on_prompt: bool = False) -> dict[str, list[int]]:
    """Token ids and labels for one record, whole (a chat record: `qdora.data.chat.tokenize_chat`).

    The prompt is tokenized with the tokenizer's special tokens (so BOS is added when the tokenizer
    adds one), the response without, then `eos_token_id` is appended (when the tokenizer has one).
    Tokenizing the parts separately makes the prompt/response boundary exact. `labels` is
    `IGNORE_INDEX` on prompt tokens (unless `train_on_prompt`) and equals `input_ids` elsewhere.

    Note: tokenizers that prepend a space to every text (SentencePiece's dummy prefix, as in
    Llama-2) tokenize the response as if it began a new text, which can differ by that space from
    tokenizing prompt and response together.
    """
    if record.format == "chat":
        return tokenize_chat(tokenizer, record, None, train_on_prompt)
    prompt_ids = list(tokenizer(record.prompt, add_special_tokens=True)["input_ids"])
    response_ids = list(tokenizer(record.response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    prompt_labels = prompt_ids if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return {"input_ids": prompt_ids + response_ids, "labels": prompt_labels + response_ids}


def _check_cutoff(cutoff_len: int) -> None:
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")


def cut(example: Mapping[str, list[int]], cutoff_len: int) -> dict[str, list[int]]:
    """`example` cut to its first `cutoff_len` tokens (itself when it is no longer)."""
    if len(example["input_ids"]) <= cutoff_len:
        return dict(example)
    return {key: value[:cutoff_len] for key, value in example.items()}


def tokenize_record(tokenizer, record: Record, cutoff_len: int,
                    train_on_prompt: bool = False) -> dict[str, list[int]]:
    """`tokenize_whole(record)` cut to `cutoff_len` tokens from the right. `labels` may supervise
    nothing when the prompt fills `cutoff_len` (see `count_supervised`); `tokenize_all` also tells
    which examples were cut."""
    _check_cutoff(cutoff_len)
    return cut(tokenize_whole(tokenizer, record, train_on_prompt), cutoff_len)


def count_supervised(labels: Sequence[int] | torch.Tensor) -> int:
    """Number of labels that contribute to the loss (not `IGNORE_INDEX`)."""
    if isinstance(labels, torch.Tensor):
        return int((labels != IGNORE_INDEX).sum())
    return sum(1 for label in labels if label != IGNORE_INDEX)


@dataclass
class Tokenized:
    """Records tokenized and cut to `cutoff_len`, with each one's length before the cut, so that
    what the cut removed is counted, never lost silently."""
    examples: list[dict[str, list[int]]]
    """Each record's `input_ids` and `labels`, cut to `cutoff_len` from the right."""
    lengths: list[int]
    """Each record's length in tokens before the cut (over `cutoff_len`: it was cut)."""
    cutoff_len: int

    def __post_init__(self):
        if len(self.lengths) != len(self.examples):
            raise ValueError(f"{len(self.examples)} examples but {len(self.lengths)} lengths")

    def select(self, indices: Sequence[int]) -> Tokenized:
        """The records at `indices`, in that order."""
        return Tokenized([self.examples[i] for i in indices], [self.lengths[i] for i in indices], self.cutoff_len)

    @property
    def truncated(self) -> list[int]:
        """The lengths before the cut of the examples that were cut."""
        return [n for n in self.lengths if n > self.cutoff_len]


def tokenize_all(records: Sequence[Record], tokenizer, cutoff_len: int, train_on_prompt: bool = False,
                 progress: bool = True) -> Tokenized:
    """`tokenize_record` of every record, with each one's length before the cut; a progress bar for
    more than 2000 on a terminal."""
    _check_cutoff(cutoff_len)
    quiet = not progress or (True if len(records) <= 2000 else None)  # None: a bar only on a terminal
    examples, lengths = [], []
    for record in tqdm(records, desc="tokenizing", disable=quiet):
        whole = tokenize_whole(tokenizer, record, train_on_prompt)
        lengths.append(len(whole["input_ids"]))
        examples.append(cut(whole, cutoff_len))
    return Tokenized(examples, lengths, cutoff_len)


class SFTDataset(Dataset):
    """Records tokenized once, up front; item `i` is `tokenize_record(records[i])`
    (`tokenized.truncated`: the lengths of those longer than `cutoff_len`, before the cut)."""

    def __init__(self, records: Sequence[Record], tokenizer, cutoff_len: int,
                 train_on_prompt: bool = False):
        self.records = list(records)
        self.cutoff_len = cutoff_len
        self.train_on_prompt = train_on_prompt
        self.tokenized = tokenize_all(self.records, tokenizer, cutoff_len, train_on_prompt)
        self.examples = self.tokenized.examples

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
