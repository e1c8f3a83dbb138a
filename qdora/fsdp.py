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

Low-memory start: rank 0 alone loads and quantizes the checkpoint. It sends the other ranks a
JSON description of the result (`describe`: config, NF4 layers and their quantization-state
layout, adapter settings, every tensor's shape and dtype), from which they build the same module
tree with every parameter on the meta device (`build_from_description`), shard it and allocate
their shards. Rank 0 broadcasts the buffers and quantization states (small, kept whole
everywhere), then shards its model one decoder layer at a time, broadcasting each parameter of
that layer whole and dropping it once sent; each other rank keeps only its shard. No rank but 0
ever holds the whole model, rank 0 holds it once (plus one layer's shards), and nothing is unpickled.

Gradients: the trainable adapters are sharded like everything else; FSDP reduce-scatters their
gradients and divides by the world size. Each rank's loss is its share of the *global* token-mean
loss times the world size (see `qdora.train`), so the averaged gradient equals the gradient of
the single-process loss on the whole batch.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

import bitsandbytes as bnb

from qdora.function import DoRAFunction, LayerSpec
from qdora.nf4 import RowBlocks

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
    state is `self.quant_state`. Forward is `qdora.function.DoRAFunction` with no adapter:
    `y = x·W0ᵀ + bias`, W0 dequantized row block by row block (backward: `dx = dy·W0`)."""

    _blocks: RowBlocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 on CPU (bf16 matmuls are very slow there); on CUDA the dtype FSDP computes in.
        cd = torch.float32 if x.device.type == "cpu" else x.dtype
        spec = LayerSpec(blocks=self._blocks, c=None, bias=self.bias, scaling=0.0, exact=False, eps=1e-6,
                         compute_dtype=cd)
        return DoRAFunction.apply(x, x, None, None, None, spec)


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
    from qdora.layer import QDoRALinear

    adapter_bases = {id(m.base_layer) for m in model.modules() if isinstance(m, QDoRALinear)}
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (`model.model.layers` for Llama)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__}: no decoder layer list found (expected model.model.layers)")
    return layers


def mixed_precision(device: torch.device):
    """bf16 parameters and compute, fp32 gradient reduction on CUDA; nothing cast on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def offload_policy(device: torch.device, cpu_offload: bool):
    """FSDP2's CPU offload: each rank's shards of the parameters, their gradients and the optimizer
    states live in CPU memory; a layer's shards are copied to the device just before its all-gather,
    gradients are copied back after the reduce-scatter, and the optimizer steps on the CPU. Pinned
    host memory on CUDA (asynchronous copies). On a CPU device it changes where nothing lives, but the
    same FSDP code path runs (what the CPU tests check)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy
    return CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()


def shard(model: nn.Module, device: torch.device, cpu_offload: bool = False) -> nn.Module:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard
    mp, offload = mixed_precision(device), offload_policy(device, cpu_offload)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mp_policy=mp, offload_policy=offload)
    return model


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _spec(t: torch.Tensor | None) -> list | None:
    return None if t is None else [list(t.shape), str(t.dtype)]


def _state_tensors(state) -> dict[str, torch.Tensor]:
    """The tensors of a bitsandbytes `QuantState`, by a fixed name."""
    out = {"absmax": state.absmax, "code": state.code}
    if state.offset is not None:
        out["offset"] = state.offset
    if state.state2 is not None:
        out["state2.absmax"], out["state2.code"] = state.state2.absmax, state.state2.code
    return out


def describe(model: nn.Module, tokenizer_dir: str | None) -> dict:
    """What the other ranks need to build the same module tree on the meta device (JSON-able):
    the transformers config, the NF4 layers with their quantization-state layout, the adapter
    layers with their settings, and every parameter's and buffer's shape and dtype."""
    from qdora.layer import QDoRALinear

    nf4, adapters = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            st = m.quant_state
            nf4[name] = {"in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                         "packed": _spec(m.weight), "compute_dtype": str(m.compute_dtype),
                         "frozen": isinstance(m, ShardableLinear4bit),
                         "block_rows": m._blocks.block_rows if isinstance(m, ShardableLinear4bit) else None,
                         "shape": list(st.shape), "dtype": str(st.dtype), "blocksize": st.blocksize,
                         "blocksize2": st.state2.blocksize if st.state2 is not None else None,
                         "dtype2": str(st.state2.dtype) if st.state2 is not None else None,
                         "tensors": {k: _spec(v) for k, v in _state_tensors(st).items()}}
        elif isinstance(m, QDoRALinear):
            trained = m.lora_A if m.lora_A is not None else m.magnitude_delta
            adapters[name] = {"r": m.r, "alpha": m.alpha, "use_dora": m.use_dora, "norm": m.norm,
                              "dropout": m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0,
                              "use_rslora": m.use_rslora, "adapter_dtype": str(trained.dtype),
                              "compute_dtype": str(m.compute_dtype), "block_rows": m._blocks.block_rows,
                              "eps": m.eps}
    cfg = getattr(model, "qdora_config", None)
    first: dict[int, str] = {}
    tied = {}  # parameter name -> the name it is tied to (e.g. lm_head.weight -> embed_tokens.weight)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        first.setdefault(id(p), name)
    return {"config": model.config.to_dict(), "tokenizer_dir": tokenizer_dir, "tied": tied,
            "qdora_config": cfg.to_dict() if cfg is not None else None, "nf4": nf4, "adapters": adapters,
            "params": {n: _spec(p) + [p.requires_grad] for n, p in model.named_parameters(remove_duplicate=False)},
            "buffers": {n: _spec(b) for n, b in model.named_buffers()}}


def _meta_linear4bit(spec: dict, device: torch.device) -> bnb.nn.Linear4bit:
    """A `Linear4bit` whose packed weight is a meta tensor and whose quantization state has the
    layout `spec` describes, allocated on `device` (filled later by a broadcast)."""
    import bitsandbytes.functional as bnbF

    from qdora.nf4 import _keep_standard_layout

    storage = _dtype(spec["packed"][1])
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(spec["in"], spec["out"], bias=spec["bias"],
                                  compute_dtype=_dtype(spec["compute_dtype"]),
                                  compress_statistics=spec["blocksize2"] is not None, quant_type="nf4",
                                  quant_storage=storage)
    layer.weight = nn.Parameter(torch.empty(spec["packed"][0], dtype=storage, device="meta"), requires_grad=False)
    t = {k: torch.empty(shape, dtype=_dtype(dtype), device=device) for k, (shape, dtype) in spec["tensors"].items()}
    state2 = None
    if spec["blocksize2"] is not None:
        state2 = bnbF.QuantState(absmax=t["state2.absmax"], code=t["state2.code"], blocksize=spec["blocksize2"],
                                 dtype=_dtype(spec["dtype2"]))
    layer.quant_state = bnbF.QuantState(absmax=t["absmax"], shape=torch.Size(spec["shape"]), code=t["code"],
                                        blocksize=spec["blocksize"], quant_type="nf4", dtype=_dtype(spec["dtype"]),
                                        offset=t.get("offset"), state2=state2)
    _keep_standard_layout(layer)
    return layer


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def build_from_description(desc: dict, device: torch.device) -> nn.Module:
    """The module tree `describe` wrote, every parameter on the meta device, quantization states
    and buffers allocated (their values come from rank 0)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from qdora.config import AdapterConfig
    from qdora.layer import QDoRALinear

    config = CONFIG_MAPPING[desc["config"]["model_type"]].from_dict(desc["config"])
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    for name, spec in desc["adapters"].items():
        base_spec = desc["nf4"].get(f"{name}.base_layer")
        base = _meta_linear4bit(base_spec, device) if base_spec else model.get_submodule(name)
        compute = spec["compute_dtype"]
        layer = QDoRALinear(base, r=spec["r"], alpha=spec["alpha"], dropout=spec["dropout"], use_dora=spec["use_dora"],
                            norm=spec["norm"], use_rslora=spec["use_rslora"],
                            adapter_dtype=_dtype(spec["adapter_dtype"]),
                            compute_dtype=compute if compute == "auto" else _dtype(compute),
                            block_rows=spec["block_rows"], eps=spec["eps"])
        _set_module(model, name, layer)
    for name, spec in desc["nf4"].items():
        if spec["frozen"]:
            layer = _meta_linear4bit(spec, device)
            layer._blocks = RowBlocks(layer, spec["block_rows"])
            layer.__class__ = ShardableLinear4bit
            _set_module(model, name, layer)
    # Parameters as rank 0 has them (dtype, shape, trainable), all on the meta device.
    replaced: dict[int, nn.Parameter] = {}  # by the old parameter: tied parameters stay tied
    for name, (shape, dtype, trainable) in desc["params"].items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        p = module._parameters[attr]
        if tuple(p.shape) != tuple(shape) or p.dtype != _dtype(dtype) or p.requires_grad != trainable:
            if id(p) not in replaced:
                replaced[id(p)] = nn.Parameter(torch.empty(shape, dtype=_dtype(dtype), device="meta"),
                                               requires_grad=trainable)
            module._parameters[attr] = replaced[id(p)]
    for name, target in desc["tied"].items():
        module_name, _, attr = name.rpartition(".")
        target_module, _, target_attr = target.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = model.get_submodule(target_module)._parameters[target_attr]
    if desc["qdora_config"] is not None:
        model.qdora_config = AdapterConfig.from_dict(desc["qdora_config"])
    mine = {n: _spec(p) + [p.requires_grad] for n, p in model.named_parameters(remove_duplicate=False)}
    buffers = {n: _spec(b) for n, b in model.named_buffers()}
    if mine != desc["params"] or sorted(buffers) != sorted(desc["buffers"]):
        diff = sorted(n for n in set(mine) | set(desc["params"]) if mine.get(n) != desc["params"].get(n))
        raise RuntimeError(f"rank {rank()} rebuilt a different model than rank 0 loaded: parameters {diff[:5]}, "
                           f"buffers {sorted(set(buffers) ^ set(desc['buffers']))[:5]}")
    return model


def _broadcast_json(obj) -> object:
    """`obj` (JSON-able) from rank 0 to every rank, as bytes in a tensor."""
    import json
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else torch.device("cpu")
    data = json.dumps(obj).encode() if rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if rank() == 0
           else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist())) if rank() != 0 else obj


