"""Merged model re-quantized to NF4, saved the way transformers saves a bitsandbytes 4-bit model.

Each adapted (or NF4) linear layer is merged in fp32 (`qdora.export.merge.merged_tensors`), cast to the
checkpoint's dtype and quantized with bitsandbytes' own NF4 quantizer (blocksize 64, optionally
double-quantized): exactly what `from_pretrained(merged, quantization_config=BitsAndBytesConfig(
load_in_4bit=True, bnb_4bit_quant_type="nf4"))` would compute from the plain merged checkpoint of
that dtype. The result is written under transformers' key names (`weight`, `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4`) with the `quantization_config` in config.json, so plain
`AutoModelForCausalLM.from_pretrained(folder)` loads it as a 4-bit model.

Layers are produced, quantized and written one at a time: peak memory is one merged layer in fp32
(plus its cast and packed copies). The quant-state blob of a layer is a small JSON text whose
length is known only once the layer is quantized (it holds the double quantization's offset), so
a shard's blobs are written after its other tensors and its header, whose room is reserved for
the largest blobs, is written last (padded with spaces, as the safetensors format allows).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from qdora.core.nf4 import quantize_nf4
from qdora.core.safetensors_io import TensorSpec, atomic_dir, check_finite, output_folder, parse_size
from qdora.export.merge import linear_weight_keys, merged_tensors, write_folder_files
from qdora.models.hf_config import plain_config

BLOCKSIZE = 64
"""bitsandbytes' 4-bit blocksize in transformers (BitsAndBytesConfig has no setting for it)."""
NESTED_BLOCKSIZE = 256
BLOB_MAX = 4096
"""Upper bound on one quant-state JSON blob (about 170 bytes in practice), for the header's room."""

_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
          torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


