"""NF4 row-block dequantization (bitsandbytes layout).

bitsandbytes quantizes a weight by flattening it and cutting it into blocks of `blocksize`
consecutive values, each with one absmax; two 4-bit codes are packed per byte, the first value in
the high nibble. A block of rows `[r0, r1)` of an `(out, in)` weight is therefore the contiguous
flat range `[r0·in, r1·in)`: when `r0·in` is a multiple of `blocksize`, it is a contiguous slice
of the packed bytes and of the absmax vector, and can be dequantized on its own.

Two implementations share one entry point:
- `dequantize_nf4_reference`: plain torch, the oracle;
- the bitsandbytes op (`torch.ops.bitsandbytes.dequantize_4bit`, native on CPU and CUDA).

bitsandbytes 0.50's CPU kernel indexes blocks per row of the `shape` it is given, which is wrong
when a row is not a whole number of blocks (e.g. shape (7, 96), blocksize 64: errors up to 3×
the quantization error). `dequantize_nf4` therefore only ever hands it shapes whose rows are whole
blocks, and a flat `(1, n)` shape for a trailing partial block.
"""

from __future__ import annotations

import torch

# NF4 code book (QLoRA, Dettmers et al. 2023, Appendix E); identical to bitsandbytes' table.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def dequantize_nf4_reference(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                             numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain-torch NF4 dequantization of `numel` values from `packed` (uint8, 2 codes a byte,
    high nibble first) with one fp32 `absmax` per `blocksize` values. Returns a flat tensor."""
    packed = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:numel].long()
    values = NF4_CODE.to(packed.device)[codes]
    scale = absmax.float().repeat_interleave(blocksize)[:numel]
    return (values * scale).to(dtype)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                   shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a contiguous run of NF4 blocks into a `shape = (rows, cols)` tensor.

    `packed` holds the bytes of `rows·cols` values starting on a block boundary; `absmax` the
    fp32 scale of each of those blocks. Uses the bitsandbytes kernel (CPU or CUDA).
    """
    rows, cols = shape
    numel = rows * cols
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    if absmax.dtype != torch.float32:
        absmax = absmax.float()
    op = torch.ops.bitsandbytes.dequantize_4bit.default
    if cols % blocksize == 0:
        return op(packed, absmax, blocksize, "nf4", (rows, cols), dtype)
    whole = numel - numel % blocksize
    if whole == numel:  # rows are not whole blocks, but the run is: one block per kernel row
        return op(packed, absmax, blocksize, "nf4", (numel // blocksize, blocksize), dtype).view(rows, cols)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    if whole:
        out[:whole] = op(packed[: whole // 2], absmax[: whole // blocksize], blocksize, "nf4",
                         (whole // blocksize, blocksize), dtype).view(-1)
    out[whole:] = op(packed[whole // 2:], absmax[whole // blocksize:], blocksize, "nf4",
                     (1, numel - whole), dtype).view(-1)
    return out.view(rows, cols)
