"""The adapter-input dropout (`qdora.core.dropout`): drop rate, scaling, gradient, reproducibility
under gradient checkpointing, and error paths. Oracles: the binomial distribution (rates are
asserted within 5 standard deviations: a false failure has probability < 1e-6 per check) and
plain elementwise formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qdora.core.dropout import Dropout, drop_mask


def effective_p(p: float) -> float:
    return round(p * 65536) / 65536


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9, 1e-3])
def test_drop_rate_matches_p_in_every_16_bit_lane(p):
    torch.manual_seed(0)
    n = 1 << 21
    drop = drop_mask(torch.Size([n]), p, torch.device("cpu"))
    pe = effective_p(p)
    assert abs(pe - p) <= 2 ** -17
    # Four mask elements come from each 64-bit draw: every lane must be dropped at rate p'.
    lanes = drop.view(-1, 4).double().mean(0)
    sigma = math.sqrt(pe * (1 - pe) / (n // 4))
    assert torch.all((lanes - pe).abs() < 5 * sigma), (lanes, pe)
    # Neighbouring elements are independent: P(both dropped) = p'².
    both = (drop[0::2] & drop[1::2]).double().mean().item()
    assert abs(both - pe * pe) < 5 * math.sqrt(pe * pe * (1 - pe * pe) / (n // 2))


@pytest.mark.parametrize("shape", [(7, 3), (1, 1), (5, 13, 11), (431, 576)])
def test_output_and_gradient_are_masked_scaled_copies(shape):
    p = 0.3
    layer = Dropout(p).train()
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64).add_(3.0).requires_grad_()  # no zeros in x
    y = layer(x)
    scale = 1 / (1 - effective_p(p))
    kept = y != 0
    assert torch.equal(y[kept], x.detach()[kept] * scale)
    dy = torch.randn(shape, dtype=torch.float64)
    y.backward(dy)
    assert torch.equal(x.grad, torch.where(kept, dy * scale, torch.zeros_like(dy)))
    if y.numel() > 100:
        assert 0 < (~kept).double().mean() < 0.6


def test_same_seed_same_mask_and_next_draw_differs():
    layer = Dropout(0.5).train()
    x = torch.ones(64, 33)
    torch.manual_seed(5)
    first, second = layer(x), layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), first)
    assert not torch.equal(first, second)


def test_gradient_checkpointing_redraws_the_same_mask():
    # Non-reentrant checkpointing restores the CPU RNG state before recomputing the forward:
    # the recomputed mask must equal the first one, so gradients match an unchecked run.
    layer = Dropout(0.4).train()
    w = torch.randn(40, 40, dtype=torch.float64)

    def block(x):
        return torch.tanh(layer(x) @ w)

    x = torch.randn(16, 40, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(9)
    block(x).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(9)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert torch.equal(x.grad, plain)


def test_eval_mode_and_zero_p_are_the_identity():
    x = torch.randn(8, 9)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


def test_bf16_input_keeps_its_dtype():
    y = Dropout(0.2).train()(torch.randn(32, 48, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("p", [1.0, -0.1, 2.0])
def test_p_out_of_range_is_rejected(p):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        Dropout(p)
