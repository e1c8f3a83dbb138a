"""Peak memory of a piece of work, measured as live tensor bytes.

On CPU there is no allocator counter like `torch.cuda.max_memory_allocated`, and process RSS
hides freed-but-kept heap pages. The PyTorch profiler's memory timeline records every tensor
allocation and free; replaying it gives the exact peak of tensor bytes allocated by the work
(tensors that existed before it, such as weights and inputs, are not counted). On CUDA the
allocator's own counters are used.

`step_peak_bytes` is the light form for long steps: the profiler's allocation events alone (no shapes, no
stacks, no timeline analysis), summed in time order. It counts a free of a tensor made before the work
(the timeline leaves those out); in a training step that starts and ends without gradients there are
none to count, and both give the same figure (`tests/test_memory_measure.py`).

`heap_peak_bytes` is the lightest: memray (Bloomberg's allocation tracker) intercepts the process's
malloc, free and mmap calls, every thread's, and keeps only their running sum's high-water mark, so
a step runs at nearly its own speed and leaves a file of a few kilobytes, where the profiler's events of
a 32K-token step outgrow this machine's memory. It counts every heap byte the work allocates, not only
tensors: Python objects, library buffers and autograd's graph beside them, measured against
`step_peak_bytes` at 0.17 to 0.35 MiB on small-llama3 training steps and 12.6 MiB (1.2%) on SmolLM2's
8,192-token tiled-layers step (docs/planner.md; `tests/test_memory_measure.py` bounds it on a tiny step).
Frees of memory allocated before the work are left out, as `peak_bytes` leaves them out.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

from qdora.core.nf4 import quant_state_tensors


def step_peak_bytes(work: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors allocated by `work()` and alive at the same time, above those alive before it,
    from the profiler's allocation events in time order (see the module docstring); on CUDA `peak_bytes`."""
    device = torch.device(device)
    if device.type == "cuda":
        return peak_bytes(work, device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def heap_peak_bytes(work: Callable[[], object]) -> int:
    """Peak bytes of host heap allocated by `work()` and alive at the same time (every thread's), by memray
    (see the module docstring). Host memory only: on CUDA use `peak_bytes`."""
    try:
        import memray  # the dev extra; imported here so that the other measures need none of it
    except ImportError:
        raise SystemExit("heap_peak_bytes needs memray: pip install memray (the dev extra installs it)") from None
    fd, path = tempfile.mkstemp(suffix=".memray")
    os.close(fd)
    os.remove(path)  # memray writes a file it creates itself
    try:
        with memray.Tracker(path, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS, native_traces=False):
            work()
        return memray.FileReader(path).metadata.peak_memory
    finally:
        if os.path.exists(path):
            os.remove(path)


def peak_bytes(work: Callable[[], object], device: torch.device | str = "cpu",
               mapped_sizes: frozenset[int] = frozenset()) -> int:
    """Peak bytes of tensors allocated by `work()` and alive at the same time. On CPU, storages of a
    size in `mapped_sizes` are left out: safetensors maps a whole checkpoint file as one storage,
    which the profiler reports as an allocation of the file's size, but its pages are the file's
    (page cache, and host memory even when the model is on a GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        work()
    live = peak = 0
    created = set()
    for _, action, key, size in prof._memory_profile().timeline:
        tensor = key[0] if isinstance(key, tuple) else key
        if action == Action.CREATE and size not in mapped_sizes:
            created.add(tensor)
            live += size
        elif action == Action.DESTROY and tensor in created:  # ignore frees of older tensors
            created.discard(tensor)
            live -= size
        peak = max(peak, live)
    return peak


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (NF4 packed data and quant state included)."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor):
            return
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for t in list(module.parameters()) + list(module.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for s in quant_state_tensors(state):
                add(s)
    return total
