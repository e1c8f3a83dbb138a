"""Fine-tuning loop for every method (`full`, `lora`, `dora`, `qlora`, `qdora`): setup → fit.

Checkpoints hold what resuming needs to continue the same run exactly: the trainable tensors,
the optimizer state, the step and the RNG states, all as safetensors/JSON (no pickle). They are
written to a temporary folder and renamed into place. The data order is a pure function of the
seed and the step, and the learning rate a pure function of the step, so a resumed run replays
the uninterrupted one. Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and stops.

A run that goes wrong stops before it can spoil anything: every check of the input (the output
folder, the data, the checkpoint to resume) runs before the model is loaded; a non-finite loss or
gradient stops training before the optimizer steps (`NonFiniteError`), and no checkpoint or adapter
with a non-finite value is ever written, so the last good checkpoint stays in place. A gradient
norm of exactly 0, or a loss stuck at ln(vocabulary size) (a uniform guess), warns once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from qdora.core.safetensors_io import write_text_atomic
from qdora.data.examples import IGNORE_INDEX, batch_order, collate, count_supervised
from qdora.data.packing import collate_packed
from qdora.train import fsdp
from qdora.train.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from qdora.train.config import TrainConfig, lr_at
from qdora.train.health import Health, NonFiniteError, count_nonfinite, diverged
from qdora.train.preference import batch_tokens, collate_pairs
from qdora.train.preflight import check_run
from qdora.train.run_log import RunLog
from qdora.train.setup import (  # noqa: F401  (prepare_for_training: also from here)
    Run,
    make_optimizer,
    prepare_for_training,
    save_result,
    setup_run,
)


def _run_state(step: int, cfg: TrainConfig, totals: dict | None = None) -> dict:
    """The run's position: step, schedule, and the totals so far (`tokens`, `seconds` of training),
    so that a resumed run's summary counts the whole run."""
    return {"step": step,
            "scheduler": {"schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps, "lr": cfg.lr,
                          "max_steps": cfg.max_steps, "next_lr": lr_at(step, cfg)},
            "totals": dict(totals or {"tokens": 0, "seconds": 0.0})}


# ---- the loop ------------------------------------------------------------------------------

class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps (the step in flight completes)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nqdora train: got {signal.Signals(signum).name}; finishing this step and writing a checkpoint",
              flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _local_batch(run: Run, examples: list[dict], ids: list[int], packed: bool) -> dict[str, torch.Tensor]:
    """This rank's part of the global micro-batch `ids` of `examples` (all of it in a single process)."""
    local = ids[run.rank * len(ids) // run.world:(run.rank + 1) * len(ids) // run.world]
    join = collate_packed if packed else collate
    if not local:  # a short last batch: run one example with no label, so collectives still match
        batch = join([examples[ids[0]]], run.pad)
        batch["labels"].fill_(IGNORE_INDEX)
    else:
        batch = join([examples[i] for i in local], run.pad)
    return {k: v.to(run.device) for k, v in batch.items()}


class _Batches:
    """The run's micro-batches: the data order is a pure function of the seed and the epoch, so a
    resumed run replays the uninterrupted one."""

    def __init__(self, run: Run):
        self.run = run
        self.per_epoch = math.ceil(len(run.examples) / run.cfg.batch_size)
        self.orders: dict[int, list[list[int]]] = {}

    def __call__(self, index: int) -> tuple[dict[str, torch.Tensor], int, int]:
        """This rank's part of global micro-batch `index`, the number of supervised (shifted) labels
        in the whole micro-batch, and its token count."""
        run, examples = self.run, self.run.examples
        epoch, pos = divmod(index, self.per_epoch)
        if epoch not in self.orders:
            self.orders.clear()
            self.orders[epoch] = batch_order(len(examples), run.cfg.batch_size, run.cfg.seed, epoch)
        ids = self.orders[epoch][pos]
        if run.objective is not None:  # preference pairs: the loss is a mean over pairs
            chosen = [examples[i] for i in ids]
            return collate_pairs(chosen, run.pad, run.device), len(ids), batch_tokens(chosen)
        supervised = sum(count_supervised(examples[i]["labels"][1:]) for i in ids)
        tokens = sum(len(examples[i]["input_ids"]) for i in ids)
        return _local_batch(run, examples, ids, run.cfg.packing), supervised, tokens


@torch.no_grad()
def _validate(run: Run) -> float:
    """The token-mean loss over every validation example (no dropout), in batches of `batch_size`."""
    if run.objective is not None:
        loss, run.val_metrics = run.objective.validate()
        return loss
    model, val, size = run.model, run.val, run.cfg.batch_size
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(val), size):
        ids = list(range(start, min(start + size, len(val))))
        count += sum(count_supervised(val[i]["labels"][1:]) for i in ids)
        # num_items_in_batch=1: the loss is this rank's sum over its tokens
        total += model(**_local_batch(run, val, ids, packed=False), num_items_in_batch=1).loss.item()
    total, = _all_reduce(run, [total])
    if run.cfg.fsdp:
        fsdp.reshard(model)  # no backward follows these forwards
    model.train(was_training)
    return total / max(1, count)


