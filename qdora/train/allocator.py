"""The host memory allocator of a training process: jemalloc where the system has it.

Why: glibc's malloc keeps the memory a training step frees and reuses it badly. A step allocates and
frees tensors of many sizes (each layer's recompute, its gradients, the loss chunks); freed blocks
between longer-lived ones (the checkpointed layer inputs, the adapters' gradients) stay in the heap as
holes too small for the next sequence-sized tensor, so the heap grows past the live tensors and never
shrinks. Measured on SmolLM2-135M QDoRA, batch 1, one step (docs/benchmarks.md, "Long sequences"):
at 4,096 tokens the process's peak resident set was 3.35 GB with glibc, 1.53 GB with jemalloc, at
the same step time. glibc's own remedy (`M_MMAP_THRESHOLD` at 1 MiB: every tensor a fresh mapping,
returned on free) gave 1.20 GB at 2,048 tokens but a step 35% slower, every page faulted in again.

jemalloc's size classes keep the holes reusable; it is told never to return freed pages to the system
(`dirty_decay_ms:-1,muzzy_decay_ms:-1`), so that nothing is faulted in twice: the process holds its
peak, which is what a training step needs anyway. `qdora train` (the command, not `qdora.train.train`
called from Python) starts itself again with jemalloc preloaded when the system has it (Debian and
Ubuntu: `apt install libjemalloc2`) and it is not loaded yet; `QDORA_ALLOCATOR=system` keeps the
system's malloc. The run log names the allocator.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

DEFAULT_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
"""jemalloc's settings when the environment gives none (`MALLOC_CONF`): freed pages are kept for reuse."""


def jemalloc_library() -> str | None:
    """The name the dynamic loader finds jemalloc by, or None where the system has none."""
    return ctypes.util.find_library("jemalloc") if sys.platform.startswith("linux") else None


def loaded() -> str:
    """The allocator this process runs on: "jemalloc" if the library is mapped into it, else "system malloc"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system malloc"
    return "jemalloc" if "libjemalloc" in maps else "system malloc"


def preload_env(environ: dict[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to start this process again in with jemalloc preloaded, or None to go on as it is:
    no library, `QDORA_ALLOCATOR=system`, or jemalloc already preloaded (the restarted process itself)."""
    if library is None or environ.get("QDORA_ALLOCATOR", "jemalloc") != "jemalloc":
        return None
    preload = environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload:
        return None
    return {**environ, "LD_PRELOAD": f"{library} {preload}".strip(), "MALLOC_CONF": environ.get("MALLOC_CONF")
            or DEFAULT_CONF}


def restart_with_jemalloc(argv: list[str]) -> None:
    """Start `python -m qdora.cli ARGV` in place of this process with jemalloc preloaded (`preload_env`); return
    where that is not to be done. The process keeps its id, its open files and its terminal."""
    env = preload_env(dict(os.environ), jemalloc_library())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "qdora.cli", *argv], env)
