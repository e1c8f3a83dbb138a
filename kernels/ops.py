r"""The kernel ops behind `QDoRALinear`, declared once with `torch.library`.

Each op has a schema (from the type hints), a fake implementation (shapes only, so `torch.compile`
traces it and `torch.library.opcheck` checks it) and two kernels:

    CUDA tensor and Triton importable   ->  `qdora.kernels.triton_kernels`
    anything else (CPU, no Triton, ...)  ->  `qdora.kernels.reference` (plain torch)

The ops (NF4 operands in bitsandbytes' layout; their arguments are described in `reference`):

    qdora::dequantize_nf4(packed, absmax, absmax_code?, absmax_scale?, absmax_offset?, blocksize,
                          absmax_blocksize, start, rows, cols, dtype) -> W[start:start+rows]
    qdora::nf4_norm_terms(... same NF4 operand ..., A?) -> (P = W·Aᵀ, c = rowsum(W²)), fp32,
                          one pass over the packed data, no dequantized weight in memory
    qdora::dora_epilogue_(out!, a?, B?, g?, bias?, scaling) -> ()   out ← g ⊙ (out + s·a·Bᵀ) + bias
    qdora::dora_epilogue_backward(dy, y, g, bias?) -> (dh = dy ⊙ g, Σ_t dy ⊙ (y − bias))

`NF4Weight` bundles an NF4 operand so call sites pass one object.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from qdora.kernels import reference


@functools.cache
def triton_kernels():
    """The Triton module, or None when Triton is not importable."""
    try:
        from qdora.kernels import triton_kernels as module  # optional: needs Triton
    except ImportError:
        return None
    return module


def _cuda_kernel(name: str):
    """A CUDA kernel that runs the Triton implementation `name`, or the reference without Triton."""
    def kernel(*args):
        module = triton_kernels()
        return getattr(module if module is not None else reference, name)(*args)
    kernel.__name__ = f"{name}_cuda"
    return kernel


# ---- NF4 dequantization ----------------------------------------------------------------------------

@torch.library.custom_op("qdora::dequantize_nf4", mutates_args=())
def dequantize_nf4(packed: Tensor, absmax: Tensor, absmax_code: Optional[Tensor], absmax_scale: Optional[Tensor],
                   absmax_offset: Optional[Tensor], blocksize: int, absmax_blocksize: int, start: int,
                   rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """Rows `[start, start + rows)` of a `(·, cols)` NF4 weight, as `(rows, cols)` in `dtype`."""
    return reference.dequantize_nf4_rows(packed, absmax, absmax_code, absmax_scale, absmax_offset, blocksize,
                                         absmax_blocksize, start, rows, cols, dtype)


@dequantize_nf4.register_fake
def _(packed, absmax, absmax_code, absmax_scale, absmax_offset, blocksize, absmax_blocksize, start, rows,
      cols, dtype):
    return packed.new_empty((rows, cols), dtype=dtype)


dequantize_nf4.register_kernel("cuda")(_cuda_kernel("dequantize_nf4_rows"))


# ---- norm terms -----------------------------------------------------------------------------------

@torch.library.custom_op("qdora::nf4_norm_terms", mutates_args=())
def nf4_norm_terms(packed: Tensor, absmax: Tensor, absmax_code: Optional[Tensor], absmax_scale: Optional[Tensor],
                   absmax_offset: Optional[Tensor], blocksize: int, absmax_blocksize: int, start: int,
                   rows: int, cols: int, A: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """`(P, c)` of NF4 rows `W = [start, start + rows)`: `P = W·Aᵀ` (rows × r) and `c = rowsum(W²)`,
    both fp32. Without `A`, `P` is `(rows, 0)`."""
    return reference.nf4_norm_terms(packed, absmax, absmax_code, absmax_scale, absmax_offset, blocksize,
                                    absmax_blocksize, start, rows, cols, A)


@nf4_norm_terms.register_fake
def _(packed, absmax, absmax_code, absmax_scale, absmax_offset, blocksize, absmax_blocksize, start, rows,
      cols, A):
    r = 0 if A is None else A.shape[0]
    return (packed.new_empty((rows, r), dtype=torch.float32), packed.new_empty((rows,), dtype=torch.float32))


nf4_norm_terms.register_kernel("cuda")(_cuda_kernel("nf4_norm_terms"))


# ---- DoRA epilogue ---------------------------------------------------------------------------------

@torch.library.custom_op("qdora::dora_epilogue_", mutates_args=("out",))
def dora_epilogue_(out: Tensor, a: Optional[Tensor], B: Optional[Tensor], g: Optional[Tensor],
                   bias: Optional[Tensor], scaling: float) -> None:
    """In place on `out` (tokens × out_features, `x·W0ᵀ` on entry): `out ← g ⊙ (out + s·a·Bᵀ) + bias`."""
    reference.dora_epilogue_(out, a, B, g, bias, scaling)


@dora_epilogue_.register_fake
def _(out, a, B, g, bias, scaling):
    return None


dora_epilogue_.register_kernel("cuda")(_cuda_kernel("dora_epilogue_"))


@torch.library.custom_op("qdora::dora_epilogue_backward", mutates_args=())
def dora_epilogue_backward(dy: Tensor, y: Tensor, g: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """`dh = dy ⊙ g` (dy's dtype) and `Σ_t dy ⊙ (y − bias)` (fp32, per column; `dm` once divided by `m`)."""
    return reference.dora_epilogue_backward(dy, y, g, bias)


@dora_epilogue_backward.register_fake
def _(dy, y, g, bias):
    return torch.empty_like(dy, memory_format=torch.contiguous_format), dy.new_empty((dy.shape[1],),
                                                                                     dtype=torch.float32)


dora_epilogue_backward.register_kernel("cuda")(_cuda_kernel("dora_epilogue_backward"))


# ---- a convenience for NF4 operands -----------------------------------------------------------------

@dataclass(frozen=True)
class NF4Weight:
    """An NF4 `(out, in)` weight in bitsandbytes' layout, as the ops take it."""

    packed: Tensor
    absmax: Tensor
    absmax_code: Tensor | None
    absmax_scale: Tensor | None
    absmax_offset: Tensor | None
    blocksize: int
    absmax_blocksize: int
    shape: tuple[int, int]

    @classmethod
    def from_quant_state(cls, packed: Tensor, state) -> "NF4Weight":
        """From a bitsandbytes `Params4bit`'s data and `QuantState` (double quantization or not)."""
        if state.quant_type != "nf4":
            raise ValueError(f"quant_type={state.quant_type!r}: these ops read NF4 only")
        if len(state.shape) != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(state.shape)}")
        packed = packed.reshape(-1).view(torch.uint8)
        if state.nested:
            s2 = state.state2
            offset = torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device)
            return cls(packed, state.absmax, s2.code, s2.absmax, offset, state.blocksize, s2.blocksize,
                       tuple(state.shape))
        return cls(packed, state.absmax, None, None, None, state.blocksize, 256, tuple(state.shape))

    def _args(self) -> tuple:
        return (self.packed, self.absmax, self.absmax_code, self.absmax_scale, self.absmax_offset,
                self.blocksize, self.absmax_blocksize)

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """`W[start:stop]` in `dtype` (`torch.ops.qdora.dequantize_nf4`)."""
        return dequantize_nf4(*self._args(), start, stop - start, self.shape[1], dtype)

    def norm_terms(self, A: Tensor | None, start: int = 0, stop: int | None = None) -> tuple[Tensor, Tensor]:
        """`(W·Aᵀ, rowsum(W²))` of rows `[start, stop)` in fp32 (`torch.ops.qdora.nf4_norm_terms`)."""
        stop = self.shape[0] if stop is None else stop
        if A is not None and A.shape[1] != self.shape[1]:
            raise ValueError(f"A has {A.shape[1]} columns, the weight has {self.shape[1]}")
        return nf4_norm_terms(*self._args(), start, stop - start, self.shape[1], A)