def _all_reduce(run: Run, values: list[float], op: str = "sum") -> list[float]:
    if not run.cfg.fsdp:
        return values
    return fsdp.all_reduce(values, run.device, op=op)


def _loss(run: Run, batch: dict, supervised: int) -> torch.Tensor:
    """Token-mean loss of the global micro-batch. Sharded: this rank's sum over its tokens divided
    by the global count, times the world size (FSDP averages gradients over ranks), so the reduced
    gradient is that of the single-process loss."""
    if run.objective is not None:
        return run.objective.loss(batch)
    if not run.cfg.fsdp:
        return run.model(**batch).loss
    return run.model(**batch, num_items_in_batch=max(1, supervised)).loss * run.world


def _forward_backward(run: Run, batches: _Batches, step: int) -> tuple[float, float, int]:
    """Step `step`'s micro-batches forward and backward; returns the global loss, the gradient norm
    (taken always, with max_norm=inf when clipping is off: it is reported and checked) and tokens."""
    cfg = run.cfg
    loss_sum, tokens = 0.0, 0
    for micro in range(cfg.grad_accum):
        batch, supervised, batch_tokens = batches(step * cfg.grad_accum + micro)
        loss = _loss(run, batch, supervised) / cfg.grad_accum
        loss.backward()
        loss_sum += loss.item() / run.world
        tokens += batch_tokens
    grad_norm = _clip_grad_norm([p for _, p in run.params], cfg.max_grad_norm or math.inf, foreach=not cfg.fsdp)
    loss_sum, = _all_reduce(run, [loss_sum])  # the loss of the whole global batch
    return loss_sum, grad_norm, tokens


def _check_trained(run: Run, step: int, lr: float) -> None:
    """Refuse to save trained tensors with a non-finite value (all ranks agree)."""
    counts = [int(c) for c in _all_reduce(run, [float(c) for c in count_nonfinite([p for _, p in run.params])])]
    bad = [(run.names[i], c) for i, c in enumerate(counts) if c]
    if bad:
        raise NonFiniteError(f"step {step}: after the optimizer step {len(bad)} trained tensor(s) hold "
                             f"non-finite values (e.g. {bad[0][0]}: {bad[0][1]:,}) at learning rate {lr:.3g}; "
                             f"they were not saved. {run.saved_note()} Try a lower --lr.")


def _fit(run: Run, on_step: Callable[[int, dict], None] | None) -> dict:
    """The loop: step, validate, log, checkpoint, until `max_steps` or a signal."""
    cfg, optimizer = run.cfg, run.optimizer
    batches = _Batches(run)
    vocab = getattr(getattr(run.model, "config", None), "vocab_size", None)
    health = Health(vocab if isinstance(vocab, int) and vocab > 1 else None)
    log = RunLog(cfg, run.out, run.main, run.start)
    t_start, step, stopped = time.perf_counter(), run.start, None
    with _StopRequest() as stop, contextlib.closing(log):
        while step < cfg.max_steps and stopped is None:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm, tokens = _forward_backward(run, batches, step)
            step += 1
            elapsed = time.perf_counter() - t0
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                      "tokens_per_s": tokens / elapsed, "step_s": elapsed}
            if run.objective is not None:  # rewards, margins and reward accuracy of the step's pairs
                record.update(run.objective.step_metrics())
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                log.write_error({**record, "error": "non-finite loss or gradient"})
                raise NonFiniteError(diverged(step, loss, grad_norm, lr, cfg, run.saved_note()))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.totals["tokens"] += tokens
            run.totals["seconds"] += elapsed
            warnings = health.check(step, loss, grad_norm, lr)
            if warnings:
                record["warnings"] = warnings
                for warning in warnings:
                    log.warn(warning)
            validated = _maybe_validate(run, step, lr, record)
            log.step(record, write=step % cfg.log_every == 0 or step == cfg.max_steps or bool(warnings) or validated)
            if on_step is not None:
                on_step(step, record)
            # a signal may reach only some ranks: all stop after the same step
            flag, = _all_reduce(run, [float(stop.signal or 0)], op="max")
            stopped = stop.signal or (int(flag) if flag else None)
            _save(run, step, lr, stopped is not None, log)
    return {"steps": step, "interrupted": stopped, "out": str(run.out), "seconds": run.totals["seconds"],
            "tokens": run.totals["tokens"], "session_seconds": time.perf_counter() - t_start,
            **{k: run.totals[k] for k in ("val_loss", "best_val_loss", "best_step") if k in run.totals}}


def _maybe_validate(run: Run, step: int, lr: float, record: dict) -> bool:
    """The validation loss after `step` when it is due (into `record`); with `keep_best`, the
    adapter of the best step so far is kept as adapter-best/."""
    cfg = run.cfg
    if not run.val or not ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
        return False
    val_loss = _validate(run)
    if not math.isfinite(val_loss):
        raise NonFiniteError(f"step {step}: the validation loss is {val_loss} at learning rate {lr:.3g}. "
                             f"{run.saved_note()} Try a lower --lr.")
    record["val_loss"] = run.totals["val_loss"] = val_loss
    record.update(run.val_metrics)
    if cfg.keep_best and val_loss < run.totals.get("best_val_loss", math.inf):
        _check_trained(run, step, lr)
        with _writing(run, f"best adapter (step {step})", run.out / "adapter-best", _result_bytes(run)):
            save_result(run.model, run.tokenizer, run.out / "adapter-best", cfg, run.build)
        run.totals["best_val_loss"], run.totals["best_step"] = val_loss, step
        if run.main:
            write_text_atomic(run.out / "adapter-best" / "best.json",
                              json.dumps({"step": step, "val_loss": val_loss}) + "\n")
    return True


