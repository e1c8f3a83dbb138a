r"""Reference implementations of the ops in `qdora.kernels.ops` (what runs off CUDA).

NF4 operands (bitsandbytes layout) are described by the same arguments in every op:

    packed          uint8, two 4-bit codes a byte, the first value in the high nibble
    absmax          one scale per `blocksize` consecutive values of the flattened weight: fp32, or
                    with double quantization uint8 codes into `absmax_code` (256 fp32 values)
    absmax_scale    fp32, one per `absmax_blocksize` absmax codes (double quantization only)
    absmax_offset   0-d fp32 added back after double dequantization (double quantization only)
    start, rows, cols   rows `[start, start + rows)` of the `(out, cols)` weight, i.e. the flat
                    range `[start·cols, (start + rows)·cols)`; any start (aligned or not)

so element `i` of the flat weight is `NF4[code(i)] · absmax(i // blocksize)` with

    absmax(b) = absmax_code[absmax[b]] · absmax_scale[b // absmax_blocksize] + absmax_offset

(bitsandbytes' operation order, so results are bitwise equal to its own dequantization).

The epilogue of a DoRA layer, with `h = base + s·a·Bᵀ` (`base = x·W0ᵀ`, `a = x_d·Aᵀ`), `g = m/n`:

    forward   y  = g ⊙ h + bias
    backward  dh = dy ⊙ g,   Σ_t dy ⊙ (y − bias) = Σ_t dy ⊙ g ⊙ h   (the caller divides by m: dm)

The plain-torch code here mirrors the unfused sequence `QDoRALinear` has always run (addmm, mul,
add), so dispatching to it changes no result bit. Dequantization of aligned whole blocks uses
bitsandbytes' native kernel (exact, and ~4× faster than plain torch on CPU); `dequantize_nf4_reference`
in `qdora.kernels.nf4` is the all-plain-torch oracle the tests compare against.
"""

from __future__ import annotations

import torch

from qdora.kernels.nf4 import NF4_CODE, dequantize_nf4

# Rows dequantized at once inside the norm-terms reference: bounds its temporary to ROWS × cols fp32.
NORM_TERMS_ROWS = 256


def absmax_fp32(absmax: torch.Tensor, absmax_code: torch.Tensor | None, absmax_scale: torch.Tensor | None,
                absmax_offset: torch.Tensor | None, absmax_blocksize: int, b0: int, b1: int) -> torch.Tensor:
    """fp32 absmax of NF4 blocks `[b0, b1)`, undoing double quantization when `absmax_code` is given."""
    if absmax_code is None:
        return absmax[b0:b1].float()
    q = absmax[b0:b1].long()
    # Block b's scale is absmax_scale[b // absmax_blocksize]: repeat the few scales covering [b0, b1)
    # (same values as indexing with arange(b0, b1) // absmax_blocksize, ~3x faster on CPU).
    k0 = b0 // absmax_blocksize
    scale = absmax_scale[k0:-(-b1 // absmax_blocksize)].float().repeat_interleave(absmax_blocksize)
    scale = scale[b0 - k0 * absmax_blocksize:b1 - k0 * absmax_blocksize]
    return absmax_code.float()[q] * scale + absmax_offset.float()


def dequantize_nf4_rows(packed, absmax, absmax_code, absmax_scale, absmax_offset, blocksize: int,
                        absmax_blocksize: int, start: int, rows: int, cols: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """Rows `[start, start + rows)` of an NF4 weight as a `(rows, cols)` tensor in `dtype`."""
    packed = packed.reshape(-1).view(torch.uint8)
    n0, n1 = start * cols, (start + rows) * cols
    if n1 == n0:
        return torch.empty(rows, cols, dtype=dtype, device=packed.device)
    b0, b1 = n0 // blocksize, -(-n1 // blocksize)
    scale = absmax_fp32(absmax, absmax_code, absmax_scale, absmax_offset, absmax_blocksize, b0, b1)
    if n0 % blocksize == 0 and n0 % 2 == 0 and packed.device.type in ("cpu", "cuda"):
        return dequantize_nf4(packed[n0 // 2:(n1 + 1) // 2], scale, blocksize, (rows, cols), dtype)
    # Unaligned start (or a device bitsandbytes has no kernel for): per-element plain torch.
    idx = torch.arange(n0, n1, device=packed.device)
    byte = packed[idx >> 1]
    codes = torch.where((idx & 1) == 0, byte >> 4, byte & 0xF).long()
    values = NF4_CODE.to(packed.device)[codes] * scale[idx // blocksize - b0]
    return values.to(dtype).view(rows, cols)


def nf4_norm_terms(packed, absmax, absmax_code, absmax_scale, absmax_offset, blocksize: int,
                   absmax_blocksize: int, start: int, rows: int, cols: int,
                   A: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`P = W·Aᵀ` (rows × r, fp32) and `c = rowsum(W²)` (rows, fp32) for the NF4 rows `W`, in fp32,
    `NORM_TERMS_ROWS` rows at a time (the whole dequantized weight never exists)."""
    r = 0 if A is None else A.shape[0]
    P = torch.empty(rows, r, dtype=torch.float32, device=packed.device)
    c = torch.empty(rows, dtype=torch.float32, device=packed.device)
    A32 = None if A is None else A.float()
    for i0 in range(0, rows, NORM_TERMS_ROWS):
        i1 = min(rows, i0 + NORM_TERMS_ROWS)
        W = dequantize_nf4_rows(packed, absmax, absmax_code, absmax_scale, absmax_offset, blocksize,
                                absmax_blocksize, start + i0, i1 - i0, cols, torch.float32)
        c[i0:i1] = W.pow(2).sum(1)
        if r:
            torch.mm(W, A32.t(), out=P[i0:i1])
    return P, c


def dora_epilogue_(out: torch.Tensor, a: torch.Tensor | None, B: torch.Tensor | None,
                   g: torch.Tensor | None, bias: torch.Tensor | None, scaling: float) -> None:
    """In place: `out ← g ⊙ (out + s·a·Bᵀ) + bias` (each term optional), in `out`'s dtype."""
    if a is not None:
        out.addmm_(a.to(out.dtype), B.to(out.dtype).t(), alpha=scaling)
    if g is not None:
        out.mul_(g.to(out.dtype))
    if bias is not None:
        out.add_(bias.to(out.dtype))


def dora_epilogue_backward(dy: torch.Tensor, y: torch.Tensor, g: torch.Tensor,
                           bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`dh = dy ⊙ g` (dy's dtype) and `Σ_t dy ⊙ (y − bias)` (fp32, one value per column).
    The sum is taken first, so at most one `tokens × columns` temporary exists besides `dh`."""
    yb = y.float()
    if bias is not None:
        yb = yb - bias.float()
    total = (dy.float() * yb).sum(0)
    del yb
    return dy * g.to(dy.dtype), total
