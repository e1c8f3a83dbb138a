"""Where a training run's progress goes: the terminal, metrics.jsonl, and on request metrics.csv
and TensorBoard; what it said at the start (the notes about its data, the attention implementation)
goes to run.log too (`write_header`), appended to on `--resume`.

On a terminal the progress is a bar; without one (output to a log file, CI) it is a plain line at
most every `progress_seconds`, and at the first and the last step, so a log shows the run as it
goes. metrics.jsonl gets a line every `log_every` steps (and at the last step, a validation or a
warning); metrics.csv the same rows with fixed columns; TensorBoard the same scalars.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from qdora.core.safetensors_io import write_text_atomic
from qdora.train.config import TrainConfig
from qdora.train.health import metrics_line

CSV_COLUMNS = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_s")
PREFERENCE_COLUMNS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "val_rewards/accuracies", "val_rewards/margins")
"""The columns (and TensorBoard scalars) a preference objective adds (`--objective dpo|simpo`)."""


def columns(objective: str) -> tuple[str, ...]:
    """metrics.csv's columns for a run of `objective`."""
    return CSV_COLUMNS + (PREFERENCE_COLUMNS if objective != "sft" else ())
RUN_LOG = "run.log"
"""The run folder's plain-text log: what each start of the run said (`write_header`)."""


def check_reporters(cfg: TrainConfig) -> None:
    """Raise now, before anything slow, if a `report_to` target cannot be written."""
    if "tensorboard" in cfg.report_to:
        try:
            import tensorboard  # noqa: F401  (optional: only --report-to tensorboard needs it)
        except ImportError:
            raise ImportError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or drop tensorboard from --report-to)") from None


def write_header(out: Path, lines: list[str], step: int = 0) -> None:
    """Write the lines a run printed at its start to `out/run.log` under a line that says when it
    started (a new run replaces the file; a resumed one, started at `step`, adds to it)."""
    path = Path(out) / RUN_LOG
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = f"qdora train: resumed at step {step}, {now}" if step else f"qdora train: started {now}"
    before = path.read_text() + "\n" if step and path.is_file() else ""
    write_text_atomic(path, before + "".join(line + "\n" for line in [head, *lines]))


def trim_csv(path: Path, last_step: int, objective: str = "sft") -> None:
    """Keep the rows of metrics.csv up to `last_step` (a resumed run replays what came after)."""
    if not path.is_file():
        return
    rows = list(csv.DictReader(path.read_text().splitlines()))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns(objective), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= last_step)
    write_text_atomic(path, out.getvalue())


class RunLog:
    """The run's progress, for the main process (the others log nothing)."""

    def __init__(self, cfg: TrainConfig, out: Path, main: bool, start: int):
        self.cfg, self.main, self.start = cfg, main, start
        show = cfg.progress and main
        self.terminal = show and sys.stderr.isatty()
        self.plain = show and not self.terminal
        self.bar = tqdm(total=cfg.max_steps, initial=start, desc=f"train {cfg.method}", unit="step",
                        disable=not self.terminal)
        self.t0 = time.perf_counter()
        self.last_line = -float("inf")
        self.metrics = open(out / "metrics.jsonl", "a") if main else None
        self.csv = self.tensorboard = None
        if main and "csv" in cfg.report_to:
            path = out / "metrics.csv"
            new = not path.is_file() or path.stat().st_size == 0
            self.csv_file = open(path, "a", newline="")
            self.csv = csv.DictWriter(self.csv_file, columns(cfg.objective), extrasaction="ignore")
            if new:
                self.csv.writeheader()
        if main and "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
            # purge_step: a resumed run's events replace those written after its checkpoint
            self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)

    def warn(self, message: str) -> None:
        if self.main:
            self.bar.write(f"qdora train: warning: {message}", file=sys.stderr)

    def step(self, record: dict, write: bool) -> None:
        """After a step: the bar or plain line, and (`write`) the metrics files."""
        if not self.main:
            return
        step = record["step"]
        if write:
            self.metrics.write(metrics_line(record))
            self.metrics.flush()
            if self.csv is not None:
                self.csv.writerow({k: record.get(k, "") for k in self.csv.fieldnames})
                self.csv_file.flush()
            if self.tensorboard is not None:
                for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", *PREFERENCE_COLUMNS):
                    if isinstance(record.get(key), (int, float)):
                        tag = "eval/loss" if key == "val_loss" else (
                            f"eval/{key.removeprefix('val_')}" if key.startswith("val_") else f"train/{key}")
                        self.tensorboard.add_scalar(tag, record[key], step)
                self.tensorboard.flush()
        post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", "tok_s": f"{record['tokens_per_s']:.0f}"}
        if "val_loss" in record:
            post["val"] = f"{record['val_loss']:.4f}"
        self.bar.update(1)
        self.bar.set_postfix(post)
        now = time.perf_counter()
        last = step in (self.start + 1, self.cfg.max_steps)
        if self.plain and (last or "val_loss" in record or now - self.last_line >= self.cfg.progress_seconds):
            self.last_line = now
            elapsed = now - self.t0
            eta = elapsed / (step - self.start) * (self.cfg.max_steps - step)
            val = f", val loss {record['val_loss']:.4f}" if "val_loss" in record else ""
            print(f"qdora train: step {step}/{self.cfg.max_steps}, loss {record['loss']:.4f}{val}, "
                  f"lr {record['lr']:.2e}, {record['tokens_per_s']:.0f} tokens/s, {elapsed:.0f} s elapsed, "
                  f"~{eta:.0f} s left", file=sys.stderr, flush=True)

    def write_error(self, record: dict) -> None:
        if self.main:
            self.metrics.write(metrics_line(record))
            self.metrics.flush()

    def flush(self) -> None:
        if self.main:
            self.metrics.flush()

    def close(self) -> None:
        self.bar.close()
        if self.main:
            self.metrics.close()
            if self.csv is not None:
                self.csv_file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
