"""Run under `torchrun --nproc-per-node 2` by tests/test_fsdp.py: one or more `qdora.train.loop` runs
with `fsdp=True`, described by a JSON file (argv[1]):

    {"runs": [{"config": {...TrainConfig fields...},
               "peft_adapter": "<folder>"           # also gather the adapter in PEFT's format
               "crash_in_save_at": 4,               # rank 1 dies while writing checkpoint 4
               "sigterm_rank1_at": 2,               # rank 1 alone gets SIGTERM after step 2
               "measure_start": true,               # peak live tensor bytes of the start (profiler)
               "seed_rank1": 1,                     # rank 1 draws other adapters
               "expect_error": true}]}              # the run must fail: record the error, go on

Each rank writes `<out>/facts-rank<r>.json`: what the tests check about sharding and loading.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.fsdp

import qdora.models.loading
import qdora.train.checkpoint
import qdora.train.fsdp
from qdora.eval.bench.memory import peak_bytes
from qdora.train.fsdp import save_adapter_gathered
from qdora.train.loop import TrainConfig, train


def facts(model, load_calls: int, stream_calls: int, start: list[str]) -> dict:
    """How this rank holds the model: which parameters are sharded and how much of each it keeps,
    and how it got there (`start`: what it read and sharded, in order)."""
    from torch.distributed.tensor import DTensor

    layers = model.model.layers
    packed = [p for n, p in layers.named_parameters() if n.endswith("base_layer.weight") or
              (n.endswith("weight") and not p.requires_grad and p.dtype == torch.uint8)]
    params = list(model.parameters())
    return {
        "load_model_calls": load_calls,
        "stream_model_calls": stream_calls,
        "start": start,
        "all_dtensor": all(isinstance(p, DTensor) for p in params),
        "local_fraction": sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params),
        "packed_dtypes": sorted({str(p.dtype) for p in packed}),
        "packed_count": len(packed),
        "gradient_checkpointing": bool(getattr(model, "is_activation_checkpointing", None)
                                      or getattr(model, "is_gradient_checkpointing", False)),
        "fsdp_layers": sum(type(m).__name__.startswith("FSDP") for m in layers),
        # FSDP2's record of CPU offload per parameter, and where this rank's shards actually live.
        "offload_to_cpu": sorted({fp.offload_to_cpu for g in model._get_fsdp_state()._fsdp_param_groups
                                  for fp in g.fsdp_params}),
        "shard_devices": sorted({str(p.to_local().device) for p in params}),
    }


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    calls = {"load": 0, "stream": 0, "tiled": 0}
    start: list[str] = []  # "read layer <i>" / "read root" / "shard <class>", consecutive repeats merged

    def event(what: str) -> None:
        if not start or start[-1] != what:
            start.append(what)

    real_tiles = qdora.models.tiled_mlp.tiles_forward

    def tiles_forward(fn, tile_tokens, x):  # counts the calls that ran in more than one tile of rows
        calls["tiled"] += x.numel() // x.shape[-1] > tile_tokens
        return real_tiles(fn, tile_tokens, x)

    qdora.models.tiled_mlp.tiles_forward = tiles_forward

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    qdora.models.loading.load_model = counting("load", qdora.models.loading.load_model)
    qdora.models.loading.stream_model = counting("stream", qdora.models.loading.stream_model)
    real_place, real_shard = qdora.models.loading.CheckpointModel.place, torch.distributed.fsdp.fully_shard

    def place(self, key, tensor):
        parts = key.split(".")
        event(f"read layer {parts[2]}" if key.startswith("model.layers.") else "read root")
        return real_place(self, key, tensor)

    def fully_shard(module, *args, **kwargs):
        event(f"shard {type(module).__name__}")
        return real_shard(module, *args, **kwargs)

    qdora.models.loading.CheckpointModel.place = place
    qdora.train.fsdp.fully_shard = fully_shard  # the name qdora.train.fsdp calls
    real_build = qdora.train.fsdp.build_sharded
    start_peak = [None]
    for run in spec["runs"]:
        calls.update(load=0, stream=0, tiled=0)
        start_peak[0] = None
        start.clear()
        cfg = TrainConfig(**run["config"])
        if run.get("seed_rank1") is not None and dist.get_rank() == 1:
            cfg = TrainConfig(**{**run["config"], "seed": run["seed_rank1"]})
        crash_at = run.get("crash_in_save_at")
        real_save = qdora.train.checkpoint.save_file_atomic

        def save(tensors, path, *args, **kwargs):
            # Rank 1 dies after its shard of checkpoint `crash_at` is written, before the folder is swapped in.
            if str(path).endswith("rng-rank1.safetensors") and state["step"] == crash_at:
                os._exit(3)
            return real_save(tensors, path, *args, **kwargs)

        def on_step(step, _):
            state.update(step=step)
            if step == run.get("sigterm_rank1_at") and dist.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler stopping one process would

        state = {"step": 0}
        if run.get("measure_start"):
            def measured_build(*args, **kwargs):
                out = []
                mapped = frozenset(f.stat().st_size for f in Path(cfg.model).glob("*.safetensors"))
                start_peak[0] = peak_bytes(lambda: out.append(real_build(*args, **kwargs)), mapped_sizes=mapped)
                return out[0]
            qdora.train.fsdp.build_sharded = measured_build
        qdora.train.checkpoint.save_file_atomic = save
        try:
            summary = train(cfg, on_step=on_step)
        except (RuntimeError, OSError, ValueError) as err:
            if not run.get("expect_error"):
                raise
            summary = {"start_error": f"{type(err).__name__}: {err}"}
        finally:
            qdora.train.checkpoint.save_file_atomic = real_save
            qdora.train.fsdp.build_sharded = real_build
        if "start_error" in summary:
            os.makedirs(cfg.out, exist_ok=True)
            with open(os.path.join(cfg.out, f"facts-rank{dist.get_rank()}.json"), "w") as f:
                json.dump(summary, f)
            continue
        model = summary["model"]
        if run.get("peft_adapter"):
            save_adapter_gathered(model, run["peft_adapter"], format="peft")
        with open(os.path.join(cfg.out, f"facts-rank{dist.get_rank()}.json"), "w") as f:
            json.dump({**facts(model, calls["load"], calls["stream"], start), "start_peak_bytes": start_peak[0],
                       "steps": summary["steps"], "interrupted": summary["interrupted"],
                       "tiled_calls": calls["tiled"]}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
