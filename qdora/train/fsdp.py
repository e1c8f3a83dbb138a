"""Multi-process training with PyTorch FSDP2 (`fully_shard`) over the decoder layers.

What has to change for an NF4 model to be sharded:

- FSDP2 turns every parameter into a `DTensor` shard and, during forward/backward, into a plain
  unsharded tensor: bitsandbytes' `Params4bit` subclass and the `quant_state` attribute it carries
  are lost. So the packed NF4 data becomes a plain frozen parameter (of the `quant_storage` dtype),
  and the quantization state lives on the module (`Linear4bit.quant_state`, which `RowBlocks`
  reads): it is not a parameter, so every rank keeps all of it (absmax etc.: 1/64 of the weight
  size with double quantization, 1/16 without). The row-block reader always reads the module's
  current `weight`, which inside a forward or backward pass is the all-gathered, unsharded one.
- Frozen NF4 layers without an adapter compute through the same autograd function as the adapters
  (no `A`, `B`, `m`), so bitsandbytes' own forward, which rebuilds `Params4bit`, never runs.
- Mixed precision (CUDA): parameters are all-gathered in bf16 and gradients reduced in fp32;
  the packed data must then be stored as bf16 (`quant_storage='bfloat16'`) so the cast is a
  no-op. On CPU everything stays in its own dtype (fp32 compute, uint8 packed data).

Low-memory start (`build_sharded`): every rank streams the checkpoint one decoder layer at a time
(`qdora.models.loading.stream_model`). It reads the layer's tensors, quantizes them, adds the layer's
adapters (drawn from the same seed in the same order on every rank, and as in a single process),
makes the layer shardable and calls `fully_shard` on it, which keeps this rank's dim-0 chunk of
each parameter (in CPU memory with offload) and drops the rest; then the next layer. The root
(embeddings, final norm, head) is read and sharded last. A rank's device holds at most its shards
so far, every layer's quantization state (small, kept whole), and one layer whole (or the root);
no rank ever holds the whole model, and nothing is sent between ranks but a checksum per layer
(the ranks must have built the same bytes: a mismatch stops the run with an error).

Gradients: the trainable adapters are sharded like everything else; FSDP reduce-scatters their
gradients and divides by the world size. Each rank's loss is its share of the *global* token-mean
loss times the world size (see `qdora.train.loop`), so the averaged gradient equals the gradient of
the single-process loss on the whole batch.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from qdora.core.layer import QDoRALinear, frozen_forward
from qdora.core.nf4 import RowBlocks, quant_state_tensors
from qdora.models import loading
from qdora.models.adapter_io import save_adapter
from qdora.models.loading import decoder_layers

DEFAULT_TIMEOUT_S = 600
"""Seconds a collective may wait for a peer before it fails (so a crashed rank never hangs the rest)."""


# ---- process group ----------------------------------------------------------------------------

def launched_distributed() -> bool:
    """True when started by `torchrun` (or `accelerate launch --multi_gpu`, which uses it): RANK and
    WORLD_SIZE are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(timeout_s: float | None = None, cpu_offload: bool = False) -> torch.device:
    """Join the process group the launcher describes (NCCL on CUDA, gloo on CPU); return this rank's
    device. `timeout_s` (default `QDORA_DIST_TIMEOUT` or 600 s) bounds every collective.
    `cpu_offload` on CUDA adds gloo for CPU tensors: with the shards in CPU memory, the gradient
    norm and the gathered adapter are collectives on CPU tensors, which NCCL cannot run."""
    if not launched_distributed():
        raise ValueError("--fsdp needs a multi-process launcher: run e.g. "
                         "`torchrun --standalone --nproc-per-node 2 -m qdora.cli -- train --fsdp ...` "
                         "(the `--` keeps torchrun from reading qdora's flags)")
    if timeout_s is None:
        timeout_s = float(os.environ.get("QDORA_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Elementwise sum (or `op="max"`) of `values` over the ranks, in fp64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


# ---- NF4 layers FSDP can shard ------------------------------------------------------------------

class ShardableLinear4bit(bnb.nn.Linear4bit):
    """A frozen NF4 linear layer whose packed weight is a plain parameter and whose quantization
    state is `self.quant_state`. Forward is `qdora.core.function.DoRAFunction` with no adapter:
    `y = x·W0ᵀ + bias`, W0 dequantized row block by row block (backward: `dx = dy·W0`)."""

    _blocks: RowBlocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 on CPU (bf16 matmuls are very slow there); on CUDA the dtype FSDP computes in.
        return frozen_forward(self._blocks, self.bias, x, torch.float32 if x.device.type == "cpu" else x.dtype)


def _plain_weight(layer: bnb.nn.Linear4bit) -> None:
    """Move the quantization state onto the module and the packed data into a plain parameter."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        state = getattr(layer, "quant_state", None)
    if state is None:
        raise ValueError(f"{type(layer).__name__} has no quantization state; quantize it before sharding")
    layer.quant_state = state
    if isinstance(weight, bnb.nn.Params4bit):
        layer.weight = nn.Parameter(weight.data, requires_grad=False)


def prepare_for_fsdp(model: nn.Module, param_dtype: torch.dtype | None, block_rows: int = 1024) -> nn.Module:
    """Make every NF4 layer of an adapted model shardable (see the module docstring). With mixed
    precision (`param_dtype`), the packed data must already be stored in that dtype."""

    adapter_bases = {id(m.base_layer) for m in model.modules() if isinstance(m, QDoRALinear)}
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit) or isinstance(module, ShardableLinear4bit):
            continue  # (a frozen layer already made shardable: `build_sharded` prepares layer by layer)
        storage = module.weight.dtype
        if param_dtype is not None and storage != param_dtype:
            raise ValueError(f"{name}: NF4 data stored as {storage}, but FSDP mixed precision all-gathers "
                             f"{param_dtype}; quantize with quant_storage='{str(param_dtype)[6:]}'")
        if id(module) not in adapter_bases:
            blocks = RowBlocks(module, block_rows)
            _plain_weight(module)
            module.__class__ = ShardableLinear4bit
            module._blocks = blocks
        else:
            _plain_weight(module)
    return model


def mixed_precision(device: torch.device):
    """bf16 parameters and compute, fp32 gradient reduction on CUDA; nothing cast on CPU."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def offload_policy(device: torch.device, cpu_offload: bool):
    """FSDP2's CPU offload: each rank's shards of the parameters, their gradients and the optimizer
    states live in CPU memory; a layer's shards are copied to the device just before its all-gather,
    gradients are copied back after the reduce-scatter, and the optimizer steps on the CPU. Pinned
    host memory on CUDA (asynchronous copies). On a CPU device it changes where nothing lives, but the
    same FSDP code path runs (what the CPU tests check)."""
    return CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()


def shard(model: nn.Module, device: torch.device, cpu_offload: bool = False) -> nn.Module:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, head)."""
    mp, offload = mixed_precision(device), offload_policy(device, cpu_offload)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mp_policy=mp, offload_policy=offload)
    return model


CHECKSUM_CHUNK = 1 << 18
"""Words summed at once by `_checksum`: its temporary is 8 bytes per word of a chunk (2 MiB at most)."""


def _checksum(tensors) -> int:
    """Sum of the raw bytes of `tensors` read as int32 words (uint8 where a tensor's size is not a
    multiple of 4): equal on two ranks holding the same bytes. Chunked, so a large tensor (the
    embeddings) costs no full-size temporary on the device."""
    total = 0
    for t in tensors:
        data = t.detach().contiguous().view(-1).view(torch.uint8)
        if data.numel() % 4 == 0:
            data = data.view(torch.int32)
        acc = torch.zeros((), dtype=torch.int64, device=data.device)
        for chunk in data.split(CHECKSUM_CHUNK):
            acc += chunk.sum(dtype=torch.int64)
        total = (total + int(acc)) % (1 << 62)  # stays an int64 whatever the model's size
    return total


def _whole_tensors(module: nn.Module) -> list[torch.Tensor]:
    """`module`'s parameters and buffers and its NF4 layers' quantization-state tensors, before sharding."""
    out = [p for p in module.parameters()] + [b for b in module.buffers()]
    for m in module.modules():
        state = getattr(m, "quant_state", None) if isinstance(m, bnb.nn.Linear4bit) else None
        if state is not None:
            out += quant_state_tensors(state)
    return out


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters a forward without a backward leaves behind (FSDP2 keeps the
    root's gathered until the backward that normally follows) and register the shards again."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def resolve_shared(path, device: torch.device, progress: bool = True) -> Path:
    """The checkpoint folder of `path` for every rank: a `.gguf` file is converted once, by rank 0,
    before anyone reads it, and a failure there reaches every rank at once (not after a timeout)."""
    failure = None
    if rank() == 0:
        try:
            loading.resolve_checkpoint(path, progress)
        except Exception as err:  # every rank must hear of it
            failure = err
    failed, = all_reduce([float(failure is not None)], device, op="max")
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(f"rank 0 could not open {path}; its error says why")
    return loading.resolve_checkpoint(path, progress=False)


def build_sharded(path, cfg, device: torch.device, cpu_offload: bool = False, dtype=None, progress: bool = True):
    """Every rank streams checkpoint `path` (a folder or a `.gguf` file) one decoder layer at a
    time (`qdora.models.loading.stream_model`): it quantizes the layer, adds its adapters `cfg`, makes it
    shardable and `fully_shard`s it, keeping only its own part; the root (embeddings, final norm,
    head) is sharded last. Returns `(model, tokenizer)`; see the module docstring (low-memory start)."""

    mp, offload = mixed_precision(device), offload_policy(device, cpu_offload)
    folder = resolve_shared(path, device, progress)
    digests: list[int] = []
    summed: set[int] = set()  # the layers' buffers and quantization states (they stay whole and alive)

    def on_layer(layer: nn.Module) -> None:
        prepare_for_fsdp(layer, mp.param_dtype)
        tensors = _whole_tensors(layer)
        summed.update(id(t) for t in tensors if not isinstance(t, nn.Parameter))
        digests.append(_checksum(tensors))
        fully_shard(layer, mp_policy=mp, offload_policy=offload)

    model, tokenizer = loading.stream_model(folder, cfg, dtype, device, progress and rank() == 0, on_layer)
    prepare_for_fsdp(model, mp.param_dtype)  # the layers outside the decoder stack (e.g. a quantized head)
    root = [t for t in _whole_tensors(model) if not isinstance(t, DTensor) and id(t) not in summed]
    digests.append(_checksum(root))
    fully_shard(model, mp_policy=mp, offload_policy=offload)
    # Each rank keeps its shard of what it built itself: the ranks must have built the same bytes
    # (quantization and adapter initialisation are deterministic on one device type; check it).
    mine = torch.tensor(digests, dtype=torch.int64, device=device)
    both = torch.cat([mine, -mine])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, lo = both[:len(mine)], -both[len(mine):]
    differ = (hi != lo).nonzero().flatten().tolist()
    if differ:
        where = ", ".join("the root" if i == len(digests) - 1 else f"decoder layer {i}" for i in differ[:5])
        raise RuntimeError(f"the ranks built different weights for {where} (checksums of their bytes differ): "
                           "quantization or adapter initialisation is not deterministic here, or the ranks read "
                           f"different checkpoints ({path}); every rank must see the same files and the same seed")
    return model, tokenizer


# ---- whole tensors from shards ----------------------------------------------------------------

def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, on rank 0 (CPU); an empty dict on the other ranks.
    All ranks must call it (one all-gather per parameter)."""

    out = {}
    for name, p in _trainable_state(model).items():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        if rank() == 0:
            out[name] = full.detach().cpu().clone()
        del full
    return out


def save_adapter_gathered(model: nn.Module, path, format: str = "qdora", base_model_name_or_path: str | None = None):
    """`qdora.save_adapter` for a sharded model: the adapter is gathered and written by rank 0.
    Every rank must call it. Returns the folder on rank 0, None elsewhere."""

    tensors = gather_trainable(model)
    result = None
    if rank() == 0:
        result = save_adapter(model, path, format=format, base_model_name_or_path=base_model_name_or_path,
                              tensors=tensors)
    dist.barrier()
    return result
