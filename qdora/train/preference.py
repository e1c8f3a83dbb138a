"""`qdora train --objective dpo|simpo`: preference pairs, their batches, the reference and the loss.

Examples are pairs tokenized as TRL's `DPOTrainer` tokenizes them (`qdora.data.preference`); a batch of
B pairs is 2B rows, the chosen replies first, right-padded, with a completion mask over the replies'
tokens. Each reply's log-probability is taken without the whole logits (`sequence_logps`).

The DPO reference is the model before fine-tuning. For an adapter method it is the same model with every
adapter off, magnitude included (`qdora.models.switch`): the frozen NF4 base, bit for bit, with no second
model in memory. For `full` it is a frozen copy made before the first step. With `precompute_reference`
each pair's reference log-probabilities are computed once before training, written to
`OUT/reference_logps.json`, and read back on `--resume` (for `full` the model has changed by then).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from qdora.core.preference import PreferenceLoss, dpo_loss, simpo_loss
from qdora.core.safetensors_io import write_text_atomic
from qdora.data.preference import Pair, load_pairs, tokenize_pair
from qdora.data.records import DataError, holdout
from qdora.models.head_loss import sequence_logps
from qdora.models.switch import disable_adapter
from qdora.train.config import TrainConfig
from qdora.train.run_data import Truncation, positions_note

REFERENCE_FILE = "reference_logps.json"


@dataclass
class PairExamples:
    """A preference run's pairs (the counterpart of `run_data.RunExamples`)."""

    rows: list[dict]
    val: list[dict]
    lost: list[str]
    cutoff_len: int

    @property
    def examples(self) -> int:
        return len(self.rows)

    def notes(self) -> list[str]:
        return self.lost

    def positions_note(self, max_positions: int | None) -> str | None:
        longest = max((len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
                       for ex in self.rows + self.val), default=0)
        return positions_note(self.cutoff_len, longest, max_positions)


def read_pairs(cfg: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """The run's training and validation pairs, read and checked before anything slow (data without pairs is
    refused in one line); `val_split` held out of `data` as the SFT path holds it out."""
    train = load_pairs(cfg.data)
    val = load_pairs(cfg.val_data) if cfg.val_data else []
    if cfg.val_split:
        held = holdout(train, cfg.val_split, cfg.seed)
        if len(held) == len(train):
            raise DataError(f"{cfg.data}: val_split={cfg.val_split} leaves no training pair")
        val = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
    return train, val


def _tokenized(pairs, tokenizer, cfg: TrainConfig, split: str) -> tuple[list[dict], Truncation, int]:
    rows, lengths, skipped = [], [], 0
    for pair in pairs:
        ex = tokenize_pair(tokenizer, pair, cfg.cutoff_len)
        lengths.append(ex["length"])
        if not ex["chosen_ids"] or not ex["rejected_ids"]:
            skipped += 1
            continue
        rows.append(ex)
    return rows, Truncation.of(split, lengths, cfg.cutoff_len, unit="pairs"), skipped


def pair_examples(cfg: TrainConfig, pairs: tuple[list[Pair], list[Pair]], tokenizer) -> PairExamples:
    """The run's pairs (`read_pairs`), tokenized; what they lose (cut replies, pairs with no reply left) in notes."""
    train, val = pairs
    if any(p.chat for p in train + val) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{cfg.data}: chat pairs need a chat template and the tokenizer has none; pass "
                        "--chat-template FILE")
    rows, cut, skipped = _tokenized(train, tokenizer, cfg, "training")
    val_rows, val_cut, val_skipped = _tokenized(val, tokenizer, cfg, "validation")
    if not rows:
        raise DataError(f"{cfg.data}: no pair keeps a reply within cutoff_len={cfg.cutoff_len} (the prompts fill "
                        "it); raise --cutoff-len")
    notes = [n for n in (cut.note(), val_cut.note()) if n]
    for count, split in ((skipped, "training"), (val_skipped, "validation")):
        if count:
            notes.append(f"note: {count:,} {split} pair(s) have no reply token within cutoff_len={cfg.cutoff_len} "
                         "and are skipped")
    return PairExamples(rows, val_rows, notes, cfg.cutoff_len)


def collate_pairs(examples: list[dict], pad: int, device) -> dict[str, torch.Tensor]:
    """2B rows, chosen replies first: `input_ids`, `attention_mask`, `completion_mask` (right-padded), and
    `ref_logps` when every example carries its precomputed reference."""
    seqs, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            seqs.append(ex["prompt_ids"] + ex[key])
            masks.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[key]))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
        completion[i, :len(m)] = torch.tensor(m)
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    if all("ref_logps" in ex for ex in examples):
        batch["ref_logps"] = torch.tensor([ex["ref_logps"][0] for ex in examples]
                                          + [ex["ref_logps"][1] for ex in examples], dtype=torch.float64)
    return {k: v.to(device) for k, v in batch.items()}


