"""`AdapterConfig`: what to adapt and how. Frozen, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

METHODS = ("full", "lora", "dora", "qlora", "qdora")
"""`full` trains every weight; `lora`/`dora` adapt an unquantized base; `qlora`/`qdora` an NF4 base."""
QUANTIZED_METHODS = ("qlora", "qdora")
"""Methods whose frozen base is NF4."""
DORA_METHODS = ("dora", "qdora")
"""Methods with a trained magnitude."""

NORM_MODES = ("detached", "exact")
DIRECTIONS = ("lora", "vera")
QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
"""The one table of dtype names: adapters, compute, and (with `uint8`) NF4 storage; the planner
takes its byte sizes from here."""
_DTYPES = FLOAT_DTYPES


class Problems:
    """The problems of one settings object, collected so that a single error lists every one of them
    (`AdapterConfig`, `TrainConfig`, `PlanConfig` and the harness's config all check this way)."""

    def __init__(self, owner: str):
        self.owner = owner
        self.items: list[str] = []

    def add(self, text: str) -> None:
        self.items.append(text)

    def positive_int(self, name: str, value, hint: str = "") -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.add(f"{name}={value!r} must be a positive integer" + (f" ({hint})" if hint else ""))

    def number(self, name: str, value, minimum: float = 0.0, inclusive: bool = False, hint: str = "") -> None:
        """A finite real number above `minimum` (or at least it, with `inclusive`)."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and (value >= minimum if inclusive else value > minimum)
        if not ok:
            bound = "a positive number" if (minimum, inclusive) == (0.0, False) else \
                f"a number {'>=' if inclusive else '>'} {minimum:g}"
            self.add(f"{name}={value!r} must be {bound}" + (f" ({hint})" if hint else ""))

    def choice(self, name: str, value, choices, use: str = "") -> bool:
        """`value` is one of `choices`; the message says `use` (default: every choice)."""
        if value in choices:
            return True
        self.add(f"{name}={value!r} is unknown; use {use or 'one of ' + ', '.join(map(str, choices))}")
        return False

    def loss_chunks(self, chunked_loss: bool, loss_chunk_tokens) -> None:
        """The chunked loss's settings (`TrainConfig` and `PlanConfig` share them)."""
        if isinstance(loss_chunk_tokens, bool) or not isinstance(loss_chunk_tokens, int) or loss_chunk_tokens < 0:
            self.add(f"loss_chunk_tokens={loss_chunk_tokens!r} must be an integer >= 1 (tokens per chunk of the "
                     "loss), or 0 to size the chunks from the vocabulary")
        elif loss_chunk_tokens and not chunked_loss:
            self.add(f"loss_chunk_tokens={loss_chunk_tokens} sizes the chunked loss, which --no-chunked-loss "
                     "turns off; give one of them")

    def long_sequence(self, tokens, tokens_name: str, *, loss_chunk_tokens=0, offload_activations: bool = False,
                      gradient_checkpointing: bool = True, tiled_mlp: bool = False, mlp_tile_tokens=0,
                      sharded: bool = False) -> None:
        """The long-sequence options against the sequence they divide (`TrainConfig`: `cutoff_len`, `PlanConfig`:
        `seq_len`): a loss chunk or an MLP tile longer than it, a tile size without the tiled MLP, offloaded
        activations without the checkpoints they offload or under FSDP."""
        whole = isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0
        if whole and isinstance(loss_chunk_tokens, int) and loss_chunk_tokens > tokens:
            self.add(f"loss_chunk_tokens={loss_chunk_tokens} is above the sequence ({tokens_name}={tokens}); use at "
                     f"most {tokens}, or 0 to size the chunks from the vocabulary")
        if isinstance(mlp_tile_tokens, bool) or not isinstance(mlp_tile_tokens, int) or mlp_tile_tokens < 0:
            self.add(f"mlp_tile_tokens={mlp_tile_tokens!r} must be an integer >= 1 (tokens per tile of the tiled "
                     "MLP), or 0 for the model's hidden size")
        elif mlp_tile_tokens and not tiled_mlp:
            self.add(f"mlp_tile_tokens={mlp_tile_tokens} sizes the tiled MLP, which is off; add --tiled-mlp "
                     "(or --tiled-layers)")
        elif whole and mlp_tile_tokens > tokens:
            self.add(f"mlp_tile_tokens={mlp_tile_tokens} is above the sequence ({tokens_name}={tokens}); use at most "
                     f"{tokens}, or 0 for the model's hidden size")
        if offload_activations and not gradient_checkpointing:
            self.add("offload_activations=True moves the checkpointed layer inputs to host memory and needs gradient "
                     "checkpointing; drop --no-gradient-checkpointing (or --offload-activations)")
        if offload_activations and sharded:
            self.add("offload_activations=True is not supported with FSDP (its layers gather and free their own "
                     "shards around the recompute); drop --offload-activations or train on one device")

    def include(self, err: Exception) -> None:
        """The listed problems of another config's error (e.g. `AdapterConfig`'s inside `TrainConfig`)."""
        lines = [ln.strip().removeprefix("- ") for ln in str(err).splitlines()[1:] if ln.strip()]
        self.items += [line for line in lines or [str(err)] if line not in self.items]

    def raise_if_any(self) -> None:
        if self.items:
            raise ValueError(f"invalid {self.owner}:\n  - " + "\n  - ".join(self.items))


def storage_dtype(quant_storage) -> torch.dtype:
    """The dtype packed NF4 data is stored in: one of `QUANT_STORAGE` (or a torch dtype)."""
    if isinstance(quant_storage, torch.dtype):
        return quant_storage
    if quant_storage not in QUANT_STORAGE:
        raise ValueError(f"quant_storage={quant_storage!r} is unknown; use one of {list(QUANT_STORAGE)}")
    return torch.uint8 if quant_storage == "uint8" else FLOAT_DTYPES[quant_storage]


def _dtype_name(value) -> str | None:
    """Canonical name of a dtype given as `torch.dtype` or string, or None if unknown."""
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if isinstance(value, str) and value in _DTYPES:
        return str(_DTYPES[value]).removeprefix("torch.")
    return None


def resolve_dtype(value) -> torch.dtype:
    name = _dtype_name(value)
    if name is None:
        raise ValueError(f"unknown dtype {value!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[name]


@dataclass(frozen=True)
class AdapterConfig:
    """How `qdora.add_adapters` adapts a model. Every field is checked in `__post_init__`."""

    method: str = "qdora"
    """One of `full`, `lora`, `dora`, `qlora`, `qdora` (the q-methods keep the base in NF4)."""
    r: int = 16
    """Rank of the direction update `B·A`."""
    alpha: float = 32.0
    """Scale numerator: the update is `s·B·A` with `s = alpha / r` (or `alpha / sqrt(r)`, rsLoRA)."""
    dropout: float = 0.05
    """Dropout on the adapter path's input only (the base path never sees it); in [0, 1)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    """Linear modules to adapt: an exact module name, a dotted suffix (`q_proj` matches
    `model.layers.0.self_attn.q_proj`), or a regex prefixed with `re:` matched against the full name."""
    magnitude_only_modules: tuple[str, ...] = ()
    """Modules (same matching) that train only the magnitude `m`, no `A`/`B` (DoRA methods only).
    They need not appear in `target_modules`."""
    norm: str = "detached"
    """`detached`: the row norm is a constant in backward (DoRA paper §4.3, cheap);
    `exact`: gradients flow through the norm too."""
    use_rslora: bool = False
    """Use `s = alpha / sqrt(r)` instead of `alpha / r`."""
    adapter_dtype: str = "float32"
    """Storage dtype of `A`, `B` and the magnitude offset. float32 by default: an optimizer updating
    bf16 parameters in place rounds most small steps away (the first AdamW step at lr 2e-5 leaves 81%
    of a SmolLM2 `lora_A` unchanged in bf16, 0% in fp32; docs/peft-and-trainers.md). Compute never
    happens in it on CPU."""
    compute_dtype: str = "auto"
    """Dtype of the matmuls: `auto` = float32 on CPU (bf16 matmuls are very slow there), bfloat16 on CUDA."""
    block_rows: int = 1024
    """Rows of the base weight dequantized at once: peak temporary memory is `block_rows × in_features`."""
    nf4_blocksize: int = 64
    """bitsandbytes NF4 block size used when this library quantizes a weight."""
    double_quant: bool = True
    """Quantize the NF4 absmax statistics too (bitsandbytes `compress_statistics`)."""
    quant_storage: str = "uint8"
    """dtype holding the packed NF4 data (`bfloat16` lets FSDP shard it with the rest of the model)."""
    eps: float = 1e-6
    """Row norms below this are clamped to it, so zero rows never divide by zero."""
    quantize_frozen: bool = True
    """qlora/qdora: also quantize to NF4 the linear layers that get no adapter (as a 4-bit load does)."""
    keep_full_precision: tuple[str, ...] = ("lm_head",)
    """Linear modules (same matching as targets) never quantized by `quantize_frozen`."""
    direction: str = "lora"
    """The direction update: `lora` (trainable `A`, `B`) or `vera` (VeRA, Kopiczko et al. 2024: frozen
    random `A`, `B` shared by every adapted layer, trainable vectors `λ_d` (r,) and `λ_b` (out,); the update
    is `diag(λ_b)·B·diag(λ_d)·A` with `s = 1`, so `alpha` is unused and `r` may exceed a layer's width)."""
    vera_d_init: float = 0.1
    """VeRA: initial value of every `λ_d` entry (`λ_b` starts at 0, so step 0 is the base model)."""
    projection_seed: int = 0
    """VeRA: seed of the shared random projections (they are also saved with the adapter)."""

    def __post_init__(self):
        # Normalise sequences given as a single string or a list, before checking anything.
        for name in ("target_modules", "magnitude_only_modules", "keep_full_precision"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if isinstance(value, (list, set, frozenset)):
                value = tuple(sorted(value) if isinstance(value, (set, frozenset)) else value)
            object.__setattr__(self, name, value)
        p = Problems("AdapterConfig")
        p.choice("method", self.method, METHODS)
        is_dora = self.method in DORA_METHODS
        adapts = self.method != "full"
        if adapts:
            p.positive_int("r", self.r, "typical: 8, 16, 32, 64")
            p.number("alpha", self.alpha, hint="typical: 2*r")
            if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
                p.add(f"dropout={self.dropout!r} must be in [0, 1) (typical: 0.05; 0 disables it)")
            if not isinstance(self.target_modules, tuple) or not all(
                    isinstance(t, str) and t for t in self.target_modules):
                p.add(f"target_modules={self.target_modules!r} must be a tuple of non-empty strings")
            elif not self.target_modules and not self.magnitude_only_modules:
                p.add("target_modules is empty: name the linear modules to adapt, "
                      "e.g. ('q_proj', 'k_proj', 'v_proj', 'up_proj', 'down_proj')")
            for pattern in (*self.target_modules, *self.magnitude_only_modules):
                if isinstance(pattern, str) and pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as err:
                        p.add(f"target pattern {pattern!r} is not a valid regex: {err}")
        if p.choice("direction", self.direction, DIRECTIONS, use="'lora' (default) or 'vera'") \
                and self.direction == "vera" and not adapts:
            p.add("direction='vera' needs an adapter method (lora, dora, qlora, qdora), not 'full'")
        if not isinstance(self.vera_d_init, (int, float)) or not math.isfinite(self.vera_d_init) \
                or self.vera_d_init == 0:
            p.add(f"vera_d_init={self.vera_d_init!r} must be a finite non-zero number (VeRA uses 0.1)")
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int):
            p.add(f"projection_seed={self.projection_seed!r} must be an integer")
        if self.magnitude_only_modules and not is_dora:
            p.add(f"magnitude_only_modules={self.magnitude_only_modules!r} needs a DoRA method "
                  f"(dora or qdora), not method={self.method!r}")
        p.choice("norm", self.norm, NORM_MODES, use="'detached' (default) or 'exact'")
        if _dtype_name(self.adapter_dtype) is None:
            p.add(f"adapter_dtype={self.adapter_dtype!r} is unknown; use 'bfloat16' or 'float32'")
        else:
            object.__setattr__(self, "adapter_dtype", _dtype_name(self.adapter_dtype))
        if self.compute_dtype != "auto":
            if _dtype_name(self.compute_dtype) is None:
                p.add(f"compute_dtype={self.compute_dtype!r} is unknown; use 'auto', 'float32' or 'bfloat16'")
            else:
                object.__setattr__(self, "compute_dtype", _dtype_name(self.compute_dtype))
        p.positive_int("block_rows", self.block_rows, "e.g. 1024")
        if self.nf4_blocksize not in NF4_BLOCKSIZES:
            p.add(f"nf4_blocksize={self.nf4_blocksize!r} is not supported by bitsandbytes; "
                  f"use one of {NF4_BLOCKSIZES} (64 is the QLoRA default)")
        storage = _dtype_name(self.quant_storage) if self.quant_storage != "uint8" else "uint8"
        if storage in QUANT_STORAGE:
            object.__setattr__(self, "quant_storage", storage)
        else:
            p.choice("quant_storage", self.quant_storage, QUANT_STORAGE, use=f"one of {QUANT_STORAGE}")
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1e-2:
            p.add(f"eps={self.eps!r} must be a small positive number (default 1e-6)")
        p.raise_if_any()

    # ---- derived values -------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.method in QUANTIZED_METHODS

    @property
    def use_dora(self) -> bool:
        return self.method in DORA_METHODS

    @property
    def scaling(self) -> float:
        if self.direction == "vera":
            return 1.0
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def resolved_compute_dtype(self, device: torch.device | str) -> torch.dtype:
        if self.compute_dtype != "auto":
            return _DTYPES[self.compute_dtype]
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    def half_rank(self) -> "AdapterConfig":
        """The DoRA paper's DoRA†: half the rank and half the alpha, so the scale `s` is unchanged."""
        if self.r < 2:
            raise ValueError(f"half_rank() needs r >= 2, got r={self.r}")
        if self.direction == "vera":
            return self.replace(r=self.r // 2)
        return self.replace(r=self.r // 2, alpha=self.alpha / 2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def shared_fields(cls, other) -> tuple[str, ...]:
        """The fields of `other` (a settings dataclass such as `TrainConfig`) that are adapter fields:
        same name, same meaning. A setting that configures the adapter is declared here once and
        reaches `qdora train` or `qdora plan` by a field of the same name there."""
        return tuple(f.name for f in dataclasses.fields(other) if f.name in {g.name for g in dataclasses.fields(cls)})

    @classmethod
    def of(cls, settings, **overrides) -> "AdapterConfig":
        """The adapter described by `settings`' adapter fields (`shared_fields`), with `overrides`."""
        values = {name: getattr(settings, name) for name in cls.shared_fields(settings)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**{**values, **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields {unknown}; known: {sorted(names)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})
