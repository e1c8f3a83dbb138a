"""QDoRALinear against the fp64 oracle that materializes W0 + s·B·A (tests/oracle.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BF16_TOL, FP32_TOL, assert_close
from oracle import dora_reference
from torch import nn

from qdora import QDoRALinear, linear4bit_from_linear
from qdora.core.dropout import Dropout
from qdora.core.nf4 import RowBlocks

U32 = 2.0 ** -24  # fp32 unit roundoff


def gamma(k: int) -> float:
    """γ_k = k·u/(1 − k·u): the relative error bound of a k-term fp32 dot product (Higham §3.1)."""
    return k * U32 / (1 - k * U32)


def make_layer(in_f, out_f, r=8, quantized=True, bias=False, zero_rows=(), perturb=True, **kw):
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3.0)
        lin.weight[list(zero_rows)] = 0
    base = linear4bit_from_linear(lin) if quantized else lin
    kw.setdefault("adapter_dtype", torch.float32)
    layer = QDoRALinear(base, r=r, alpha=2 * max(r, 1), **kw)
    if perturb:  # make the adapter matter: B ≠ 0 and m ≠ ||W0||
        with torch.no_grad():
            if layer.lora_B is not None:
                layer.lora_B.normal_(0, 0.2)
            if layer.magnitude_delta is not None:
                layer.magnitude_delta.normal_(0, 0.3)
    return layer


def oracle_step(layer, x, dy, exact, lora_mask=None):
    """Forward and gradients from the fp64 oracle, on the layer's dequantized base."""
    W0 = layer.dequantized_base().double()
    leaf = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    xr, A, B = leaf(x), leaf(layer.lora_A), leaf(layer.lora_B)
    m = leaf(layer.magnitude) if layer.use_dora else None
    bias = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().double()
    xl = None if lora_mask is None else xr * lora_mask.double()  # dropout(x) = x ⊙ mask/(1-p)
    y = dora_reference(xr, W0, A, B, m, layer.scaling, bias=bias, exact=exact, eps=layer.eps, x_lora=xl)
    if dy is None:
        return y.detach(), {}
    y.backward(dy.double())
    grads = {"x": xr.grad, "A": None if A is None else A.grad, "B": None if B is None else B.grad,
             "m": None if m is None else m.grad}
    return y.detach(), grads


def layer_step(layer, x, dy):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    grads = {"x": x.grad, "A": None if layer.lora_A is None else layer.lora_A.grad,
             "B": None if layer.lora_B is None else layer.lora_B.grad,
             "m": None if layer.magnitude_delta is None else layer.magnitude_delta.grad}
    return y.detach(), grads


def check_against_oracle(layer, x, tol=FP32_TOL, lora_mask=None):
    # dy from its own generator: the global RNG stays free for the layer's dropout mask
    dy = torch.randn(*x.shape[:-1], layer.out_features, generator=torch.Generator().manual_seed(7))
    y, grads = layer_step(layer, x, dy)
    y_ref, ref = oracle_step(layer, x, dy, layer.norm == "exact", lora_mask)
    assert_close(y, y_ref, tol, "output")
    for name, g in grads.items():
        if ref[name] is None:
            assert g is None, name
        else:
            assert_close(g, ref[name], tol, f"d{name}")


SHAPES = [(64, 48), (1151, 70), (256, 130)]  # (in, out): 1151 rows are not whole NF4 blocks