def quantized_specs(key: str, shape: tuple[int, int], double_quant: bool) -> list[TensorSpec]:
    """The fixed-size tensors transformers stores for one NF4 weight `key` (the JSON blob aside)."""
    numel = shape[0] * shape[1]
    blocks = -(-numel // BLOCKSIZE)
    specs = [TensorSpec(key, ((numel + 1) // 2, 1), torch.uint8),
             TensorSpec(f"{key}.absmax", (blocks,), torch.uint8 if double_quant else torch.float32),
             TensorSpec(f"{key}.quant_map", (16,), torch.float32)]
    if double_quant:
        specs += [TensorSpec(f"{key}.nested_absmax", (-(-blocks // NESTED_BLOCKSIZE),), torch.float32),
                  TensorSpec(f"{key}.nested_quant_map", (256,), torch.float32)]
    return specs


def blob_key(key: str) -> str:
    return f"{key}.quant_state.bitsandbytes__nf4"


class _Layer:
    """One linear weight: merged, cast and quantized when its first tensor is asked for."""

    def __init__(self, key: str, produce: Callable[[], torch.Tensor], dtype: torch.dtype, double_quant: bool):
        self.key, self.produce, self.dtype, self.double_quant = key, produce, dtype, double_quant
        self.tensors: dict[str, torch.Tensor] | None = None
        self.blob: bytes | None = None

    def get(self, name: str) -> torch.Tensor:
        if self.tensors is None:
            weight = self.produce()
            check_finite(self.key, weight)
            weight = weight.to(self.dtype)  # the fp32 merge is freed before quantizing
            packed, state = quantize_nf4(weight, blocksize=BLOCKSIZE, double_quant=self.double_quant)
            del weight
            tensors = {f"{self.key}.{k}": v for k, v in state.as_dict(packed=True).items()}
            tensors[self.key] = packed
            self.blob = bytes(tensors.pop(blob_key(self.key)).numpy())
            self.tensors = tensors
        t = self.tensors.pop(name)
        if not self.tensors:
            self.tensors = {}  # quantized and handed out: keep only the blob
        return t


def _header(specs, blobs: dict[str, int], metadata: dict[str, str]) -> tuple[dict, int]:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _CODES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    for name, size in blobs.items():
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


def _write_shard(path: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor],
                 blob_names: list[str], blob: Callable[[str], bytes]) -> None:
    """A safetensors file: `specs` produced in order, then the blobs `blob_names`, header last
    (room reserved first), under a temporary name renamed into place when complete."""
    metadata = {"format": "pt"}
    largest, _ = _header(specs, dict.fromkeys(blob_names, BLOB_MAX), metadata)
    room = len(json.dumps(largest, separators=(",", ":")).encode())
    room += -room % 8
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * (8 + room))
            for spec in specs:
                t = produce(spec)
                if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
                    raise ValueError(f"{spec.name}: produced {tuple(t.shape)} {t.dtype}, "
                                     f"planned {tuple(spec.shape)} {spec.dtype}")
                check_finite(spec.name, t)
                f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
                del t
            sizes = {}
            for name in blob_names:
                data = blob(name)
                if len(data) > BLOB_MAX:
                    raise ValueError(f"{name}: quant state of {len(data)} bytes exceeds {BLOB_MAX}")
                f.write(data)
                sizes[name] = len(data)
            header, _ = _header(specs, sizes, metadata)
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (room - len(encoded))
            f.seek(0)
            f.write(struct.pack("<Q", room))
            f.write(encoded)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def nf4_quantization_config(dtype: torch.dtype, double_quant: bool, skip_modules: list[str] | None) -> dict:
    """The `quantization_config` transformers records for such a model (its own class, to_dict)."""
    from transformers import BitsAndBytesConfig  # heavy, used here only
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8,
                              llm_int8_skip_modules=skip_modules).to_dict()


def _skip_modules(model: nn.Module, quantized: set[str]) -> list[str] | None:
    """Linear layers left unquantized besides transformers' default (the output head): None when
    there are none, so the config reads as transformers' own."""
    plain = [name for name, mod in model.named_modules()
             if type(mod) is nn.Linear and f"{name}.weight" not in quantized]
    default = {"lm_head"}
    extra = [n for n in plain if n not in default]
    return sorted(set(extra) | default) if extra else None


def save_nf4(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, dtype: torch.dtype = torch.bfloat16,
             double_quant: bool = False, max_shard_size: int | str = "2GB",
             original_checkpoint: str | os.PathLike | None = None, overwrite: bool = False,
             adapted: bool = True) -> Path:
    """Write `model` with its adapters merged and re-quantized to NF4 (bitsandbytes, blocksize 64,
    `double_quant` optional) as a transformers 4-bit checkpoint in `out_dir`. Unquantized tensors
    (embeddings, norms, output head) and the compute dtype are `dtype`. `original_checkpoint`,
    `adapted`: as `qdora.export.merge.merge_and_save`."""
    out_dir = output_folder(out_dir, overwrite, original_checkpoint)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype {dtype} is not one of bfloat16, float16, float32")
    limit = parse_size(max_shard_size)
    quantized = linear_weight_keys(model)
    plan = merged_tensors(model, torch.float32, original_checkpoint, adapted)
    units = []  # (fixed specs, producer per spec name, blob names)
    for spec, fn in plan:
        if spec.name in quantized:
            layer = _Layer(spec.name, fn, dtype, double_quant)
            specs = quantized_specs(spec.name, spec.shape, double_quant)
            units.append((specs, {s.name: (lambda s=s, layer=layer: layer.get(s.name)) for s in specs},
                          {blob_key(spec.name): layer}))
        else:
            keep = dtype if spec.dtype.is_floating_point else spec.dtype
            out = TensorSpec(spec.name, spec.shape, keep)
            units.append(([out], {spec.name: (lambda fn=fn, d=keep: fn().to(d))}, {}))
    shards, size = [[]], 0
    for unit in units:
        nbytes = sum(s.nbytes for s in unit[0])
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with atomic_dir(out_dir) as tmp:
        weight_map, total = {}, 0
        bar = tqdm(total=len(units), desc="merging to NF4", unit="tensor", disable=None)
        for fname, shard in zip(names, shards):
            specs = [s for unit in shard for s in unit[0]]
            producers = {k: v for unit in shard for k, v in unit[1].items()}
            layers = {k: v for unit in shard for k, v in unit[2].items()}
            firsts = {unit[0][0].name for unit in shard}

            def produce(spec, producers=producers, firsts=firsts):
                if spec.name in firsts:
                    bar.update(1)
                return producers[spec.name]()

            _write_shard(tmp / fname, specs, produce, list(layers), lambda name, layers=layers: layers[name].blob)
            weight_map.update({s.name: fname for s in specs})
            weight_map.update(dict.fromkeys(layers, fname))
            total += sum(s.nbytes for s in specs) + sum(len(layer.blob) for layer in layers.values())
        bar.close()
        config = plain_config(model.config, dtype)
        config.quantization_config = nf4_quantization_config(dtype, double_quant, _skip_modules(model, quantized))
        write_folder_files(tmp, model, config, tokenizer, weight_map, total, sharded=len(shards) > 1)
    return out_dir