def batch_tokens(examples: list[dict]) -> int:
    return sum(2 * len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples)


class Objective:
    """The preference loss of a run's batches, its reference, and the metrics of a step."""

    def __init__(self, run):
        self.run = run
        cfg = run.cfg
        self.kind, self.beta = cfg.objective, cfg.beta
        self.frozen = None
        if cfg.objective == "dpo" and cfg.method == "full" and not cfg.precompute_reference:
            self.frozen = copy.deepcopy(run.model).eval().requires_grad_(False)  # the model before any step
        self.metrics: dict[str, float] = {}
        self.micro = 0

    def _logps(self, model, batch):
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                              self.run.cfg.loss_chunk_tokens or None)

    @torch.no_grad()
    def reference(self, batch) -> torch.Tensor:
        """Each row's reference log-probability: precomputed, the frozen copy's, or the model's own with
        every adapter off."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.frozen is not None:
            return self._logps(self.frozen, batch)[0]
        with disable_adapter(self.run.model):
            return self._logps(self.run.model, batch)[0]

    def loss_of(self, batch) -> PreferenceLoss:
        logps, counts = self._logps(self.run.model, batch)
        (pc, pr), (nc, nr) = logps.chunk(2), counts.chunk(2)
        if self.kind == "simpo":
            return simpo_loss(pc, pr, nc, nr, self.beta, self.run.cfg.simpo_gamma)
        rc, rr = self.reference(batch).chunk(2)
        return dpo_loss(pc, pr, rc, rr, self.beta, self.run.cfg.dpo_loss, nc, nr)

    def loss(self, batch) -> torch.Tensor:
        """The mean loss of the micro-batch's pairs; its metrics add to the step's."""
        out = self.loss_of(batch)
        for k, v in out.metrics().items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v
        self.micro += 1
        return out.loss

    def step_metrics(self) -> dict[str, float]:
        """The step's metrics (means over its micro-batches), then a fresh start."""
        out = {k: v / max(1, self.micro) for k, v in self.metrics.items()}
        self.metrics, self.micro = {}, 0
        return out

    @torch.no_grad()
    def validate(self) -> tuple[float, dict[str, float]]:
        """The mean loss over every validation pair, and the mean rewards, margin and reward accuracy."""
        run, val, size = self.run, self.run.val, self.run.cfg.batch_size
        model = run.model
        was = model.training
        model.eval()
        losses, chosen, rejected = [], [], []
        for start in range(0, len(val), size):
            out = self.loss_of(collate_pairs(val[start:start + size], run.pad, run.device))
            losses.append(out.losses.double())
            chosen.append(out.chosen_rewards.double())
            rejected.append(out.rejected_rewards.double())
        model.train(was)
        c, r = torch.cat(chosen), torch.cat(rejected)
        return torch.cat(losses).mean().item(), {"val_rewards/accuracies": (c > r).double().mean().item(),
                                                 "val_rewards/margins": (c - r).mean().item()}

    @torch.no_grad()
    def precompute(self, out: Path, main: bool) -> None:
        """Every pair's reference log-probabilities, once: read from `out/reference_logps.json` when it holds
        this run's (a resumed run), else computed (before any step) and written there."""
        run = self.run
        path = out / REFERENCE_FILE
        everything = run.examples + run.val
        if path.exists():
            saved = json.loads(path.read_text())
            if len(saved) == len(everything):
                for ex, ref in zip(everything, saved):
                    ex["ref_logps"] = ref
                return
            if run.cfg.resume and run.cfg.method == "full":
                raise ValueError(f"{path} holds {len(saved)} pairs' reference log-probabilities, this run has "
                                 f"{len(everything)}: the full model has changed since, and its reference cannot be "
                                 "formed again; start a new run")
        model = run.model
        was = model.training
        model.eval()
        size = run.cfg.batch_size
        for start in range(0, len(everything), size):
            chunk = everything[start:start + size]
            batch = collate_pairs(chunk, run.pad, run.device)
            with disable_adapter(model) if run.cfg.method != "full" else contextlib.nullcontext():
                logps = self._logps(model, batch)[0].double()
            c, r = logps.chunk(2)
            for ex, a, b in zip(chunk, c.tolist(), r.tolist()):
                if not (math.isfinite(a) and math.isfinite(b)):
                    raise ValueError("a reference log-probability is not finite; the base model's outputs are broken")
                ex["ref_logps"] = [a, b]
        model.train(was)
        if main:
            write_text_atomic(path, json.dumps([ex["ref_logps"] for ex in everything]))
