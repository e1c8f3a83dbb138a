"""`QDoRALinear`: a frozen linear base (NF4 `bnb.nn.Linear4bit` or plain `nn.Linear`) with a
DoRA adapter (`m`, `A`, `B`), a LoRA adapter (`A`, `B`), or a magnitude only (`m`); the direction
`B·A` is either trained directly (LoRA) or VeRA's `diag(λ_b)·B·diag(λ_d)·A` over frozen random
projections shared by all layers (`VeRAProjections`)."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import numpy as np
import torch
from torch import nn

from qdora.core.dropout import Dropout
from qdora.core.function import DoRAFunction, LayerSpec, factored_norm_sq
from qdora.core.nf4 import RowBlocks


class VeRAProjections(nn.Module):
    """VeRA's frozen random projections, one pair shared by every adapted layer of a model.

    `A (r, max_in)` and `B (max_out, r)`, Kaiming-uniform from `seed` (as VeRA and PEFT's `VeraModel`);
    a layer of shape `(out, in)` uses the slices `A[:, :in]` and `B[:out]`, so they cost memory once.
    Registered as a submodule of every layer that uses it (PyTorch deduplicates shared modules); its
    buffers are not in `state_dict` — the adapter file stores them once (`qdora.models.adapter_io`).
    """

    def __init__(self, r: int, max_in: int, max_out: int, seed: int = 0, device=None):
        super().__init__()
        if r <= 0 or max_in <= 0 or max_out <= 0:
            raise ValueError(f"VeRA projections need positive sizes, got r={r}, max_in={max_in}, max_out={max_out}")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        A = torch.empty(r, max_in)
        B = torch.empty(max_out, r)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
        nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=gen)
        self.r, self.seed = r, seed
        self.register_buffer("A", A.to(device), persistent=False)
        self.register_buffer("B", B.to(device), persistent=False)

    def extra_repr(self) -> str:
        return f"r={self.r}, max_in={self.A.shape[1]}, max_out={self.B.shape[0]}, seed={self.seed}"


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one dtype and shape hold the same bits. On CPU through numpy, whose
    comparison is about 3x faster than `torch.equal`'s there (measured: 4.3 against 11.5 µs for
    27,648 fp32 values), on integer views (bf16 has no numpy dtype); elsewhere `torch.equal`."""
    if a.device.type == "cpu":
        kind = _INT_OF_SIZE[a.element_size()]
        return np.array_equal(a.view(kind).numpy(), b.view(kind).numpy())
    return torch.equal(a, b)


class QDoRALinear(nn.Module):
    """Adapted linear layer. The math is `qdora.core.function.DoRAFunction`.

    Args:
        base_layer: the frozen base: `nn.Linear` (dora/lora) or an NF4 `bnb.nn.Linear4bit` (qdora/qlora).
        r: rank of `B·A`; 0 means magnitude only (DoRA) — no `A`/`B`.
        alpha: scale numerator (`s = alpha/r`, or `alpha/sqrt(r)` with `use_rslora`).
        dropout: dropout probability on the adapter path's input.
        use_dora: learn a magnitude `m` and normalise rows (DoRA); False gives LoRA.
        norm: `"detached"` (norm constant in backward) or `"exact"`.
        adapter_dtype: storage dtype of `A`, `B` and the magnitude offset.
        compute_dtype: dtype of the matmuls, or `"auto"` (fp32 on CPU, bf16 on CUDA).
        block_rows: rows of the base weight dequantized at once.
        eps: clamp for row norms (zero rows never divide by zero).
        vera: shared `VeRAProjections` for a VeRA direction (then `r` is theirs, `s = 1`, `alpha` unused,
            and the trainable direction is `vera_lambda_d (r,)`, init `vera_d_init`, and
            `vera_lambda_b (out,)`, init 0; `lora_A`/`lora_B` are None).

    The magnitude is stored as an offset from the base row norm: `m = ||W0 row|| + magnitude_delta`
    with `magnitude_delta` trainable and initialised at 0. At step 0 `m / n` is exactly 1, and
    small updates are not rounded away when the offset is stored in bf16 (an O(1) `m` in bf16
    would lose updates below ~4e-3·m). `magnitude` returns the full `m` in fp32.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_dora: bool = True, norm: str = "detached", use_rslora: bool = False,
                 adapter_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | str = "auto",
                 block_rows: int = 1024, eps: float = 1e-6, vera: VeRAProjections | None = None,
                 vera_d_init: float = 0.1):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be nn.Linear or bnb.nn.Linear4bit, got {type(base_layer).__name__}")
        if norm not in ("detached", "exact"):
            raise ValueError(f"norm={norm!r} is unknown; use 'detached' or 'exact'")
        if r == 0 and not use_dora:
            raise ValueError("r=0 (magnitude only) needs use_dora=True")
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.base_layer = base_layer
        self._blocks = RowBlocks(base_layer, block_rows)
        self.in_features = self._blocks.in_features
        self.out_features = self._blocks.out_features
        if vera is not None:
            if r != vera.r or vera.A.shape[1] < self.in_features or vera.B.shape[0] < self.out_features:
                raise ValueError(f"VeRA projections ({vera.extra_repr()}) do not cover this r={r} "
                                 f"{self.out_features}x{self.in_features} layer")
        elif r < 0 or r > min(self.in_features, self.out_features):
            raise ValueError(f"r={r} is out of range for a {self.out_features}x{self.in_features} layer: "
                             f"use 1 <= r <= {min(self.in_features, self.out_features)}")
        self.r = r
        self.alpha = alpha
        self.use_dora = use_dora
        self.norm = norm
        self.use_rslora = use_rslora
        self.scaling = 1.0 if vera is not None else (alpha / math.sqrt(r) if use_rslora else alpha / r) if r else 0.0
        self.compute_dtype = compute_dtype
        self.eps = eps
        self.lora_dropout = Dropout(dropout) if dropout > 0 and r > 0 else nn.Identity()
        device = self._blocks.device
        self.vera = vera
        if vera is not None:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
            self.vera_lambda_d = nn.Parameter(torch.full((r,), float(vera_d_init), dtype=adapter_dtype, device=device))
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=adapter_dtype, device=device))
        elif r > 0:
            A = torch.empty(r, self.in_features, dtype=torch.float32, device=device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as nn.Linear, PEFT and the LoRA paper
            self.lora_A = nn.Parameter(A.to(adapter_dtype))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=adapter_dtype, device=device))
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        if use_dora:
            # c = rowsum(W0²) from the weight actually used (the dequantized NF4 one), once: W0 is frozen.
            self.register_buffer("base_row_sq_norm", self._blocks.row_sq_norms(), persistent=False)
            self.magnitude_delta = nn.Parameter(torch.zeros(self.out_features, dtype=adapter_dtype, device=device))
        else:
            self.register_buffer("base_row_sq_norm", None, persistent=False)
            self.register_parameter("magnitude_delta", None)
        self._norm_cache: tuple[tuple[torch.Tensor, ...], float, torch.Tensor] | None = None
        self.disabled = False
        """While True the layer is its base: `forward` is the base layer's own (magnitude, direction and
        dropout all off), as PEFT's `disable_adapter()` makes its layers (`qdora.models.switch`)."""

    # ---- the magnitude -------------------------------------------------------------------
    @property
    def base_norm(self) -> torch.Tensor:
        """`||W0 row||` (fp32) of the dequantized base."""
        return self.base_row_sq_norm.clamp_min(0).sqrt()

    @property
    def magnitude(self) -> torch.Tensor | None:
        """The DoRA magnitude `m` (fp32, differentiable through `magnitude_delta`)."""
        if not self.use_dora:
            return None
        return self.base_norm + self.magnitude_delta.float()

    @torch.no_grad()
    def set_magnitude(self, m: torch.Tensor) -> None:
        """Set `m` (e.g. from a PEFT adapter): stores `m − ||W0 row||` in `magnitude_delta`."""
        if not self.use_dora:
            raise ValueError("this layer has no magnitude (LoRA)")
        if m.shape != (self.out_features,):
            raise ValueError(f"magnitude must have shape ({self.out_features},), got {tuple(m.shape)}")
        self.magnitude_delta.copy_(m.float().to(self.base_norm.device) - self.base_norm)

    # ---- forward -----------------------------------------------------------------------------
    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return self.compute_dtype

    @property
    def has_direction(self) -> bool:
        """Whether the layer has a direction update (`B·A` or VeRA's), i.e. is not magnitude-only."""
        return self.lora_A is not None or self.vera is not None

    def direction_factors(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(A, B)` with the update `s·B·A`: the LoRA parameters, or VeRA's `(diag(λ_d)·A, diag(λ_b)·B)`
        in fp32 (differentiable in `λ_d`, `λ_b`; O((in + out)·r), never `out × in`)."""
        if self.vera is None:
            return self.lora_A, self.lora_B
        A = self.vera.A[:, :self.in_features] * self.vera_lambda_d.float()[:, None]
        B = self.vera.B[:self.out_features] * self.vera_lambda_b.float()[:, None]
        return A, B

    def _norm_inputs(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the row norm depends on besides the frozen base: the direction's factors
        (LoRA's `A`, `B`, or VeRA's scaling vectors and shared projections)."""
        if self.vera is not None:
            return (self.vera_lambda_d, self.vera_lambda_b, self.vera.A, self.vera.B)
        return () if self.lora_A is None else (self.lora_A, self.lora_B)

    def _cached_norm(self) -> torch.Tensor | None:
        """The cached row norm, served only if the tensors it was computed from are equal, element
        for element, to the current ones (and it can join this forward's autograd graph). Correct by
        construction: no write to `A`/`B` can go unseen, whatever makes it (fused optimizers and
        `.data` writes bump no version counter). Costs one read of `A` and `B`, O(r·(in + out)),
        against the O(r·in·out) of recomputing `W0·Aᵀ`; on CUDA the comparison syncs with the host."""
        if self._norm_cache is None:
            return None
        snapshot, scaling, norm = self._norm_cache
        current = self._norm_inputs()
        if scaling != self.scaling or len(current) != len(snapshot):
            return None
        if norm.is_inference() and not torch.is_inference_mode_enabled():
            return None
        for now, then in zip(current, snapshot):
            if now.device != then.device or now.dtype != then.dtype or now.shape != then.shape \
                    or not _same_bits(now.detach(), then):
                return None
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        if self.disabled:
            return self.base_layer(x)
        x_lora = self.lora_dropout(x) if self.has_direction else x
        # In eval mode the row norm depends only on the direction's factors: reuse it while they are
        # equal to those it was computed from (`_cached_norm`).
        use_cache = self.use_dora and not self.training and (self.norm == "detached" or not torch.is_grad_enabled())
        cached = self._cached_norm() if use_cache else None
        spec = LayerSpec(blocks=self._blocks, c=self.base_row_sq_norm, bias=self.base_layer.bias,
                         scaling=self.scaling, exact=self.norm == "exact", eps=self.eps,
                         compute_dtype=self._compute_dtype(x.device), cached_norm=cached)
        A, B = self.direction_factors()
        y = DoRAFunction.apply(x, x_lora, A, B, self.magnitude, spec)
        if use_cache and cached is None:
            snapshot = tuple(t.detach().clone() for t in self._norm_inputs())
            self._norm_cache = (snapshot, self.scaling, spec.norm_out.detach())
        elif not use_cache:
            self._norm_cache = None
        return y

    @torch.no_grad()
    def row_norm(self) -> torch.Tensor:
        """`||W0 + s·B·A||` per output row (fp32), by the factored formula: `P = W0·Aᵀ` in one pass
        over the packed weight (`RowBlocks.norm_terms`), `c` cached."""
        if not self.has_direction:
            return self.base_norm
        A, B = (t.float() for t in self.direction_factors())
        P, _ = self._blocks.norm_terms(A)
        return factored_norm_sq(self.base_row_sq_norm, P, A, B, self.scaling).clamp_min_(0).sqrt_()

    def dequantized_base(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole base weight as the layer uses it (tests and small layers)."""
        return self._blocks.dequantize(dtype)

    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, bnb.nn.Linear4bit)

    def extra_repr(self) -> str:
        kind = ("q" if self.quantized else "") + ("dora" if self.use_dora else "lora")
        if self.vera is not None:
            kind += " (VeRA direction)"
        if self.r == 0:
            kind += " (magnitude only)"
        return (f"{kind}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, norm={self.norm}")


class ExactLinear4bit(bnb.nn.Linear4bit):
    """A frozen NF4 linear layer whose rows are not whole NF4 blocks (`in_features` not a multiple of
    the blocksize), computed on CPU by qdora's row-block path: `y = x·W0ᵀ + bias` through
    `DoRAFunction` with no adapter (backward `dx = dy·W0`), W0 dequantized by `RowBlocks`, fp32.
    bitsandbytes 0.50.2's CPU kernels dequantize per row of the 2-D shape, which is wrong there (a
    64x32 layer's output off by up to 8); elsewhere (CUDA) its own forward runs. Same parameters,
    state dict and type checks as `bnb.nn.Linear4bit` (`exact_frozen_forward` turns a layer into one)."""

    _blocks: RowBlocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return frozen_forward(self._blocks, self.bias, x, torch.float32)


def frozen_forward(blocks: RowBlocks, bias: torch.Tensor | None, x: torch.Tensor,
                   compute_dtype: torch.dtype) -> torch.Tensor:
    """`x·W0ᵀ + bias` for a frozen base, W0 read row block by row block (`DoRAFunction` with no
    adapter: its backward is `dx = dy·W0`, again block by block)."""
    spec = LayerSpec(blocks=blocks, c=None, bias=bias, scaling=0.0, exact=False, eps=1e-6,
                     compute_dtype=compute_dtype)
    return DoRAFunction.apply(x, x, None, None, None, spec)


def exact_frozen_forward(layer: nn.Module, block_rows: int = 1024) -> bool:
    """Make a frozen `bnb.nn.Linear4bit` whose rows are not whole NF4 blocks an `ExactLinear4bit`, in
    place; True if it did. Aligned layers (every real model's, so far) keep bitsandbytes' forward."""
    if type(layer) is not bnb.nn.Linear4bit or layer.in_features % layer.weight.blocksize == 0:
        return False
    layer._blocks = RowBlocks(layer, block_rows)
    layer.__class__ = ExactLinear4bit
    return True