@pytest.mark.parametrize("in_f, out_f", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("norm", ["detached", "exact"])
@pytest.mark.parametrize("quantized", [True, False], ids=["nf4", "dense"])
def test_forward_and_gradients_match_oracle(in_f, out_f, r, norm, quantized):
    r = min(r, in_f, out_f)
    layer = make_layer(in_f, out_f, r=r, quantized=quantized, norm=norm, block_rows=32)
    check_against_oracle(layer, torch.randn(3, 5, in_f))


@pytest.mark.parametrize("norm", ["detached", "exact"])
def test_bias_rsLoRA_and_gradient_paths(norm):
    layer = make_layer(256, 96, r=16, bias=True, norm=norm, use_rslora=True)
    assert layer.scaling == pytest.approx(32 / math.sqrt(16))
    check_against_oracle(layer, torch.randn(2, 7, 256))


@pytest.mark.parametrize("block_rows", [1, 7, 64, 10**6])
def test_results_do_not_depend_on_block_rows(block_rows):
    # Blocking changes only the summation order (block_rows=1 accumulates dx by 130 sequential
    # rank-1 addmm_ calls, each an fp32 rounding of the running sum), so every block size is held
    # to the fp64 oracle with FP32_TOL, whose derivation (conftest: in <= 1151 terms, T <= 64
    # tokens) covers this shape: in = 1151, out = 130 (dx's reduction), T = 9. Two block sizes
    # therefore agree within 2·FP32_TOL; a blocking bug (a row dropped or repeated, a block's norm
    # from another block) moves whole rows by O(1).
    torch.manual_seed(1)
    layer = make_layer(1151, 130, r=8, block_rows=block_rows, norm="exact")
    check_against_oracle(layer, torch.randn(9, 1151))


def test_lora_path_matches_oracle():
    layer = make_layer(256, 96, r=8, use_dora=False, bias=True)
    assert layer.magnitude is None
    check_against_oracle(layer, torch.randn(4, 256))


def test_magnitude_only_matches_oracle():
    layer = make_layer(256, 96, r=0)
    assert layer.lora_A is None and layer.lora_B is None
    check_against_oracle(layer, torch.randn(4, 256))


def test_step_zero_equals_quantized_base():
    lin = nn.Linear(512, 256, bias=True)
    base = linear4bit_from_linear(lin)
    layer = QDoRALinear(base, r=16, alpha=32, adapter_dtype=torch.bfloat16, block_rows=10**6)
    x = torch.randn(6, 512)
    W = RowBlocks(base, 10**6).dequantize()
    with torch.no_grad():
        y = layer(x)
        # Same single fp32 matmul as the base path, and m/n == 1 exactly at init: bitwise equal.
        assert torch.equal(y, torch.mm(x, W.t()) + lin.bias)
        # bitsandbytes' own Linear4bit forward: equal up to its matmul's rounding.
        assert_close(y, base(x), 1e-6, "vs bnb.nn.Linear4bit")
    assert torch.equal(layer.magnitude / layer.row_norm(), torch.ones(256))


@pytest.mark.parametrize("norm", ["detached", "exact"])
@pytest.mark.parametrize("quantized", [True, False], ids=["nf4", "dense"])
def test_zero_rows_stay_finite_and_unchanged(norm, quantized):
    zero = (0, 3, 17)
    layer = make_layer(128, 40, r=4, quantized=quantized, norm=norm, zero_rows=zero, perturb=False, bias=True)
    x = torch.randn(5, 128)
    y, grads = layer_step(layer, x, torch.randn(5, 40))
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    # At init a zero row outputs exactly its bias (m = n = 0 there, g = 0/eps = 0).
    assert torch.equal(y[:, list(zero)], layer.base_layer.bias[list(zero)].expand(5, -1).detach())
    # Once the adapter moves B, everything stays finite and matches the oracle elsewhere.
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    check_against_oracle(layer, x)


def test_rows_with_zero_magnitude_recover_their_gradient():
    # m = 0 on rows with a non-zero W0: h cannot be read back from y = g·h, the layer recomputes it.
    layer = make_layer(200, 64, r=4)
    with torch.no_grad():
        layer.set_magnitude(torch.where(torch.arange(64) % 5 == 0, 0.0, layer.magnitude))
    check_against_oracle(layer, torch.randn(6, 200))


def test_dropout_applies_to_the_adapter_path_only():
    layer = make_layer(128, 48, r=8, dropout=0.5)
    layer.train()
    x = torch.randn(4, 128)
    torch.manual_seed(123)
    mask = Dropout(0.5).train()(torch.ones_like(x))  # entries 0 or 1/(1-p)
    assert 0 < (mask == 0).float().mean() < 1
    torch.manual_seed(123)  # the layer's dropout draws the same mask
    check_against_oracle(layer, x, lora_mask=mask)
    layer.eval()  # no dropout in eval
    y_ref, _ = oracle_step(layer, x, None, exact=False)
    with torch.no_grad():
        assert_close(layer(x), y_ref, FP32_TOL, "eval output")


def test_bf16_inputs_and_compute():
    layer = make_layer(256, 96, r=8, adapter_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    y, grads = layer_step(layer, x, torch.randn(4, 96, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and grads["x"].dtype == torch.bfloat16
    assert grads["A"].dtype == torch.bfloat16 and grads["m"].dtype == torch.bfloat16
    check_against_oracle(layer, x.float(), tol=BF16_TOL)


def test_bf16_inputs_with_fp32_compute():
    layer = make_layer(256, 96, r=8, adapter_dtype=torch.bfloat16)  # compute "auto" = fp32 on CPU
    x = torch.randn(4, 256).bfloat16()
    y, grads = layer_step(layer, x, torch.randn(4, 96).bfloat16())
    assert y.dtype == torch.bfloat16 and grads["x"].dtype == torch.bfloat16
    y_ref, _ = oracle_step(layer, x.float(), None, exact=False)
    assert_close(y.float(), y_ref, BF16_TOL, "output")


def test_input_without_grad_and_frozen_base():
    layer = make_layer(128, 32, r=4)
    x = torch.randn(3, 128)  # no requires_grad: no dx pass
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.magnitude_delta.grad is not None
    assert all(not p.requires_grad for p in layer.base_layer.parameters())


def test_bf16_magnitude_keeps_small_updates():
    """The trap: m ≈ ||W0 row|| is O(1); an update of 1e-4 rounds away in a bf16 m."""
    assert (torch.tensor(2.0, dtype=torch.bfloat16) + 1e-4).item() == 2.0  # the trap itself
    layer = make_layer(128, 32, r=4, adapter_dtype=torch.bfloat16, perturb=False)
    m0 = layer.magnitude.detach().clone()
    assert (m0 > 1).all()
    opt = torch.optim.SGD([layer.magnitude_delta], lr=1.0)
    layer.magnitude_delta.grad = torch.full((32,), -1e-4, dtype=torch.bfloat16)
    opt.step()
    moved = layer.magnitude.detach() - m0
    assert torch.allclose(moved, torch.full((32,), 1e-4), rtol=1e-2)


def test_eval_norm_cache_is_invalidated_when_the_adapter_changes():
    layer = make_layer(256, 64, r=8)
    x = torch.randn(5, 256)
    layer.eval()
    with torch.no_grad():
        y1 = layer(x)
        assert layer._norm_cache is not None
        assert torch.equal(layer(x), y1)
        layer.lora_B.mul_(2.0)  # in-place update, as an optimizer does
        y2 = layer(x)
        layer.train()
        y_fresh = layer(x)
    assert not torch.allclose(y1, y2)
    assert torch.equal(y2, y_fresh)
    assert layer._norm_cache is None  # training mode never caches


def test_factored_norm_matches_materialized():
    in_f, r = 1151, 16
    layer = make_layer(in_f, 70, r=r)
    W0, A, B, s = layer.dequantized_base().double(), layer.lora_A.double(), layer.lora_B.double(), layer.scaling
    n = (W0 + s * B @ A).norm(dim=1)
    # fp32 n² = c + 2s·Σ_j B⊙P + s²·Σ_j (B·G)⊙B, c = rowsum(W0²), P = W0·Aᵀ, G = A·Aᵀ: c, P and G
    # are dots of `in` terms, then up to two nested sums of r terms, and 4 roundings (2 scalings,
    # 2 adds) join the terms. Each term is within γ_(in+2r) of its absolute-value counterpart
    # (Higham §3.1), and those counterparts sum to M = rowsum((|W0| + s·|B|·|A|)²) ≥ n², so
    # |n̂² − n²| ≤ γ_(in+2r+4)·M. sqrt halves the relative error and rounds once (u); M/n² is the
    # cancellation factor (up to 6 here: the bound is 1–2e-4 of n). The 1.01 covers second-order
    # terms. Bugs land outside it: c, B or the result in bf16 3–20x, G from bf16 A 8000x, a missing
    # term O(1)/bound; P from a bf16 copy of A only (0.3x) is caught by test_kernels' norm-terms
    # bound at in = 192.
    M = (W0.abs() + s * B.abs() @ A.abs()).pow(2).sum(1)
    bound = (gamma(in_f + 2 * r + 4) * M / (2 * n.pow(2)) + U32) * n * 1.01
    err = (layer.row_norm().double() - n).abs()
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("norm", ["detached", "exact"])
@pytest.mark.parametrize("use_dora", [True, False], ids=["qdora", "qlora"])
def test_a_few_steps_fit_a_toy_regression(norm, use_dora):
    # The target is the same layer with a moved adapter (reachable); the student starts at B=0, m=||W0||.
    layer = make_layer(64, 32, r=4, perturb=False, norm=norm, use_dora=use_dora)
    x = torch.randn(256, 64)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.2)
        layer.lora_B.normal_(0, 0.2)
        if use_dora:
            layer.magnitude_delta.normal_(0, 0.3)
        target = layer(x)
        for p, p0 in zip(trainable, start):
            p.copy_(p0)
    opt = torch.optim.Adam(trainable, lr=2e-2)
    losses = []
    for _ in range(100):
        loss = F.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"r=64 is out of range for a 32x48 layer: use 1 <= r <= 32"):
        QDoRALinear(nn.Linear(48, 32), r=64, alpha=16)
    with pytest.raises(TypeError, match="base_layer must be nn.Linear or bnb.nn.Linear4bit, got Conv1d"):
        QDoRALinear(nn.Conv1d(4, 4, 1), r=2, alpha=4)
    with pytest.raises(ValueError, match="norm='fast' is unknown"):
        QDoRALinear(nn.Linear(8, 8), r=2, alpha=4, norm="fast")
    layer = QDoRALinear(nn.Linear(48, 32), r=4, alpha=8)
    with pytest.raises(ValueError, match="input has 47 features, layer expects 48"):
        layer(torch.randn(2, 47))


def test_autocast_does_not_change_the_layer():
    # A Trainer with bf16=True runs the model under autocast; the layer keeps its own compute dtype
    # (fp32 on CPU here), so its output and gradients are those without autocast.
    layer = make_layer(96, 64, quantized=True, bias=True)
    x = torch.randn(5, 96)
    y = layer(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.magnitude_delta)]
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto = layer(x)
    y_auto.float().square().sum().backward()
    assert y_auto.dtype == torch.float32 and torch.equal(y_auto, y)
    for p, g in zip((layer.lora_A, layer.lora_B, layer.magnitude_delta), grads):
        assert p.grad.dtype == p.dtype and torch.equal(p.grad, g)
