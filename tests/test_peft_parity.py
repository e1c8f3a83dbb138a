"""Parity with PEFT's DoRA/LoRA over the same bitsandbytes NF4 layer, same A, B and m.

Tolerance: both sides compute in fp32 on the same dequantized weight, but in different orders
(PEFT materializes W0 + s·B·A for the norm and runs the base matmul through bitsandbytes), so
they agree to fp32 rounding: FP32_TOL relative to the largest entry (see conftest)."""

import pytest
import torch
from conftest import FP32_TOL, assert_close
from torch import nn

from qdora import QDoRALinear, linear4bit_from_linear

peft = pytest.importorskip("peft")


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("use_dora", [True, False], ids=["qdora", "qlora"])
@pytest.mark.parametrize("in_f, out_f, r", [(256, 192, 8), (512, 130, 16), (1024, 64, 1)])
def test_outputs_and_gradients_equal_peft(use_dora, in_f, out_f, r):
    base = linear4bit_from_linear(nn.Linear(in_f, out_f, bias=False))
    ours = QDoRALinear(base, r=r, alpha=2 * r, dropout=0.0, use_dora=use_dora, adapter_dtype=torch.float32)
    model = peft.get_peft_model(Holder(base), peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                               target_modules=["proj"], use_dora=use_dora))
    theirs = model.base_model.model.proj
    if use_dora:
        # Both initialise m from the dequantized NF4 weight's row norms (the same fp32 values, B = 0),
        # each a sum of `in` squares (γ_in) and a sqrt (u) in its own order: each within γ_in/2 + u
        # of the exact norm, so within γ_in + 2u of each other, entry by entry (1.01: second order).
        m_ours = ours.magnitude.detach().double()
        m_peft = theirs.lora_magnitude_vector["default"].weight.detach().double()
        u = 2.0 ** -24
        bound = (in_f * u / (1 - in_f * u) + 2 * u) * m_peft.abs() * 1.01
        assert ((m_ours - m_peft).abs() <= bound).all(), "initial magnitude"
    with torch.no_grad():  # make the adapter matter, then give PEFT the same tensors
        ours.lora_B.normal_(0, 0.05)
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        if use_dora:
            ours.magnitude_delta.normal_(0, 0.1)
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    x1 = torch.randn(3, 6, in_f, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ours(x1), model(x2)
    assert not torch.allclose(y1, base(x1.detach()), atol=1e-3)  # the adapter is not a no-op
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    assert_close(y1, y2, FP32_TOL, "output")
    assert_close(x1.grad, x2.grad, FP32_TOL, "dx")
    assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, FP32_TOL, "dA")
    assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, FP32_TOL, "dB")
    if use_dora:
        assert_close(ours.magnitude_delta.grad, theirs.lora_magnitude_vector["default"].weight.grad,
                     FP32_TOL, "dm")
