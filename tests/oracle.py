"""The independent reference: plain fp64 DoRA that materializes `W0 + s·B·A`, with autograd."""

from __future__ import annotations

import torch


def dora_reference(x, W0, A, B, m, s, *, bias=None, exact=False, eps=1e-6, x_lora=None):
    """fp64 `y = (m / ||W0 + s·B·A||) ⊙ (x·W0ᵀ + s·(x_d·Aᵀ)·Bᵀ) + bias`, with the full weight built.

    `m=None` gives LoRA; `A=B=None` a magnitude-only layer. With `exact=False` the norm is detached.
    Inputs are used as given (pass fp64 leaves to get fp64 gradients).
    """
    V = W0 if A is None else W0 + s * (B @ A)
    if x_lora is None or x_lora is x:
        if m is None:
            out = x @ V.t()
        else:
            n = V.norm(dim=1)
            if not exact:
                n = n.detach()
            out = x @ (V * (m / n.clamp_min(eps))[:, None]).t()
    else:
        h = x @ W0.t() + s * (x_lora @ A.t()) @ B.t()
        if m is None:
            out = h
        else:
            n = V.norm(dim=1)
            if not exact:
                n = n.detach()
            out = h * (m / n.clamp_min(eps))
    return out if bias is None else out + bias


def nf4_reference_dequantize(packed, state):
    """Whole-weight NF4 dequantization with the plain-torch reference (absmax via bitsandbytes)."""
    import bitsandbytes.functional as bnbF

    from qdora.kernels import dequantize_nf4_reference

    absmax = state.absmax.float()
    if state.nested:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    numel = torch.Size(state.shape).numel()
    return dequantize_nf4_reference(packed, absmax, state.blocksize, numel).view(state.shape)


def nf4_roundtrip(weight, blocksize=64, double_quant=True):
    """`weight` quantized to NF4 by bitsandbytes and dequantized by the plain-torch reference (fp32)."""
    import bitsandbytes.functional as bnbF

    packed, state = bnbF.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type="nf4")
    return nf4_reference_dequantize(packed, state)
