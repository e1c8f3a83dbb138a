"""A base and its adapters, opened for `qdora chat` and `qdora serve`: the checks that need no loading
first (one line each), then one base in memory and every adapter in an `AdapterBank` over it. A model with a sliding
window or soft-capped attention scores (Gemma 2) attends through `qdora.packed_sdpa`, as `qdora train` runs it, so
that a long prompt's prefill builds no `T × T` mask or scores (decoding steps keep transformers' masks)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qdora.core.config import QUANTIZED_METHODS, AdapterConfig
from qdora.models.adapter_io import adapter_config, read_adapter
from qdora.models.loading import check_model_path, load_model
from qdora.serve.bank import AdapterBank
from qdora.serve.options import BASES
from qdora.train.setup import training_attention


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path
    format: str
    config: AdapterConfig


def parse_adapters(values: list[str] | None) -> list[tuple[str, Path]]:
    """`NAME=DIR` or `DIR` (named after its folder) per `--adapter`; two adapters with one name are refused."""
    out: list[tuple[str, Path]] = []
    for value in values or []:
        name, sep, folder = value.partition("=")
        if not sep:
            name, folder = Path(value).resolve().name, value
        name = name.strip()
        if not name or not folder:
            raise ValueError(f"--adapter {value!r}: give NAME=DIR or DIR")
        if name in [n for n, _ in out]:
            raise ValueError(f"two adapters are named {name!r}: give each its own name with --adapter NAME=DIR")
        out.append((name, Path(folder)))
    return out


def read_specs(adapters: list[tuple[str, Path]], base: str) -> list[AdapterSpec]:
    """Read each adapter's config (fast, before the model loads): a missing folder or a file of neither
    format fails here, in one line."""
    if base not in BASES:
        raise ValueError(f"--base {base!r} is unknown; use one of {', '.join(BASES)}")
    specs = []
    for name, path in adapters:
        fmt, meta, modules = read_adapter(path)
        specs.append(AdapterSpec(name, path, fmt, adapter_config(fmt, meta, modules, quantized=base != "full")))
    return specs


def base_config(specs: list[AdapterSpec], base: str) -> AdapterConfig:
    """How to load the base: quantized as the first qdora adapter's base was (its blocksize, double
    quantization, storage, layers kept in full precision), or unquantized."""
    quantize = base == "nf4" or (base == "auto" and (not specs or any(
        s.config.method in QUANTIZED_METHODS or s.format == "peft" for s in specs)))
    ours = next((s.config for s in specs if s.format == "qdora" and s.config.quantized == quantize), None)
    if quantize:
        cfg = ours.replace(method="qdora") if ours is not None else AdapterConfig(method="qdora")
    else:
        cfg = ours.replace(method="dora") if ours is not None else AdapterConfig(method="dora")
    return cfg


def open_bank(model: str | os.PathLike, adapters: list[tuple[str, Path]], base: str = "auto",
              progress: bool = True):
    """Load `model` once and every adapter over it: `(bank, tokenizer, specs)`."""
    check_model_path(model)
    specs = read_specs(adapters, base)
    cfg = base_config(specs, base)
    net, tokenizer = load_model(model, method=cfg.method, cfg=cfg, add=False, progress=progress)
    training_attention(net, packing=False)  # a long prompt's prefill without T x T masks or scores (windows, Gemma 2)
    bank = AdapterBank(net)
    for spec in specs:
        bank.add(spec.name, spec.path)
    return bank, tokenizer, specs
