"""A run's examples, made before its model is loaded: records read and checked (`read_records`,
with the other checks that need no model), then tokenized with the model's tokenizer (cached per
data, tokenizer and settings), the examples with nothing to learn set aside, and packed on request
(`examples`). Validation examples come from `val_data`, or from a seeded `val_split` of `data`."""

from __future__ import annotations

from dataclasses import dataclass

from qdora.data.chat import check_chat_template, set_chat_template
from qdora.data.examples import count_supervised
from qdora.data.packing import pack
from qdora.data.records import DataError, Record, holdout, load_records
from qdora.data.token_cache import cached_examples
from qdora.train.config import TrainConfig


@dataclass
class RunRecords:
    train: list[Record]
    """Every record of `data` (a `val_split` is taken after tokenizing, so the cache serves both)."""
    val: list[Record]
    """The records of `val_data` (empty without it)."""
    held_out: set[int]
    """Indices of `train` held out for validation by `val_split`."""


@dataclass
class RunExamples:
    rows: list[dict]
    """What the batches are drawn from: examples, or rows of packed examples."""
    val: list[dict]
    """Validation examples (never packed)."""
    examples: int
    """Training examples (in `rows`)."""
    skipped: int
    """Training examples set aside because no target token is left within `cutoff_len`."""


def read_records(cfg: TrainConfig) -> RunRecords:
    """Read and check the run's data files (every record, before anything slow)."""
    train = load_records(cfg.data, cfg.format)
    val = load_records(cfg.val_data, cfg.format) if cfg.val_data else []
    held = holdout(train, cfg.val_split, cfg.seed) if cfg.val_split else set()
    if held and len(held) == len(train):
        raise DataError(f"{cfg.data}: val_split={cfg.val_split} leaves no training record")
    return RunRecords(train, val, held)


def _with_targets(examples: list[dict], data: str, cfg: TrainConfig) -> tuple[list[dict], int]:
    keep = [ex for ex in examples if count_supervised(ex["labels"][1:]) > 0]
    if examples and not keep:
        raise DataError(f"{data}: no example has a target token within cutoff_len={cfg.cutoff_len} (every token "
                        "left is prompt); raise --cutoff-len or shorten the prompts")
    return keep, len(examples) - len(keep)


def examples(cfg: TrainConfig, records: RunRecords, tokenizer, progress: bool = True) -> RunExamples:
    """Tokenize (or take from the cache), set aside what has nothing to learn, pack."""
    if cfg.chat_template:
        set_chat_template(tokenizer, cfg.chat_template)
    for data, recs in ((cfg.data, records.train), (cfg.val_data, records.val)):
        if any(r.format == "chat" for r in recs):
            check_chat_template(tokenizer, data)
    tokenized = cached_examples(cfg.data, records.train, tokenizer, cfg.cutoff_len, cfg.train_on_prompt,
                                cfg.format, progress)
    train = [ex for i, ex in enumerate(tokenized) if i not in records.held_out]
    val = [ex for i, ex in enumerate(tokenized) if i in records.held_out]
    if records.val:
        val = cached_examples(cfg.val_data, records.val, tokenizer, cfg.cutoff_len, cfg.train_on_prompt, cfg.format,
                              progress)
    train, skipped = _with_targets(train, cfg.data, cfg)
    val, _ = _with_targets(val, cfg.val_data or cfg.data, cfg)
    return RunExamples(pack(train, cfg.cutoff_len) if cfg.packing else train, val, len(train), skipped)