def _non_parameter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers and quantization-state tensors: replicated on every rank, not sharded."""
    out = dict(model.named_buffers())
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            out.update({f"{name}.quant_state.{k}": v for k, v in _state_tensors(m.quant_state).items()})
    return out


def _parameter_groups(model: nn.Module) -> list[list[str]]:
    """The model's parameter names in the order they are sharded and broadcast: each decoder
    layer's, then the rest (embeddings, final norm, head). The same on every rank."""
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    groups = [[f"{prefix}.{i}.{n}" for n, _ in layer.named_parameters()] for i, layer in enumerate(layers)]
    in_layers = {n for g in groups for n in g}
    return groups + [[n for n, _ in model.named_parameters() if n not in in_layers]]


def _broadcast_shards(model: nn.Module, names: list[str], whole: dict[str, torch.Tensor],
                      device: torch.device) -> None:
    """Rank 0 broadcasts the whole parameters `names`, one at a time, through `device`, and drops
    each from `whole` (its pre-sharding tensors) once sent. Every other rank copies its dim-0 shard
    (FSDP2 shards like `torch.chunk`) into its local tensor, wherever that lives (the device, or
    CPU memory with offload); rank 0's shards were cut from the same tensors by `fully_shard`.
    This is `set_model_state_dict(..., broadcast_from_rank0=True)` without its requirement that
    every tensor sit on one device (CPU offload breaks it) and with rank 0 freeing as it goes."""
    from torch.distributed.tensor import DTensor

    world, me = world_size(), rank()
    params = dict(model.named_parameters())
    for name in names:
        p = params[name]
        buf = (whole.pop(name).detach().to(device) if me == 0
               else torch.empty(p.shape, dtype=p.dtype, device=device))
        dist.broadcast(buf, src=0)
        if me != 0:
            if isinstance(p, DTensor):
                local, chunks = p.to_local(), buf.chunk(world, dim=0)
                piece = chunks[me] if me < len(chunks) else buf[:0]  # a short dim leaves the last ranks empty
            else:
                local, piece = p, buf
            if piece.shape != local.shape:
                raise RuntimeError(f"{name}: rank {me} holds a shard of shape {tuple(local.shape)}, expected "
                                   f"{tuple(piece.shape)} (dim-0 chunk {me} of {world} of {tuple(buf.shape)})")
            local.copy_(piece)
        del buf


