"""Packing: several tokenized examples per row, up to `cutoff_len` tokens, with no attention across them.

Examples are placed in order, each into the current row while it fits, else into a new row (so a
run's rows depend only on its data, and a resumed run rebuilds the same rows). Each row carries
`position_ids` that restart at 0 for every example. A batch of packed rows has no attention mask:
transformers reads the restarts in `position_ids` as example boundaries and builds a block-diagonal
causal mask (`masking_utils.find_packed_sequence_indices`; eager, sdpa and flex attention alike,
and the variable-length path of flash attention). The first token of each example is never a
target (unpacked, nothing precedes it), so its label is `IGNORE_INDEX`: no example learns to
predict its first token from the one before it. Padding at the end of a shorter row is a segment
of its own, with no target.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from qdora.data.records import IGNORE_INDEX


def pack(examples: Sequence[Mapping[str, Sequence[int]]], cutoff_len: int) -> list[dict[str, list[int]]]:
    """Rows of whole examples, each at most `cutoff_len` tokens, in the examples' order. Every
    example lands whole in one row: none is split or dropped; one longer than `cutoff_len` is an
    error (`qdora train` cuts examples to it first, and counts those it cut). Time and memory are
    linear in the tokens."""
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
    rows: list[dict[str, list[int]]] = []
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > cutoff_len:
            raise ValueError(f"example {i}, of {n} tokens, is longer than cutoff_len={cutoff_len}; cut it first")
        if len(ex["labels"]) != n:
            raise ValueError(f"example {i} has {n} input_ids but {len(ex['labels'])} labels")
        if not rows or len(rows[-1]["input_ids"]) + n > cutoff_len:
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
        row = rows[-1]
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE_INDEX] * min(n, 1) + list(ex["labels"][1:])  # an empty example adds nothing
        row["position_ids"] += range(n)
    return rows


def collate_packed(rows: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `labels` and `position_ids` of packed rows, right-padded to the longest; no
    attention mask (see the module docstring). Padding's positions restart at 0 and its labels are
    `IGNORE_INDEX`."""
    if not rows:
        raise ValueError("collate_packed: empty batch")
    length = max(len(r["input_ids"]) for r in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(length, dtype=torch.long).repeat(len(rows), 1)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
        position_ids[i, :n] = torch.as_tensor(r["position_ids"], dtype=torch.long)
        position_ids[i, n:] = torch.arange(length - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
