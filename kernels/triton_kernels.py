r"""Triton implementations of the ops in `qdora.kernels.ops` (CUDA; CPU only under TRITON_INTERPRET=1).

Each launcher takes and returns exactly what its reference in `qdora.kernels.reference` does.

- `dequantize_nf4_rows`: one program per `BLOCK` flat elements. Element `i` reads byte `i // 2`
  (high nibble when `i` is even), looks its code up in the 16-entry NF4 table and multiplies by the
  absmax of block `i // blocksize` (double quantization undone in registers). Any start row works.
- `nf4_norm_terms`: one program per `BLOCK_M` rows walks the row in `BLOCK_K` columns, dequantizes
  the tile in registers and accumulates `c += rowsum(W²)` and `P += W·Aᵀ`: the packed bytes are read
  once and no dequantized weight is written to memory.
- `dora_epilogue_`: one program per `(BLOCK_M tokens × BLOCK_N columns)` tile reads `base`, adds
  `s·a·Bᵀ` (a K = r dot, r padded to ≥ 16), scales by `g`, adds the bias and writes in place:
  one read and one write of the `tokens × out` tensor instead of three of each.
- `dora_epilogue_backward`: one program per `BLOCK_N` columns × token split reads `dy` and `y`
  once, writes `dh = dy ⊙ g` and a partial `Σ_t dy ⊙ (y − bias)`; the splits' partials are summed
  after (deterministic: no atomics).

`tl.dot` on bf16 operands returns garbage in the interpreter, and fp32 operands would use TF32 on
GPUs: dots run in fp32 with `input_precision="ieee"` when interpreting or when the data is fp32,
in the data's own dtype (bf16/fp16, fp32 accumulation) otherwise — the precision of the torch
`addmm` they replace.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qdora.kernels.nf4 import NF4_CODE

# Read when this module is imported, as `triton.jit` reads it to choose the interpreter.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _absmax(absmax_ptr, code2_ptr, scale2_ptr, offset_ptr, blk, mask, ABSMAX_BLOCKSIZE: tl.constexpr,
            DOUBLE: tl.constexpr):
    """fp32 absmax of NF4 blocks `blk` (same operation order as bitsandbytes)."""
    if DOUBLE:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(scale2_ptr + blk // ABSMAX_BLOCKSIZE, mask=mask, other=0.0)
        return tl.load(code2_ptr + q, mask=mask, other=0.0) * scale + tl.load(offset_ptr)
    return tl.load(absmax_ptr + blk, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _nf4_values(packed_ptr, nf4_ptr, absmax_ptr, code2_ptr, scale2_ptr, offset_ptr, idx, mask,
                BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr):
    """fp32 values of flat NF4 elements `idx` (int64)."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    code = tl.where((idx & 1) == 0, byte >> 4, byte & 0xF)
    value = tl.load(nf4_ptr + code, mask=mask, other=0.0)
    scale = _absmax(absmax_ptr, code2_ptr, scale2_ptr, offset_ptr, idx // BLOCKSIZE, mask,
                    ABSMAX_BLOCKSIZE, DOUBLE)
    return value * scale


