"""Dropout on the adapter path's input, with a cheaper random mask on CPU.

`torch.nn.Dropout` on CPU draws one Bernoulli sample per element (one 32-bit Mersenne-Twister
number each, then a float division and a bool conversion): on SmolLM2 with r=16 that was ~10% of a
QDoRA training step, since every adapted layer masks its whole `tokens × in` input twice per step
(forward, and the recompute under gradient checkpointing).

Here the mask comes from 16 random bits per element, four per 64-bit draw (`random_` on an int64
buffer viewed as int16): element `i` is dropped when its 16-bit value `v_i` (uniform on
[-2¹⁵, 2¹⁵)) is below `k − 2¹⁵`, with `k = round(p·2¹⁶)`, i.e. with probability exactly
`p' = k / 2¹⁶` (`|p' − p| ≤ 2⁻¹⁷`), and kept elements are scaled by `1 / (1 − p')`, so
`E[dropout(x)] = x` exactly as with `nn.Dropout`. Output and gradient are
`x·scale` and `dy·scale` with the dropped elements set to 0 (one bool mask saved, as `nn.Dropout`
saves). The mask is a function of the torch CPU generator's state, so gradient checkpointing
(which restores that state before recomputing) draws the same mask again.

On CUDA, and in eval mode, this is `torch.nn.functional.dropout` (already one fused kernel there).
"""

from __future__ import annotations

import torch
from torch import nn

_RES = 1 << 16


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor of `shape`, True with probability `round(p·2¹⁶)/2¹⁶` per element, independently."""
    n = 1
    for d in shape:
        n *= d
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-(1 << 63), (1 << 63) - 1)
    bits = words.view(torch.int16)[:n].view(shape)
    return bits < (round(p * _RES) - (_RES >> 1))


class _MaskedScale(torch.autograd.Function):
    """`y = x·scale` with `drop` elements zeroed; the same for the gradient."""

    @staticmethod
    def forward(ctx, x, drop, scale):
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.mul(scale).masked_fill_(drop, 0)

    @staticmethod
    def backward(ctx, dy):
        (drop,) = ctx.saved_tensors
        return dy.mul(ctx.scale).masked_fill_(drop, 0), None, None


class Dropout(nn.Dropout):
    """Drop-in for `nn.Dropout(p)` on the adapter input (see the module docstring); a subclass, so
    code that reads `p` from an `nn.Dropout` keeps working."""

    def __init__(self, p: float):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p={p!r} must be in [0, 1)")
        super().__init__(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, True)
        keep = 1.0 - round(self.p * _RES) / _RES
        return _MaskedScale.apply(x, drop_mask(x.shape, self.p, x.device), 1.0 / keep)
