"""Dequantize-merge: write an adapted model as a plain transformers checkpoint.

For each adapted layer `W' = (m / ||W0 + s·B·A||) ⊙ (W0 + s·B·A)`, computed row block by row block in
fp32 from the dequantized NF4 weight the adapter was trained against (or, on request, the original
weight read from the source checkpoint). Frozen NF4 layers are dequantized, everything else is cast.
Tensors are produced and written one at a time into sharded safetensors (with an index), so peak
memory is the quantized model plus one merged layer. The output folder is built under a temporary
name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import bitsandbytes as bnb
import torch
from torch import nn
from tqdm.auto import tqdm

from qdora.core.experts import PROJECTIONS, AdaptedRouter, QDoRAExperts
from qdora.core.layer import QDoRALinear
from qdora.core.nf4 import RowBlocks
from qdora.core.safetensors_io import (
    TensorSpec,
    atomic_dir,
    output_folder,
    parse_size,
    write_streaming,
    write_text_atomic,
)
from qdora.models.hf_config import plain_config
from qdora.models.loading import CheckpointReader


def _fp32_row_blocks(layer: QDoRALinear, base_weight: torch.Tensor | None):
    """Fresh fp32 row blocks of W0 (the layer's own, or `base_weight`), safe to modify in place."""
    if base_weight is None:
        owned = layer._blocks.owns_blocks(torch.float32)
        for r0, r1, W in layer._blocks.blocks(torch.float32):
            # on the CPU, where the merged tensor is built (a GPU model's blocks are copied over)
            yield r0, r1, W.cpu() if W.is_cuda else (W if owned else W.clone())
        return
    step = layer._blocks.block_rows
    for r0 in range(0, layer.out_features, step):
        r1 = min(layer.out_features, r0 + step)
        yield r0, r1, base_weight[r0:r1].to("cpu", torch.float32, copy=True)


@torch.no_grad()
def merged_weight(layer: QDoRALinear, dtype: torch.dtype = torch.bfloat16,
                  base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's effective weight `(m/n) ⊙ (W0 + s·B·A)` (LoRA: `W0 + s·B·A`) as one `(out, in)`
    tensor in `dtype` on the CPU, built row block by row block in fp32 (a GPU model's blocks are
    dequantized there and copied over). `base_weight` replaces the NF4 W0 (the norm is then that of
    the replaced weight)."""
    if base_weight is not None and tuple(base_weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"base weight shape {tuple(base_weight.shape)} != layer "
                         f"({layer.out_features}, {layer.in_features})")
    s = layer.scaling
    A, B = (t.float().cpu() if t is not None else None for t in layer.direction_factors())
    out = torch.empty(layer.out_features, layer.in_features, dtype=torch.float32)
    for r0, r1, W in _fp32_row_blocks(layer, base_weight):
        if A is not None:
            W.addmm_(B[r0:r1], A, alpha=s)
        out[r0:r1] = W
    if layer.use_dora:
        # The row norm of the very rows written: n = ||W0 + s·B·A||, then W' = (m/n)·rows.
        g = layer.magnitude.float().cpu() / out.norm(dim=1).clamp_min(layer.eps)
        out.mul_(g[:, None])
    return out.to(dtype)


def _effective_weight(layer: nn.Module, adapted: bool = True) -> torch.Tensor:
    """The fp32 weight of one linear layer as the model computes with it: merged (`QDoRALinear`, or its
    base with `adapted=False`), dequantized (NF4), or as it is."""
    if isinstance(layer, QDoRALinear):
        return merged_weight(layer, torch.float32) if adapted else layer.dequantized_base(torch.float32)
    if isinstance(layer, bnb.nn.Linear4bit):
        return RowBlocks(layer, 1024).dequantize(torch.float32)
    return layer.weight.detach().float().cpu()


def _plan(model: nn.Module, dtype: torch.dtype, original: Callable[[str], torch.Tensor] | None,
          adapted: bool = True):
    """(spec, producer) for every tensor of the merged checkpoint, in module order, tied tensors once.
    `adapted=False`: the adapted layers' base weights instead (the unadapted model, exported the same way)."""
    plan: list[tuple[TensorSpec, Callable[[], torch.Tensor]]] = []
    seen: set[int] = set()
    skip_prefixes: list[str] = []

    def add(key: str, shape, fn):
        plan.append((TensorSpec(key, tuple(shape), dtype), fn))

    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(mod, QDoRAExperts):  # transformers' fused layout: (E, 2I, H) and (E, H, I)
            if original:
                raise ValueError(f"{name}: merging an MoE's experts onto the original checkpoint is not supported; "
                                 "merge onto the NF4 weights the adapter was trained against (no --original)")
            skip_prefixes.append(prefix)
            for proj in PROJECTIONS:
                layers = list(getattr(mod, proj))
                add(f"{prefix}{proj}", (len(layers), layers[0].out_features, layers[0].in_features),
                    lambda layers=layers: torch.stack([_effective_weight(m, adapted).to(dtype) for m in layers]))
            continue
        if isinstance(mod, AdaptedRouter):  # the router's own tensors, its weight merged
            skip_prefixes.append(prefix)
            for key, t in [*mod.router.named_parameters(), *mod.router.named_buffers()]:
                if key == "weight":
                    add(f"{prefix}weight", t.shape, lambda m=mod.adapter: _effective_weight(m, adapted).to(dtype))
                elif key not in mod.router._non_persistent_buffers_set:
                    keep = dtype if t.is_floating_point() else t.dtype
                    plan.append((TensorSpec(f"{prefix}{key}", tuple(t.shape), keep),
                                 lambda t=t, d=keep: t.detach().to(d)))
            continue
        if isinstance(mod, QDoRALinear):
            skip_prefixes.append(prefix)
            base = (lambda k=f"{prefix}weight": original(k)) if original else (lambda: None)
            if adapted:
                add(f"{prefix}weight", (mod.out_features, mod.in_features),
                    lambda m=mod, base=base: merged_weight(m, dtype, base()))
            else:
                add(f"{prefix}weight", (mod.out_features, mod.in_features),
                    lambda m=mod, base=base: (base() if original else m.dequantized_base(torch.float32)).to(dtype))
            if mod.base_layer.bias is not None:
                add(f"{prefix}bias", mod.base_layer.bias.shape, lambda b=mod.base_layer.bias: b.detach().to(dtype))
            continue
        if isinstance(mod, bnb.nn.Linear4bit):
            skip_prefixes.append(prefix)
            shape = tuple(mod.weight.quant_state.shape)
            if original:
                add(f"{prefix}weight", shape, lambda k=f"{prefix}weight": original(k).to(dtype))
            else:
                add(f"{prefix}weight", shape, lambda m=mod: RowBlocks(m, 1024).dequantize(torch.float32).to(dtype))
            if mod.bias is not None:
                add(f"{prefix}bias", mod.bias.shape, lambda b=mod.bias: b.detach().to(dtype))
            continue
        tensors = list(mod.named_parameters(recurse=False))
        tensors += [(k, b) for k, b in mod.named_buffers(recurse=False)
                    if k not in mod._non_persistent_buffers_set]
        for key, t in tensors:
            if t is None:
                continue
            ident = t.untyped_storage().data_ptr()
            if ident in seen:  # tied weights (e.g. lm_head = embed_tokens) are stored once
                continue
            seen.add(ident)
            keep = dtype if t.is_floating_point() else t.dtype
            plan.append((TensorSpec(f"{prefix}{key}", tuple(t.shape), keep), lambda t=t, d=keep: t.detach().to(d)))
    return plan


def linear_weight_keys(model: nn.Module) -> set[str]:
    """The checkpoint keys of the weights of the linear layers qdora holds in NF4 or adapts
    (`QDoRALinear`, `bnb.nn.Linear4bit`): the ones an NF4 export quantizes."""
    keys, skip = set(), []
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if isinstance(mod, (QDoRALinear, bnb.nn.Linear4bit)):
            prefix = f"{name}." if name else ""
            skip.append(prefix)
            keys.add(f"{prefix}weight")
    return keys


def merged_tensors(model: nn.Module, dtype: torch.dtype = torch.float32, original_checkpoint=None,
                   adapted: bool = True) -> list[tuple[TensorSpec, Callable[[], torch.Tensor]]]:
    """Every tensor of the merged model as `(spec, producer)`, in module order, tied tensors once:
    a producer builds its tensor (a merged layer: row block by row block) only when called, so an
    exporter holds one at a time. `original_checkpoint`: merge onto that folder's original weights;
    `adapted=False`: the base weights, without the adapters."""
    original = None
    if original_checkpoint is not None:
        reader = CheckpointReader(original_checkpoint)
        original = lambda key: reader.get(key).float()  # noqa: E731
    return _plan(model, dtype, original, adapted)


def merge_and_save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, dtype: torch.dtype = torch.bfloat16,
                   max_shard_size: int | str = "2GB", original_checkpoint: str | os.PathLike | None = None,
                   overwrite: bool = False, adapted: bool = True) -> Path:
    """Write `model` with its adapters merged as a plain transformers checkpoint in `out_dir`:
    config (no quantization settings), generation config, tokenizer (if given), and sharded
    safetensors with an index. `original_checkpoint`: merge onto the original weights of that
    checkpoint folder instead of the dequantized NF4 ones. `adapted=False`: the base model without
    its adapters (the floor a drift check compares with)."""
    out_dir = output_folder(out_dir, overwrite, original_checkpoint)
    plan = merged_tensors(model, dtype, original_checkpoint, adapted)
    limit = parse_size(max_shard_size)
    shards: list[list[tuple[TensorSpec, Callable]]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item[0].nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[0].nbytes

    with atomic_dir(out_dir) as tmp:
        weight_map = {}
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        bar = tqdm(total=len(plan), desc="merging", unit="tensor", disable=None)
        for fname, shard in zip(names, shards):
            producers = {spec.name: fn for spec, fn in shard}

            def produce(spec, producers=producers):
                bar.update(1)
                return producers[spec.name]()
            write_streaming(tmp / fname, [spec for spec, _ in shard], produce, {"format": "pt"})
            weight_map.update({spec.name: fname for spec, _ in shard})
        bar.close()
        write_folder_files(tmp, model, plain_config(model.config, dtype), tokenizer, weight_map,
                           sum(s.nbytes for s, _ in plan), sharded=len(shards) > 1)
    return out_dir


def write_folder_files(folder: Path, model: nn.Module, config, tokenizer, weight_map: dict[str, str],
                       total_size: int, sharded: bool) -> None:
    """The files of a checkpoint folder beside its weights: the shard index (when sharded), `config`,
    the model's generation config and the tokenizer (when there are)."""
    if sharded:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        write_text_atomic(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Fine-tuning changes what a model says next."


@torch.no_grad()
def logit_difference(model: nn.Module, merged_dir: str | os.PathLike, tokenizer, text: str = PROBE_TEXT) -> dict:
    """Reload `merged_dir` with plain transformers (fp32) and compare its logits on `text` with the
    in-memory adapted `model`'s. Returns max/mean absolute and max relative differences."""
    from transformers import AutoModelForCausalLM  # heavy, used here only

    ids = tokenizer(text, return_tensors="pt").input_ids
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    adapted = model(ids.to(device)).logits.float().cpu()
    model.train(was_training)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    other = merged(ids).logits.float()
    for what, logits in (("the adapted model", adapted), (f"the merged checkpoint {merged_dir}", other)):
        if not torch.isfinite(logits).all():
            raise ValueError(f"the logits of {what} are not finite; the comparison is meaningless")
    diff = (other - adapted).abs()
    return {"tokens": int(ids.shape[1]), "max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "max_rel": (diff.max() / adapted.abs().max()).item()}
