"""What the harness and the benchmarks share: PEFT's baselines, built the same way everywhere, the
peak resident memory of this process or of a child, and the one way to run work in a fresh process."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

import qdora
from qdora.core.config import AdapterConfig
from qdora.data.examples import DEMO_DATA, SFTDataset, collate, load_records, pad_token_id
from qdora.models.loading import check_model_path, load_model, resolve_checkpoint, smollm2_gguf_path

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def peft_on_qdora_nf4(path, r: int, alpha: float, dropout: float, use_dora: bool,
                      target_modules: Sequence[str] = TARGETS, device: str | torch.device = "cpu"):
    """PEFT's LoRA/DoRA (`LoraConfig`) over the NF4 base qdora's loader builds from `path`: the same
    quantized weights qdora's own methods train on, so the two are compared like with like.
    Returns `(peft_model, tokenizer)`."""
    import peft  # optional: only this path uses PEFT

    model, tok = load_model(path, method="qlora", cfg=AdapterConfig(method="qlora"), add=False, device=device,
                            progress=False)
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                      use_dora=use_dora, target_modules=list(target_modules),
                                                      task_type="CAUSAL_LM")), tok


def peft_on_bnb_4bit(path, r: int, alpha: float, dropout: float, use_dora: bool,
                     target_modules: Sequence[str] = TARGETS):
    """PEFT's LoRA/DoRA over the 4-bit base transformers itself loads with `BitsAndBytesConfig`
    (NF4, double quantization), as a PEFT user loads it; kept in bitsandbytes' standard layout
    (`qdora.keep_standard_layout`: PEFT's DoRA misreads repacked weights). Returns the PEFT model."""
    import peft  # optional: only this path uses PEFT
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # heavy, used here only

    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(
        path, dtype=compute, device_map=device,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute))
    qdora.keep_standard_layout(base)
    torch.manual_seed(0)
    return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora,
                                                     target_modules=list(target_modules), task_type="CAUSAL_LM"))


def proc_status(field: str) -> int | None:
    """A byte count from /proc/self/status (`VmRSS`, `VmHWM`), or None where there is none."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return it, or None where
    /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return proc_status("VmRSS")
    except OSError:
        return None


def benchmark_model(path: str | None) -> str:
    """The checkpoint folder a benchmark runs on: `path` (a `.gguf` file converted once), or
    SmolLM2-135M-Instruct when none is given."""
    if path is None:
        return str(resolve_checkpoint(smollm2_gguf_path(), progress=False))
    check_model_path(path)
    return str(resolve_checkpoint(path, progress=False))


def demo_batch(tokenizer, batch_size: int, cutoff_len: int) -> dict[str, torch.Tensor]:
    """The benchmarks' batch: the first `batch_size` examples of the bundled ARC-Easy slice."""
    records = load_records(DEMO_DATA / "arc_easy_train.json")[:batch_size]
    return collate(SFTDataset(records, tokenizer, cutoff_len).examples, pad_token_id(tokenizer))


@dataclass
class Child:
    """What a finished child process left: its output (when captured) and its peak resident memory."""

    stdout: str
    stderr: str
    peak_rss_bytes: int


class Stopped(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM or SIGHUP) stopped `run_child`: it was passed on to the child, which ended."""

    def __init__(self, signum: int, what: str):
        super().__init__(f"{what}: stopped by {signal.Signals(signum).name}")
        self.signum = signum


class ChildFailed(RuntimeError):
    """`run_child`'s child failed. `exit_status`, where it is one line's worth (qdora.cli reports it
    so): the child's own one-line report of a mistake the user can fix (2; 1 for a run that
    diverged), or 1 for a failure whose output (its traceback) is on the terminal above."""

    def __init__(self, message: str, exit_status: int | None = None):
        super().__init__(message)
        self.exit_status = exit_status


ERROR_FILE = "QDORA_ERROR_FILE"
"""The variable that names, in `run_child`'s child, a file for the one line of a mistake the user
can fix: `qdora.cli.main` writes it there instead of printing it (spelled out there too: the
command line may not import this module)."""


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent():
    """A `preexec_fn` that has the kernel send the child SIGTERM when this thread (the one that
    forks) ends, however it ends (SIGKILL included), or None where there is no such thing. Linux
    only: elsewhere (macOS) a parent killed outright leaves its child running. Everything it calls
    is looked up before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, getppid, exit_now = os.getpid(), os.getppid, os._exit
    option, sig = ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGTERM)

    def preexec():
        prctl(option, sig)
        if getppid() != parent:  # the parent died before the signal was set: it will never come
            exit_now(128 + signal.SIGTERM)
    return preexec


def run_child(args: Sequence[str], what: str, capture: bool = False, env: dict | None = None,
              timeout: float | None = None, cwd: str | None = None, hint: str = "") -> Child:
    """Run `python *args` in a fresh process (so its peak memory is its own and no state crosses
    over) and wait for it. Its peak RSS comes from the kernel's accounting of that one child
    (`wait4`'s `ru_maxrss`). Output goes to this terminal, or with `capture` into `Child`. A failure
    or a timeout stops the child and raises `ChildFailed` naming `what` (and `hint`), or carrying
    the one line that a child running `qdora.cli` gave for a mistake the user can fix (`ERROR_FILE`).
    The child has a process group of its own, so a terminal's Ctrl-C reaches it once, through this
    process: SIGINT and SIGTERM here are passed on to it (a training child writes its checkpoint),
    SIGHUP (a closed terminal, a dropped SSH session) as SIGTERM; each is waited for, then raises
    `Stopped`. A signal this process ignores (nohup's SIGHUP) stays ignored. The child never outlives
    this call: on Linux, if this process dies without a word (SIGKILL), the kernel sends it SIGTERM."""
    with (tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err,
          tempfile.NamedTemporaryFile("w+", suffix=".json") as told):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", ERROR_FILE: told.name, **(env or {})}
        proc = subprocess.Popen([sys.executable, *args], stdout=out if capture else None,
                                stderr=err if capture else None, env=env, cwd=cwd, process_group=0,
                                preexec_fn=_die_with_parent())
        got: list[int] = []

        def pass_on(signum, frame):
            got.append(signum)
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)  # a second: "stop now"
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                        if signal.getsignal(sig) is not signal.SIG_IGN}
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        try:
            if timer:
                timer.start()
            _, status, usage = os.wait4(proc.pid, 0)  # retried after a handled signal (PEP 475)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        child = Child(out.read(), err.read(), usage.ru_maxrss * 1024)  # ru_maxrss: KiB on Linux
        report = json.loads(told.read() or "null") if code != 0 else None  # the child's own file (same inode)
    if got:
        raise Stopped(got[0], what)
    if report:
        raise ChildFailed(f"{what}: {report['message']}", report["status"])
    if code != 0:
        why = f"stopped after {timeout:g} s" if timer and code < 0 else f"exit code {code}"
        where = f"\n{child.stderr[-3000:]}" if capture else " (its output is above)"
        raise ChildFailed(f"{what} failed ({why}){'; ' + hint if hint else ''}{where}", None if capture else 1)
    return child