@triton.jit
def _dequantize_kernel(packed_ptr,   # uint8, the whole packed weight
                       nf4_ptr,      # fp32 (16,) NF4 code book
                       absmax_ptr,   # fp32 or uint8 (double quantization), one per NF4 block
                       code2_ptr, scale2_ptr, offset_ptr,  # double quantization (unused otherwise)
                       out_ptr,      # (rows·cols,) output in its dtype
                       n0, numel,    # first flat element, number of elements
                       BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    v = _nf4_values(packed_ptr, nf4_ptr, absmax_ptr, code2_ptr, scale2_ptr, offset_ptr, n0 + offs, mask,
                    BLOCKSIZE, ABSMAX_BLOCKSIZE, DOUBLE)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_terms_kernel(packed_ptr, nf4_ptr, absmax_ptr, code2_ptr, scale2_ptr, offset_ptr,
                       a_ptr,        # (r, cols) A, any float dtype, row stride stride_a
                       p_ptr,        # (rows, r) fp32 output P = W·Aᵀ
                       c_ptr,        # (rows,) fp32 output c = rowsum(W²)
                       start, rows, cols, r, stride_a,
                       BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr,
                       HAS_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rm < rows
    row_base = (start + rm).to(tl.int64) * cols
    c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    P = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, cols, BLOCK_K):
        kk = k0 + rk
        mask = row_ok[:, None] & (kk < cols)[None, :]
        w = _nf4_values(packed_ptr, nf4_ptr, absmax_ptr, code2_ptr, scale2_ptr, offset_ptr,
                        row_base[:, None] + kk[None, :], mask, BLOCKSIZE, ABSMAX_BLOCKSIZE, DOUBLE)
        c += tl.sum(w * w, axis=1)
        if HAS_A:
            at = tl.load(a_ptr + rr[None, :] * stride_a + kk[:, None],
                         mask=(kk < cols)[:, None] & (rr < r)[None, :], other=0.0).to(tl.float32)
            P += tl.dot(w, at, input_precision="ieee")
    tl.store(c_ptr + rm, c, mask=row_ok)
    if HAS_A:
        tl.store(p_ptr + rm[:, None] * r + rr[None, :], P, mask=row_ok[:, None] & (rr < r)[None, :])


@triton.jit
def _epilogue_kernel(out_ptr,          # (T, N) base in, y out (in place), strides so, 1
                     a_ptr, b_ptr,     # (T, r) a (strides sa, 1) and (N, r) B (strides sb, 1)
                     g_ptr, bias_ptr,  # (N,) each
                     T, N, r, so, sa, sb, scaling,
                     HAS_LORA: tl.constexpr, HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr,
                     DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < T, rn < N
    mask = m_ok[:, None] & n_ok[None, :]
    ptrs = out_ptr + rm.to(tl.int64)[:, None] * so + rn[None, :]
    h = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * sa + rr[None, :], mask=m_ok[:, None] & (rr < r)[None, :],
                    other=0.0)
        bt = tl.load(b_ptr + rn[None, :] * sb + rr[:, None], mask=(rr < r)[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:
            lora = tl.dot(a.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        else:
            lora = tl.dot(a, bt)
        h += scaling * lora
    if HAS_G:
        h *= tl.load(g_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        h += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(ptrs, h.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue_backward_kernel(dy_ptr, y_ptr,      # (T, N), row strides sdy, sy
                              g_ptr, bias_ptr,    # (N,)
                              dh_ptr,             # (T, N) output dh = dy ⊙ g, contiguous
                              part_ptr,           # (splits, N) fp32 partial Σ_t dy ⊙ (y − bias)
                              T, N, sdy, sy, tokens_per_split,
                              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    n_ok = rn < N
    g = tl.load(g_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_start = split * tokens_per_split
    t_end = tl.minimum(T, t_start + tokens_per_split)
    for t0 in range(t_start, t_end, BLOCK_M):
        rm = (t0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rm < t_end)[:, None] & n_ok[None, :]
        dy = tl.load(dy_ptr + rm[:, None] * sdy + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rm[:, None] * sy + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(dy * (y - bias[None, :]), axis=0)
        tl.store(dh_ptr + rm[:, None] * N + rn[None, :], (dy * g[None, :]).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + split * N + rn, acc, mask=n_ok)


# ---- launchers ------------------------------------------------------------------------------------

_DEQUANT_BLOCK = 1024
_NORM_BLOCK_M, _NORM_BLOCK_K = 32, 64
_EPI_BLOCK_M, _EPI_BLOCK_N = 64, 64
_BWD_BLOCK_M, _BWD_BLOCK_N = 32, 64


def _nf4_pointers(packed, absmax, absmax_code, absmax_scale, absmax_offset):
    """Kernel arguments for an NF4 operand; unused double-quantization pointers get a dummy."""
    double = absmax_code is not None
    nf4 = NF4_CODE.to(packed.device)
    dummy = nf4
    return (packed.reshape(-1).view(torch.uint8), nf4, absmax.reshape(-1),
            absmax_code.float().contiguous() if double else dummy,
            absmax_scale.float().contiguous() if double else dummy,
            absmax_offset.float().reshape(1) if double else dummy), double


def dequantize_nf4_rows(packed, absmax, absmax_code, absmax_scale, absmax_offset, blocksize: int,
                        absmax_blocksize: int, start: int, rows: int, cols: int,
                        dtype: torch.dtype) -> torch.Tensor:
    args, double = _nf4_pointers(packed, absmax, absmax_code, absmax_scale, absmax_offset)
    out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    numel = rows * cols
    if numel:
        grid = (triton.cdiv(numel, _DEQUANT_BLOCK),)
        _dequantize_kernel[grid](*args, out, start * cols, numel, BLOCKSIZE=blocksize,
                                 ABSMAX_BLOCKSIZE=absmax_blocksize, DOUBLE=double, BLOCK=_DEQUANT_BLOCK)
    return out


def nf4_norm_terms(packed, absmax, absmax_code, absmax_scale, absmax_offset, blocksize: int,
                   absmax_blocksize: int, start: int, rows: int, cols: int,
                   A: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    args, double = _nf4_pointers(packed, absmax, absmax_code, absmax_scale, absmax_offset)
    r = 0 if A is None else A.shape[0]
    P = torch.empty(rows, r, dtype=torch.float32, device=packed.device)
    c = torch.empty(rows, dtype=torch.float32, device=packed.device)
    if rows == 0:
        return P, c
    if r:
        A = A if A.stride(1) == 1 else A.contiguous()
    grid = (triton.cdiv(rows, _NORM_BLOCK_M),)
    _norm_terms_kernel[grid](*args, A if r else c, P, c, start, rows, cols, r, A.stride(0) if r else 0,
                             BLOCKSIZE=blocksize, ABSMAX_BLOCKSIZE=absmax_blocksize, DOUBLE=double,
                             HAS_A=r > 0, BLOCK_M=_NORM_BLOCK_M, BLOCK_K=_NORM_BLOCK_K,
                             BLOCK_R=max(16, triton.next_power_of_2(r)))
    return P, c


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def dora_epilogue_(out, a, B, g, bias, scaling: float) -> None:
    T, N = out.shape
    if T == 0 or N == 0:
        return
    if out.stride(1) != 1:
        raise ValueError(f"dora_epilogue_ needs an output with unit column stride, got strides {out.stride()}")
    has_lora = a is not None
    r = a.shape[1] if has_lora else 0
    if has_lora:  # the dot's operands: the output's dtype, as the reference's addmm
        a, B = _unit_stride(a.to(out.dtype)), _unit_stride(B.to(out.dtype))
    dot_fp32 = _INTERPRETING or out.dtype == torch.float32
    grid = (triton.cdiv(T, _EPI_BLOCK_M), triton.cdiv(N, _EPI_BLOCK_N))
    _epilogue_kernel[grid](out, a if has_lora else out, B if has_lora else out,
                           g if g is not None else out, bias if bias is not None else out,
                           T, N, r, out.stride(0), a.stride(0) if has_lora else 0,
                           B.stride(0) if has_lora else 0, float(scaling),
                           HAS_LORA=has_lora, HAS_G=g is not None, HAS_BIAS=bias is not None,
                           DOT_FP32=dot_fp32, BLOCK_M=_EPI_BLOCK_M, BLOCK_N=_EPI_BLOCK_N,
                           BLOCK_R=max(16, triton.next_power_of_2(r)))


def dora_epilogue_backward(dy, y, g, bias) -> tuple[torch.Tensor, torch.Tensor]:
    T, N = dy.shape
    dy, y = _unit_stride(dy), _unit_stride(y)
    dh = torch.empty(T, N, dtype=dy.dtype, device=dy.device)
    if T == 0 or N == 0:
        return dh, torch.zeros(N, dtype=torch.float32, device=dy.device)
    col_blocks = triton.cdiv(N, _BWD_BLOCK_N)
    # Enough token splits to fill the GPU (~4 programs per SM), each at least one BLOCK_M of tokens.
    sms = torch.cuda.get_device_properties(dy.device).multi_processor_count if dy.is_cuda else 4
    splits = max(1, min(triton.cdiv(T, _BWD_BLOCK_M), triton.cdiv(4 * sms, col_blocks)))
    per_split = triton.cdiv(triton.cdiv(T, splits), _BWD_BLOCK_M) * _BWD_BLOCK_M
    splits = triton.cdiv(T, per_split)
    part = torch.empty(splits, N, dtype=torch.float32, device=dy.device)
    _epilogue_backward_kernel[(col_blocks, splits)](dy, y, g, bias if bias is not None else g, dh, part,
                                                    T, N, dy.stride(0), y.stride(0), per_split,
                                                    HAS_BIAS=bias is not None, BLOCK_M=_BWD_BLOCK_M,
                                                    BLOCK_N=_BWD_BLOCK_N)
    return dh, part.sum(0)
