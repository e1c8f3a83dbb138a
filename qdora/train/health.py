"""A run that goes wrong: a non-finite loss, gradient or trained tensor (`NonFiniteError`, with
what to try), and the two ways a run fails without stopping, which warn once: a gradient norm of
exactly 0, and a loss stuck at ln(vocabulary size) (a uniform guess). Metrics lines are valid
JSON always."""

from __future__ import annotations

import json
import math

import torch

from qdora.train.config import TrainConfig

UNIFORM_STEPS = 3
"""Consecutive steps with the loss within `UNIFORM_TOL` nats of ln(vocabulary size) before a warning."""
UNIFORM_TOL = 2e-3



class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or parameter; nothing of it was saved."""


def _finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def metrics_line(record: dict) -> str:
    """One line of `metrics.jsonl`: valid JSON always (a non-finite number is written as null)."""
    return json.dumps({k: _finite_or_none(v) for k, v in record.items()}, allow_nan=False) + "\n"


def count_nonfinite(tensors: list[torch.Tensor]) -> list[int]:
    """Non-finite entries of each tensor (this rank's shard of a sharded one)."""
    counts = []
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        counts.append(int((~torch.isfinite(local.detach())).sum()) if local.is_floating_point() else 0)
    return counts


class Health:
    """Watches each step for the two ways a run goes wrong without stopping: a gradient norm of
    exactly 0 (nothing learns) and a loss stuck at ln(vocabulary size) (a uniform guess, what a
    destroyed model predicts). Each warns once."""

    def __init__(self, vocab_size: int | None):
        self.uniform = math.log(vocab_size) if vocab_size else None
        self.streak = 0
        self.warned: set[str] = set()

    def check(self, step: int, loss: float, grad_norm: float, lr: float) -> list[str]:
        """The warnings of this step, each kind at most once per run."""
        self.streak = self.streak + 1 if self.uniform and abs(loss - self.uniform) < UNIFORM_TOL else 0
        found = {}
        if grad_norm == 0.0:
            found["zero_grad"] = (
                f"step {step}: the gradient norm is exactly 0 (loss {loss:.4f}): nothing is learning. At learning "
                f"rate {lr:.3g} the model's outputs may have saturated; try a lower --lr, and check that the data "
                "has response tokens")
        if self.streak >= UNIFORM_STEPS:
            found["uniform"] = (
                f"step {step}: the loss has been {loss:.4f} ≈ ln(vocabulary size) = {self.uniform:.4f} for "
                f"{self.streak} steps: the model guesses uniformly. A learning rate too high (now {lr:.3g}) "
                "destroys a model this way; try a lower --lr")
        new = [kind for kind in found if kind not in self.warned]
        self.warned.update(new)
        return [found[kind] for kind in new]


def diverged(step: int, loss: float, grad_norm: float, lr: float, cfg: TrainConfig, saved: str) -> str:
    tips = [f"a lower --lr (this run: {cfg.lr:g}; typical for adapters: 1e-4 to 3e-4)"]
    if cfg.max_grad_norm == 0:
        tips.append("gradient clipping (--max-grad-norm 1.0)")
    if cfg.warmup_steps == 0:
        tips.append("a warmup (--warmup-steps 10)")
    return (f"step {step}: the loss is {loss:.4g} and the gradient norm {grad_norm:.4g} at learning rate "
            f"{lr:.3g}: training diverged and was stopped before the optimizer step. {saved} Try "
            + ", or ".join(tips) + ".")
