"""`qdora bench step` pieces: the lower-bound layer against the plain LoRA formula in fp64, the
profile grouping on a real layer step, and the option errors. (Timings are never asserted.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdora.core.layer import QDoRALinear
from qdora.core.nf4 import linear4bit_from_linear
from qdora.eval.bench.step import DenseLoRA, breakdown, main


def test_bound_layer_is_the_lora_formula_with_a_frozen_base():
    torch.manual_seed(0)
    base = nn.Linear(37, 19, bias=True).double().requires_grad_(False)
    layer = DenseLoRA(base, r=4, alpha=8).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 37, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ref = xr @ base.weight.T + base.bias + 2.0 * (xr @ A.T) @ B.T
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)  # fp64: rounding only
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy)
    for got, want in ((x.grad, xr.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert base.weight.grad is None


def test_profile_groups_a_qdora_layer_step():
    torch.manual_seed(0)
    layer = QDoRALinear(linear4bit_from_linear(nn.Linear(128, 96, bias=False)), r=8, alpha=16, dropout=0.1,
                        adapter_dtype=torch.float32).train()
    x = torch.randn(4, 16, 128, requires_grad=True)

    def step():
        layer(x).square().mean().backward()

    step()
    groups, wall = breakdown(step)
    for name in ("matmuls", "NF4 dequantize", "dropout", "norm terms & DoRA epilogue"):
        assert groups.get(name, 0.0) > 0.0, (name, dict(groups))
    assert all(v >= 0 for v in groups.values())
    assert sum(groups.values()) == pytest.approx(wall, rel=1e-6)


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        main(["--variants", "ours qdora,nope"])


def test_negative_threads_is_rejected():
    with pytest.raises(ValueError, match=r"--threads=-1"):
        main(["--threads", "-1"])
