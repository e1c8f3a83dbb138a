"""The three CPU peak-memory measures of qdora.eval.bench.memory, held to allocations of known size and to
each other on one training step: the profiler's timeline (`peak_bytes`), its allocation events alone
(`step_peak_bytes`) and memray's heap high-water mark (`heap_peak_bytes`)."""

import threading

import pytest
import torch
from models import build, llama3_config

import qdora
from qdora.core.config import AdapterConfig
from qdora.eval.bench.memory import heap_peak_bytes, peak_bytes, step_peak_bytes
from qdora.eval.plan.validate import MEASURES, Case, measure
from qdora.plan.memory import PlanConfig

MiB = 2**20
# memray counts the heap beside the tensors too (Python objects, a thread's own buffers); measured: 0.02 MiB over
# the known allocations below, 0.16 MiB over the profiler's events on the training step below (a fresh process),
# 0.17 to 0.35 MiB on the tiled-layers validation steps (eval/plan/validate.py --only tiled).
HEAP_SLACK = 1 * MiB


def known_work(keep: list):
    """Frees a tensor made before it, then allocates 16 + 4 MiB here and 8 MiB in another thread, with
    16 + 4 + 8 = 28 MiB alive at once; keeps nothing."""
    keep.pop()  # a free of older memory: not counted against the work's allocations
    a = torch.empty(16 * MiB, dtype=torch.uint8)
    b = torch.empty(4 * MiB, dtype=torch.uint8)
    other = []
    thread = threading.Thread(target=lambda: other.append(torch.empty(8 * MiB, dtype=torch.uint8)))
    thread.start()
    thread.join()
    del a, b
    other.clear()
    torch.empty(2 * MiB, dtype=torch.uint8)  # made and freed after the peak


def test_heap_peak_counts_every_thread_and_not_older_frees():
    keep = [torch.ones(10 * MiB, dtype=torch.uint8)]
    peak = heap_peak_bytes(lambda: known_work(keep))
    assert 28 * MiB <= peak <= 28 * MiB + HEAP_SLACK, peak / MiB


@pytest.mark.parametrize("measure_fn", [peak_bytes, step_peak_bytes], ids=["timeline", "events"])
def test_profiler_measures_count_known_tensors(measure_fn):
    """The profiler's two readings, on tensors allocated in the work's own thread (its events are the
    calling thread's)."""
    def work():
        a = torch.empty(16 * MiB, dtype=torch.uint8)
        b = torch.empty(4 * MiB, dtype=torch.uint8)
        del a, b
        torch.empty(2 * MiB, dtype=torch.uint8)
    assert measure_fn(work) == 20 * MiB


def test_the_three_measures_agree_on_a_training_step():
    """One step of a QDoRA model (forward, backward, AdamW, zero_grad): the timeline and the events give the
    same bytes (the step frees nothing it did not make); memray's heap peak adds only the heap beside them."""
    torch.manual_seed(0)
    model = build(llama3_config(max_position_embeddings=512)).train()
    qdora.add_adapters(model, AdapterConfig(method="qdora", r=8, alpha=16, dropout=0.05), verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 1024, (2, 256), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer states now exist
    # the heap first: after the profiler has run once, the next step's heap holds 1 MiB more (measured here,
    # a buffer made once), which would be neither the step's tensors nor its heap
    heap = heap_peak_bytes(step)
    timeline, events = peak_bytes(step), step_peak_bytes(step)
    assert timeline == events
    assert events <= heap <= events + HEAP_SLACK, (events / MiB, heap / MiB)


def test_validate_measure_names_the_bad_measure():
    with pytest.raises(ValueError, match="how='rss'.*timeline, events, heap"):
        measure(Case("tiny-llama3", PlanConfig(method="qdora", batch_size=1, seq_len=16, device="cpu")), how="rss")
    assert set(MEASURES) == {"timeline", "events", "heap"}
