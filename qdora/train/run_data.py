"""A run's examples, made before its model is loaded: records read and checked (`read_records`,
with the other checks that need no model), then tokenized with the model's tokenizer (cached per
data, tokenizer and settings), the examples with nothing to learn set aside, and packed on request
(`examples`). Validation examples come from `val_data`, or from a seeded `val_split` of `data`.
What the data loses is counted and said in notes (`RunExamples.notes`): the examples cut to
`cutoff_len` and those set aside."""

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


@dataclass(frozen=True)
class Truncation:
    """The examples of one split longer than `cutoff_len`: cut to it, as --cutoff-len says, and counted."""
    split: str
    """`training` or `validation`."""
    examples: int
    """The split's examples (before those with no target token are set aside)."""
    cut: int
    """Examples longer than `cutoff_len`, cut to it."""
    longest: int
    """The longest example's tokens before the cut (0: no example)."""
    cutoff_len: int
    unit: str = "examples"
    """What the notes call them (`pairs` for a preference run)."""

    @classmethod
    def of(cls, split: str, lengths: list[int], cutoff_len: int, unit: str = "examples") -> Truncation:
        """From each example's length before the cut."""
        return cls(split, len(lengths), sum(n > cutoff_len for n in lengths), max(lengths, default=0), cutoff_len,
                   unit)

    def note(self) -> str | None:
        """One line for the terminal and the run log when examples were cut, else None."""
        if not self.cut:
            return None
        verb = "is" if self.cut == 1 else "are"
        was = "was" if self.cut == 1 else "were"
        return (f"note: {self.cut:,} of {self.examples:,} {self.split} {self.unit} {verb} longer than "
                f"cutoff_len={self.cutoff_len} and {was} cut to it (longest {self.longest:,} tokens; raise "
                "--cutoff-len to keep them whole)")


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
    truncated: Truncation
    """The training examples longer than `cutoff_len` (cut to it)."""
    val_truncated: Truncation
    """The validation examples longer than `cutoff_len` (cut to it)."""
    val_skipped: int
    """Validation examples set aside because no target token is left within `cutoff_len`."""

    @property
    def longest(self) -> int:
        """The longest example's tokens after the cut, training or validation (packed examples
        restart their positions at 0, so the model sees no position past this)."""
        return max(min(t.longest, t.cutoff_len) for t in (self.truncated, self.val_truncated))

    def notes(self) -> list[str]:
        """What the data lost, one line each: examples cut to `cutoff_len`, examples set aside."""
        lines = [t.note() for t in (self.truncated, self.val_truncated)]
        for count, split in ((self.skipped, "training"), (self.val_skipped, "validation")):
            if count:
                lines.append(f"note: {count:,} {split} example(s) have no target token within "
                             f"cutoff_len={self.truncated.cutoff_len} and are skipped")
        return [line for line in lines if line]

    def positions_note(self, max_positions: int | None) -> str | None:
        """One line when `cutoff_len` is above the model's `max_position_embeddings` (not an error:
        a RoPE model runs past it, with a quality the user should know about), else None."""
        return positions_note(self.truncated.cutoff_len, self.longest, max_positions)


def positions_note(cutoff_len: int, longest: int, max_positions: int | None) -> str | None:
    """`RunExamples.positions_note` of a run whose longest sequence, after the cut, has `longest` tokens."""
    if not isinstance(max_positions, int) or cutoff_len <= max_positions:
        return None
    return (f"note: cutoff_len={cutoff_len} is above the model's max_position_embeddings={max_positions}: "
            f"examples longer than {max_positions:,} tokens run at positions it was not trained on (RoPE models "
            f"run there, with lower quality); the longest here has {longest:,} tokens")


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
    train = tokenized.select([i for i in range(len(records.train)) if i not in records.held_out])
    val = tokenized.select(sorted(records.held_out))
    if records.val:
        val = cached_examples(cfg.val_data, records.val, tokenizer, cfg.cutoff_len, cfg.train_on_prompt, cfg.format,
                              progress)
    truncated = Truncation.of("training", train.lengths, cfg.cutoff_len)
    val_truncated = Truncation.of("validation", val.lengths, cfg.cutoff_len)
    kept, skipped = _with_targets(train.examples, cfg.data, cfg)
    kept_val, val_skipped = _with_targets(val.examples, cfg.val_data or cfg.data, cfg)
    return RunExamples(pack(kept, cfg.cutoff_len) if cfg.packing else kept, kept_val, len(kept), skipped, truncated,
                       val_truncated, val_skipped)