def build_sharded(load, device: torch.device, cpu_offload: bool = False):
    """`load() -> (model, tokenizer)` runs on rank 0 only; every rank returns its sharded model and
    the tokenizer. See the module docstring (low-memory start) and `offload_policy`."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoTokenizer

    mp, offload = mixed_precision(device), offload_policy(device, cpu_offload)
    if rank() == 0:
        model, tokenizer = load()
        prepare_for_fsdp(model, mp.param_dtype)
        desc = describe(model, getattr(model, "name_or_path", None) if tokenizer is not None else None)
    else:
        desc = None
    desc = _broadcast_json(desc)
    if rank() != 0:
        model = build_from_description(desc, device)
        tokenizer = AutoTokenizer.from_pretrained(desc["tokenizer_dir"]) if desc["tokenizer_dir"] else None
    groups = _parameter_groups(model)
    with torch.no_grad():
        if rank() == 0:
            # Layer by layer: shard it, send it, drop the whole tensors. Rank 0's peak is the loaded
            # model plus one layer's shards, not the loaded model plus all of them.
            whole = dict(model.named_parameters())
            for _, tensor in sorted(_non_parameter_tensors(model).items()):
                dist.broadcast(tensor, src=0)
            for layer, names in zip(list(decoder_layers(model)) + [model], groups):
                fully_shard(layer, mp_policy=mp, offload_policy=offload)
                _broadcast_shards(model, names, whole, device)
            del whole
        else:
            # The whole tree is sharded on meta, then this rank's shards (and the buffers) are
            # allocated; with CPU offload FSDP moves each shard to (pinned) CPU memory as it is
            # allocated (`reset_sharded_param`), the buffers stay on the device.
            shard(model, device, cpu_offload)
            model.to_empty(device=device, recurse=True)
            for _, tensor in sorted(_non_parameter_tensors(model).items()):
                dist.broadcast(tensor, src=0)
            for names in groups:
                _broadcast_shards(model, names, {}, device)
    return model, tokenizer


# ---- checkpoints -------------------------------------------------------------------------------

SHARDS = "shards"


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_sharded_checkpoint(final, model: nn.Module, optimizer, state: dict, rng: dict[str, torch.Tensor]) -> None:
    """Write checkpoint folder `final` from every rank, atomically.

    Every rank writes its shard of the trainable parameters and optimizer state
    (`torch.distributed.checkpoint`, into `shards/`) and its RNG states (`rng-rank<r>.safetensors`)
    into one temporary folder; after a barrier rank 0 writes `state.json` and swaps the folder in as
    `qdora.safetensors_io.atomic_dir` does. A rank dying at any point leaves the previous
    checkpoint (as `final` or `final.old`) intact."""
    import json
    import shutil
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from qdora.safetensors_io import save_file_atomic, swap_in_dir, write_text_atomic

    final = Path(final)
    tmp = final.with_name(f"{final.name}.tmp-sharded")
    if rank() == 0:
        if tmp.exists():  # left by a run that died while saving
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": _trainable_state(model), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(tmp / SHARDS))
    save_file_atomic(rng, tmp / f"rng-rank{rank()}.safetensors")
    dist.barrier()
    if rank() == 0:
        write_text_atomic(tmp / "state.json", json.dumps({**state, "sharded": True, "world_size": world_size()},
                                                         indent=1) + "\n")
        swap_in_dir(tmp, final)
    dist.barrier()


def load_sharded_checkpoint(path, model: nn.Module, optimizer) -> dict[str, torch.Tensor] | None:
    """Load a checkpoint written by `save_sharded_checkpoint` into the sharded `model` and its
    `optimizer` (any world size: shards are re-split as needed). Returns this rank's RNG states,
    or None if the checkpoint was written by a different number of ranks."""
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    path = Path(path)
    if not (path / SHARDS).is_dir():
        raise ValueError(f"{path} is not a sharded checkpoint (no {SHARDS}/); it was written by a "
                         "single-process run: resume it without --fsdp")
    state = {"model": {n: p.detach() for n, p in _trainable_state(model).items()},
             "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path / SHARDS))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = path / f"rng-rank{rank()}.safetensors"
    return load_file(str(rng_file)) if rng_file.is_file() else None


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, on rank 0 (CPU); an empty dict on the other ranks.
    All ranks must call it (one all-gather per parameter)."""
    from torch.distributed.tensor import DTensor

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
    from qdora.adapter_io import save_adapter

    tensors = gather_trainable(model)
    result = None
    if rank() == 0:
        result = save_adapter(model, path, format=format, base_model_name_or_path=base_model_name_or_path,
                              tensors=tensors)
    dist.barrier()
    return result