def _save(run: Run, step: int, lr: float, stopping: bool, log: RunLog) -> None:
    """After step `step`: the intermediate adapter, the result (after the last step: the adapter, or
    the model for `full`, written before the checkpoint, the larger) and the checkpoint, when due."""
    cfg = run.cfg
    keep_adapter = cfg.keep_adapters_every and step % cfg.keep_adapters_every == 0 and step < cfg.max_steps
    last = step == cfg.max_steps
    checkpoint = step % cfg.save_every == 0 or last or stopping
    if keep_adapter or checkpoint:
        _check_trained(run, step, lr)
    if keep_adapter:
        with _writing(run, f"adapter of step {step}", run.out / f"adapter-step{step}", _result_bytes(run)):
            save_result(run.model, run.tokenizer, run.out / f"adapter-step{step}", cfg, run.build)
    result = run.out / ("model" if cfg.method == "full" else "adapter")
    if last:
        with _writing(run, f"{result.name} of step {step}", result, _result_bytes(run)):
            save_result(run.model, run.tokenizer, result, cfg, run.build)
    if checkpoint:
        log.flush()
        done = f"The {result.name} of step {step} is saved in {result}. " if last else ""
        with _writing(run, f"checkpoint of step {step}", run.out / CHECKPOINT, _checkpoint_bytes(run), done):
            save_checkpoint(run.out / CHECKPOINT, run.model, run.optimizer, run.names,
                            _run_state(step, cfg, run.totals), sharded=cfg.fsdp)
        run.saved_step = step


class DiskFullError(OSError):
    """The disk filled while a run wrote its results; the message names the path, the bytes and what is kept."""


@contextlib.contextmanager
def _writing(run: Run, what: str, path: Path, needed: int, done: str = ""):
    """Running out of disk (or quota) while writing `what` to `path` becomes one line that names
    the path, about how many bytes it needs and has, and what is kept (the last checkpoint)."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(err, DiskFullError):
            raise
        free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
        full = DiskFullError(f"{path}: no space left on device while writing the {what} (it needs about "
                             f"{_mb(needed)}; {_mb(free)} free there). {done}{run.saved_note()} Free some space, "
                             "then run the same command with --resume.")
        full.errno = err.errno
        raise full from err


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _result_bytes(run: Run) -> int:
    """About what the adapter (or a full fine-tune's model) takes on disk."""
    tensors = run.model.parameters() if run.cfg.method == "full" else (p for _, p in run.params)
    return sum(t.numel() * t.element_size() for t in tensors)


def _checkpoint_bytes(run: Run) -> int:
    """About what a checkpoint takes: the trained tensors, the optimizer's states and master copies."""
    total = sum(p.numel() * p.element_size() for _, p in run.params)
    for state in run.optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total + sum(4 * master.numel() for _, master in getattr(run.optimizer, "pairs", ()))


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None,
          build: Callable[[TrainConfig, torch.device], tuple] | None = None) -> dict:
    """Run (or resume) a fine-tuning run: set up (`setup_run`: check, load, adapt, distribute), fit
    (`_fit`), save the result. Returns a summary dict; `summary['interrupted']` is the signal number
    if a signal stopped it. `on_step(step, metrics)` is called after each step.
    `build(cfg, device) -> (model, tokenizer)` replaces the model setup (e.g. a PEFT peer on the
    same quantized base); by default `qdora.load_model` with the config's method and adapters.
    Raises `NonFiniteError` if the loss, the gradient or a trained tensor becomes non-finite
    (nothing of it is saved; the last checkpoint stays as it was)."""
    run = setup_run(cfg, build)
    summary = _fit(run, on_step)
    if run.start == cfg.max_steps:  # a finished run resumed: no step, the result written again
        save_result(run.model, run.tokenizer, run.out / ("model" if cfg.method == "full" else "adapter"), cfg,
                    run.build)
    summary["model"], summary["tokenizer"] = run.model, run.tokenizer
    return summary


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float, foreach: bool = False) -> float:
    """Clip the global gradient norm; returns the norm before clipping. For sharded parameters the
    norm torch computes is a distributed tensor over the ranks' shards: its full value is taken.
    `foreach`: one kernel over all tensors (plain tensors; torch's default loops on CPU)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True if foreach else None)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.item()


def read_metrics(out: str | os.PathLike) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# Also importable from here: the run's settings, its checks and what stops it.
__all__ = ["TrainConfig", "NonFiniteError", "DiskFullError", "train", "check_run", "lr_at", "read_metrics",
           "prepare_for_training", "save_checkpoint", "load_checkpoint"]
