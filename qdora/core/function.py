r"""The adapter math: one autograd function for DoRA, QDoRA, LoRA and QLoRA layers.

Notation (one layer, tokens flattened to `T` rows):

    x  (T, in)     input;  x_d = dropout(x) feeds the adapter path only
    W0 (out, in)   frozen base, NF4 or plain; read block of rows by block of rows
    A  (r, in), B (out, r)  direction update, scale s;  m (out,) magnitude
    a  = x_d·Aᵀ                        (T, r)
    h  = x·W0ᵀ + s·a·Bᵀ                (T, out)
    n² = c + 2s·rowsum(B ⊙ P) + s²·rowsum((B·G) ⊙ B),   c = rowsum(W0²), P = W0·Aᵀ, G = A·Aᵀ
    g  = m / max(n, eps)
    y  = g ⊙ h + bias                  (LoRA: g ≡ 1, no norm)

`n` is the row norm of `W0 + s·B·A` without ever forming it: `P` rides along the forward pass
over W0 as r extra rows (`W·Aᵀ` per block), `c` is computed once (W0 is frozen), the rest is
O(out·r²). Norm terms are fp32 whatever the compute dtype. After the base matmul, the rest of
`y` is one fused op over the `T × out` tensor (`qdora::dora_epilogue_`: Triton on CUDA).

Backward, with `dy = ∂L/∂y` and `dh = dy ⊙ g` (formed one column block at a time, together with
that block's `dm`, by one fused op, `qdora::dora_epilogue_backward`):

    dm  = Σ_t dy ⊙ h / n   = Σ_t dy ⊙ (y − bias) / m    (h is recovered from the saved output;
                                                         rows with m = 0 recompute h)
    dB  = s·dhᵀ·a
    dA  = s·(dh·B)ᵀ·x_d
    dx  = dy·(g ⊙ W0) + s·(dh·B)·A    (a W0 pass, block by block, g folded into each freshly
                                       dequantized block; the adapter term goes to x_d)

`norm="exact"` adds the path through n. With `u = ∂L/∂(n²) = −g·dm / (2n)` (0 where n ≤ eps):

    dB += u ⊙ (2s·P + 2s²·B·G)
    dA += 2s·(u ⊙ B)ᵀ·W0 + 2s²·(Bᵀ·diag(u)·B)·A

The `(u ⊙ B)ᵀ·W0` product is r extra rows in the backward pass over W0, so exact mode costs no
extra dequantization either. Saved for backward: the output (which the caller holds anyway), `a`,
`x_d`, vectors of size out, and in exact mode `P` (out × r) — never an out × in or T × out extra.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from qdora.core.nf4 import RowBlocks
from qdora.kernels.ops import dora_epilogue_, dora_epilogue_backward

# Rows with |g| below this are treated as m = 0: `h` cannot be recovered from `y = g·h` there.
_TINY_G = 1e-30


@dataclass
class LayerSpec:
    """Everything the function needs that is not a trainable tensor."""

    blocks: RowBlocks
    c: torch.Tensor | None            # (out,) fp32 rowsum(W0²); None for LoRA
    bias: torch.Tensor | None
    scaling: float
    exact: bool
    eps: float
    compute_dtype: torch.dtype
    cached_norm: torch.Tensor | None = None   # (out,) fp32 row norm to reuse (eval mode)
    norm_out: torch.Tensor | None = None      # written by forward: the row norm it used


def factored_norm_sq(c: torch.Tensor, P: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     s: float) -> torch.Tensor:
    """`rowsum((W0 + s·B·A)²)` from `c = rowsum(W0²)`, `P = W0·Aᵀ`, `A`, `B` (all fp32)."""
    G = A @ A.t()
    return c + 2.0 * s * (B * P).sum(1) + (s * s) * ((B @ G) * B).sum(1)


def _rows_of(blocks: RowBlocks, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `index` of W0 (few rows: dequantizes only the aligned row groups holding them)."""
    align = blocks.row_align
    out = []
    for i in index.tolist():
        start = (i // align) * align
        out.append(blocks.rows(start, min(start + align, blocks.out_features), dtype)[i - start])
    return torch.stack(out)


def _without_autocast(fn):
    """Run `fn` with autocast off: the function computes in `LayerSpec.compute_dtype` and keeps norm
    terms in fp32 itself; autocast (a Trainer's `bf16=True`) would recast its matmuls behind it and
    mix dtypes between the forward's saved tensors and the backward's."""
    @functools.wraps(fn)
    def wrapper(ctx, *args):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            return fn(ctx, *args)
    return wrapper


class DoRAFunction(torch.autograd.Function):
    """`y = g ⊙ (x·W0ᵀ + s·(x_d·Aᵀ)·Bᵀ) + bias`; see the module docstring for the derivation.

    Arguments: `x`, `x_lora` (dropout(x), or `x` itself), `A`, `B` (None for magnitude-only),
    `m` (None for LoRA), `spec`. `m` is the full magnitude (a differentiable tensor).
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, x, x_lora, A, B, m, spec: LayerSpec):
        cd = spec.compute_dtype
        blocks = spec.blocks
        out_f, in_f = blocks.out_features, blocks.in_features
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_f).to(cd)
        same_x = x_lora is x
        has_lora = A is not None
        use_dora = m is not None
        s = spec.scaling

        A32 = A.float() if has_lora else None
        B32 = B.float() if has_lora else None
        Ac = A.to(cd) if has_lora else None
        need_P = use_dora and has_lora and spec.cached_norm is None

        z = torch.empty(x2.shape[0], out_f, dtype=cd, device=x.device)
        P = torch.empty(out_f, A.shape[0], dtype=torch.float32, device=x.device) if need_P else None
        for r0, r1, W in blocks.blocks(cd):
            torch.mm(x2, W.t(), out=z[:, r0:r1])
            if need_P:
                P[r0:r1] = W @ Ac.t()
        a = None
        if has_lora:
            xl2 = x2 if same_x else x_lora.reshape(-1, in_f).to(cd)
            a = xl2 @ Ac.t()
            del xl2
        g = n = m32 = None
        if use_dora:
            if spec.cached_norm is not None:
                n = spec.cached_norm
            elif has_lora:
                n = factored_norm_sq(spec.c, P, A32, B32, s).clamp_min_(0).sqrt_()
            else:
                n = spec.c.clamp_min(0).sqrt()
            spec.norm_out = n
            m32 = m.float()
            g = m32 / n.clamp_min(spec.eps)
        # z ← g ⊙ (z + s·a·Bᵀ) + bias, one fused pass over the tokens × out tensor.
        dora_epilogue_(z, a, B.to(cd) if has_lora else None, g, spec.bias, float(s))
        y = z.view(*lead, out_f)
        y_out = y if y.dtype == x.dtype else y.to(x.dtype)

        # Save what backward needs; `y` is h scaled by g (plus bias), from which dm is recovered.
        ctx.spec, ctx.lead, ctx.same_x = spec, lead, same_x
        ctx.has_lora, ctx.use_dora = has_lora, use_dora
        ctx.x_dtype, ctx.xl_dtype = x.dtype, x_lora.dtype
        saved_y = None
        small_g = None
        if use_dora:
            saved_y = y_out if y_out is y else y
            small_g = (g.abs() < _TINY_G).nonzero().flatten()
        keep_x = use_dora and small_g.numel() > 0
        ctx.save_for_backward(
            x if keep_x else None,
            (x_lora if has_lora else None) if not same_x else (x if has_lora else None),
            A, B, a, g, n, m32, P if spec.exact else None, saved_y, small_g)
        return y_out

    @staticmethod
    @_without_autocast
    def backward(ctx, dy):
        x, xl, A, B, a, g, n, m32, P, saved_y, small_g = ctx.saved_tensors
        spec: LayerSpec = ctx.spec
        cd, s, blocks = spec.compute_dtype, spec.scaling, spec.blocks
        out_f, in_f = blocks.out_features, blocks.in_features
        need_x, need_xl, need_A, need_B, need_m, _ = ctx.needs_input_grad
        if ctx.same_x:
            need_x = need_x or need_xl
        dy2 = dy.reshape(-1, out_f).to(cd)
        T = dy2.shape[0]
        exact = spec.exact and ctx.use_dora and ctx.has_lora

        # ---- rows with m ≈ 0: h is lost in y = g·h; recompute those few columns of h for dm ----
        need_dm = ctx.use_dora and (need_m or (exact and (need_A or need_B)))
        dm_small = None
        if need_dm and small_g.numel():
            x2 = x.reshape(-1, in_f).to(cd)
            h = x2 @ _rows_of(blocks, small_g, cd).t()
            if ctx.has_lora:
                h += s * (a @ B[small_g].to(cd).t())
            dm_small = (dy2[:, small_g].float() * h.float()).sum(0) / n[small_g].clamp_min(spec.eps)
            del x2, h

        # ---- pass 1, over column blocks of dy (no W0): dh = dy ⊙ g and dm = Σ_t dy ⊙ (y − bias) / m
        # (one fused op), then dh·B and dB = s·dhᵀ·a. Each dh block dies before pass 2 allocates dx.
        dm = u = None
        if need_dm:
            dm = torch.empty(out_f, dtype=torch.float32, device=dy.device)
            m_div = torch.where(m32 == 0, torch.ones_like(m32), m32)
        if exact and (need_A or need_B):
            u = torch.zeros(out_f, dtype=torch.float32, device=dy.device)
        y2 = saved_y.reshape(-1, out_f) if ctx.use_dora else None
        Bc = B.to(cd) if ctx.has_lora else None
        dhB = torch.zeros(T, B.shape[1], dtype=cd, device=dy.device) if ctx.has_lora else None
        dB = torch.empty(out_f, B.shape[1], dtype=cd, device=dy.device) if ctx.has_lora and need_B else None
        step = blocks.step()
        for r0 in range(0, out_f, step):
            r1 = min(out_f, r0 + step)
            if ctx.use_dora:
                bias = spec.bias[r0:r1] if spec.bias is not None else None
                dh, total = dora_epilogue_backward(dy2[:, r0:r1], y2[:, r0:r1], g[r0:r1], bias)
                if need_dm:
                    dm[r0:r1] = total / m_div[r0:r1]
                    if dm_small is not None:
                        inside = (small_g >= r0) & (small_g < r1)
                        dm[small_g[inside]] = dm_small[inside]
                if u is not None:
                    nb = n[r0:r1]
                    u[r0:r1] = torch.where(nb > spec.eps, -g[r0:r1] * dm[r0:r1] / (2 * nb.clamp_min(spec.eps)),
                                           torch.zeros_like(nb))
            else:
                dh = dy2[:, r0:r1]
            if ctx.has_lora:
                dhB.addmm_(dh, Bc[r0:r1])
                if dB is not None:
                    torch.mm(dh.t(), a, out=dB[r0:r1])
            del dh

        # ---- pass 2, over row blocks of W0 (dequantized): dx += dh·W0 = dy·(g ⊙ W0), g folded into a
        # freshly dequantized block in place (no T × block temporary: QDoRA's peak stays QLoRA's),
        # and in exact mode dA_w += 2s·(u ⊙ B)ᵀ·W0 (before the fold).
        need_dA_w = exact and need_A
        dx = torch.zeros(T, in_f, dtype=cd, device=dy.device) if need_x else None
        dA_w = torch.zeros(A.shape[0], in_f, dtype=cd, device=dy.device) if need_dA_w else None
        if need_x or need_dA_w:
            gc = g.to(cd) if ctx.use_dora else None
            owns = blocks.owns_blocks(cd)
            for r0, r1, W in blocks.blocks(cd):
                if dA_w is not None:
                    dA_w.addmm_((2 * s * u[r0:r1, None] * B[r0:r1].float()).to(cd).t(), W)
                if dx is not None:
                    if gc is None:
                        dx.addmm_(dy2[:, r0:r1], W)
                    elif owns:
                        dx.addmm_(dy2[:, r0:r1], W.mul_(gc[r0:r1, None]))
                    else:  # W is the module's own weight: scale the gradient block instead
                        dx.addmm_(dy2[:, r0:r1] * gc[r0:r1], W)
                del W

        # ---- adapter path: s·(dh·B)·A to the input gradient, dA = s·(dh·B)ᵀ·x_d ----
        dA = dxl = None
        if ctx.has_lora:
            sdhB = s * dhB
            if dB is not None:
                dB.mul_(s)
            if need_A:
                dA = sdhB.t() @ xl.reshape(-1, in_f).to(cd)
            if ctx.same_x and dx is not None:
                dx.addmm_(sdhB, A.to(cd))
            elif need_xl and not ctx.same_x:
                dxl = sdhB @ A.to(cd)

        if exact:
            A32, B32 = A.float(), B.float()
            if need_B:
                G = A32 @ A32.t()
                dB = dB.float() + u[:, None] * (2 * s * P + 2 * s * s * (B32 @ G))
            if need_A:
                dA = dA.float() + dA_w.float() + 2 * s * s * ((B32.t() * u) @ B32) @ A32

        dx_out = dx if need_x else None
        dxl_out = dxl if (need_xl and not ctx.same_x) else None
        if dx_out is not None:
            dx_out = dx_out.view(*ctx.lead, in_f).to(ctx.x_dtype)
        if dxl_out is not None:
            dxl_out = dxl_out.view(*ctx.lead, in_f).to(ctx.xl_dtype)
        return (dx_out, dxl_out,
                dA.to(A.dtype) if dA is not None else None,
                dB.to(B.dtype) if dB is not None else None,
                dm if need_m else None,
                None)
