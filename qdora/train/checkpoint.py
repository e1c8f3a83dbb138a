"""Training checkpoints: one format for one process and for FSDP, safetensors and JSON only.

A checkpoint folder holds

    trainable.safetensors   every trainable tensor, whole, by parameter name
    optimizer.safetensors   the optimizer's tensors, whole, as `<parameter name>::<key>` (AdamW:
                            exp_avg, exp_avg_sq, step)
    rng-rank<r>.safetensors each process's torch RNG states
    state.json              step, Python RNG, schedule, totals, the optimizer's scalars and groups

Under FSDP every tensor is gathered whole before it is written (rank 0 writes; the others write
only their RNG states), so a checkpoint does not depend on how many processes wrote it: a run
checkpointed by one process resumes under FSDP with several, and back (each rank takes its shard
of the whole tensors). The folder is built under a temporary name and swapped in when complete, so
a crash at any point leaves the previous checkpoint. Nothing here is ever pickled or unpickled.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from qdora.core.safetensors_io import (
    atomic_dir,
    check_safetensors_file,
    previous_copies,
    save_file_atomic,
    swap_in_dir,
    write_text_atomic,
)
from qdora.train.fsdp import gather_trainable, world_size
from qdora.train.fsdp import rank as fsdp_rank

CHECKPOINT = "checkpoint"
FILES = ("trainable.safetensors", "optimizer.safetensors")


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def python_random_state() -> list:
    return _jsonable(random.getstate())


def rng_states() -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    return rng


def set_rng_states(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])


def _whole_state(model, optimizer, names: dict[int, str], sharded: bool):
    """(trainable tensors, optimizer tensors, optimizer JSON), whole, keyed by parameter name; empty
    on the ranks other than 0 of a sharded model (every rank must call it)."""
    if not sharded:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        state = optimizer.state_dict()
        per_name = {names[idx]: values for idx, values in state["state"].items()}
        groups = state["param_groups"]
    else:
        trainable = gather_trainable(model)
        state = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if fsdp_rank() != 0:
            return {}, {}, {}
        per_name, groups = state["state"], state["param_groups"]
    tensors, scalars = {}, {}
    for name, values in per_name.items():
        for key, value in values.items():
            # bitsandbytes' 8-bit optimizers nest their quantization state in a dict: one level, `key/sub`
            items = {f"{key}/{sub}": v for sub, v in value.items()} if isinstance(value, dict) else {key: value}
            for field, item in items.items():
                if torch.is_tensor(item):
                    tensors[f"{name}::{field}"] = item.detach().cpu().contiguous()
                else:
                    scalars[f"{name}::{field}"] = item
    meta = {"scalars": scalars, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups]}
    return trainable, tensors, meta


def save_checkpoint(folder: str | Path, model, optimizer, names: dict[int, str], run_state: dict,
                    sharded: bool = False) -> Path:
    """Write checkpoint `folder` atomically (see the module docstring). `names`: parameter index ->
    name, in the optimizer's order; `run_state`: the JSON-able position of the run (step, schedule,
    totals); `sharded`: the model is FSDP-sharded and every rank calls this."""
    folder = Path(folder)
    trainable, tensors, meta = _whole_state(model, optimizer, names, sharded)
    if not sharded:
        with atomic_dir(folder) as tmp:
            _write(tmp, trainable, tensors, meta, run_state, world_size=1)
            save_file_atomic(rng_states(), tmp / "rng-rank0.safetensors")
        return folder

    tmp = folder.with_name(f"{folder.name}.tmp-sharded")
    if fsdp_rank() == 0:
        if tmp.exists():  # left by a run that died while saving
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_file_atomic(rng_states(), tmp / f"rng-rank{fsdp_rank()}.safetensors")
    dist.barrier()
    if fsdp_rank() == 0:
        _write(tmp, trainable, tensors, meta, run_state, world_size=world_size())
        swap_in_dir(tmp, folder)
    dist.barrier()
    return folder


def _write(tmp: Path, trainable, tensors, meta, run_state: dict, world_size: int) -> None:
    save_file_atomic(trainable, tmp / "trainable.safetensors")
    save_file_atomic(tensors, tmp / "optimizer.safetensors")
    state = {**run_state, "python_random": python_random_state(), "optimizer": meta, "world_size": world_size}
    write_text_atomic(tmp / "state.json", json.dumps(state, indent=1) + "\n")  # last: the folder is complete


def find_checkpoint(out: Path) -> Path | None:
    # .old-<pid>: a crash between swap_in_dir's two renames left the previous checkpoint there
    for path in (out / CHECKPOINT, *previous_copies(out / CHECKPOINT)):
        if (path / "state.json").is_file():
            return path
    return None


def _way_out(path: Path) -> str:
    return (f"this checkpoint cannot be resumed: restore it from a copy, or delete {path} and start the "
            "run again without --resume")


def check_checkpoint(path: Path) -> dict:
    """Check that checkpoint folder `path` can be read (its `state.json` and the headers of its
    files), before any model is loaded; returns its state. Every problem names the file and the
    way out."""
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path / 'state.json'}: unreadable ({err}); {_way_out(path)}") from err
    if state.get("sharded"):
        raise ValueError(f"{path} was written by an earlier qdora's FSDP format (torch.distributed.checkpoint), "
                         "which this version does not read; start the run again without --resume")
    for file in [path / f for f in FILES] + sorted(path.glob("rng-rank*.safetensors")):
        check_safetensors_file(file, _way_out(path))
    return state


def load_checkpoint(path: Path, model, optimizer, names: dict[int, str], sharded: bool = False) -> dict:
    """Load checkpoint `path` into `model` and `optimizer` (sharded: every rank takes its shard of
    the whole tensors) and restore this process's RNG states (a rank the checkpoint has no states
    for keeps its own). Returns the saved run state (`step`, `totals`, ...)."""
    state = json.loads((path / "state.json").read_text())
    trainable = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in trainable)
    unknown = sorted(n for n in trainable if n not in params)
    if missing or unknown:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unknown {unknown[:3]})")
    per_name: dict[str, dict] = {}
    for key, value in list(load_file(str(path / "optimizer.safetensors")).items()) \
            + list(state["optimizer"]["scalars"].items()):
        name, _, field = key.rpartition("::")
        outer, _, inner = field.partition("/")
        if inner:  # a nested state (see _whole_state)
            per_name.setdefault(name, {}).setdefault(outer, {})[inner] = value
        else:
            per_name.setdefault(name, {})[field] = value
    saved_groups = state["optimizer"]["param_groups"]
    rank = 0
    if not sharded:
        with torch.no_grad():
            for n, t in trainable.items():
                params[n].copy_(t)
        by_name = {name: idx for idx, name in names.items()}
        groups = optimizer.state_dict()["param_groups"]
        for group, saved in zip(groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        optimizer.load_state_dict({"state": {by_name[n]: v for n, v in per_name.items()}, "param_groups": groups})
    else:
        rank = fsdp_rank()
        whole = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, trainable, options=whole)
        ordered = [names[i] for i in sorted(names)]
        groups, start = [], 0
        for group, saved in zip(optimizer.param_groups, saved_groups):
            count = len(group["params"])
            settings = {k: v for k, v in saved.items() if k != "params"}
            groups.append({**settings, "params": ordered[start:start + count]})
            start += count
        set_optimizer_state_dict(model, optimizer, {"state": per_name, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_states(load_file(str(rng_file)))
    random.setstate(_tupled(state["python_random"]))
    return state
