import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from oracle import nf4_reference_dequantize
from torch import nn

from qdora.core.nf4 import RowBlocks, adopt_linear4bit, linear4bit_from_linear, quantize_nf4
from qdora.kernels import NF4_CODE, dequantize_nf4

SHAPES = [(70, 1151), (7, 96), (33, 1000), (130, 256), (5, 1150), (3, 4096)]  # (out, in)


full_reference = nf4_reference_dequantize


def test_code_book_is_bitsandbytes_nf4():
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu").float())


@pytest.mark.parametrize("out_f, in_f", [(130, 256), (3, 4096), (33, 1000)])
def test_reference_matches_bitsandbytes(out_f, in_f):
    W = torch.randn(out_f, in_f)
    packed, state = quantize_nf4(W, double_quant=False)
    assert torch.equal(full_reference(packed, state), bnbF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("out_f, in_f", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_dequantize_equals_reference_for_any_row_length(out_f, in_f, blocksize):
    # Includes rows that are not whole NF4 blocks (in=96, 1151, ...), where bitsandbytes 0.50's
    # CPU kernel, given the 2-D shape, is wrong; dequantize_nf4 must not be.
    W = torch.randn(out_f, in_f)
    packed, state = quantize_nf4(W, blocksize=blocksize, double_quant=False)
    got = dequantize_nf4(packed, state.absmax, blocksize, (out_f, in_f))
    assert torch.equal(got, full_reference(packed, state))


@pytest.mark.parametrize("out_f, in_f", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float32"])
@pytest.mark.parametrize("block_rows", [1, 64, 10**6])
def test_row_blocks_reassemble_the_weight(out_f, in_f, double_quant, storage, block_rows):
    W = torch.randn(out_f, in_f) * 0.02
    itemsize = {"uint8": 1, "bfloat16": 2, "float32": 4}[storage]
    if ((out_f * in_f + 1) // 2) % itemsize:  # packed bytes do not fill whole storage elements
        with pytest.raises(ValueError, match="not a whole number of torch.* elements; use quant_storage='uint8'"):
            linear4bit_from_linear(_linear(W), 64, double_quant, storage)
        return
    layer = linear4bit_from_linear(_linear(W), 64, double_quant, storage)
    blocks = RowBlocks(layer, block_rows)
    expected = full_reference(layer.weight.data, layer.weight.quant_state)
    seen = []
    for r0, r1, block in blocks.blocks(torch.float32):
        assert r0 % blocks.row_align == 0 and block.shape == (r1 - r0, in_f)
        assert r1 - r0 <= max(block_rows, blocks.row_align)
        seen.append(block)
    assert torch.equal(torch.cat(seen), expected)
    # c = rowsum(W0²) of the dequantized weight against fp64: a dot of in_f terms, all positive, so
    # within γ_in = in·u/(1 − in·u) of itself (Higham §3.1; u = 2^-24), in any summation order
    c64, u = expected.double().pow(2).sum(1), 2.0 ** -24
    assert ((blocks.row_sq_norms().double() - c64).abs() <= in_f * u / (1 - in_f * u) * c64).all()


def _linear(W):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def test_quantization_error_is_nf4_sized():
    # A value rounds to its nearest NF4 code, so it is off by at most half the widest gap between
    # neighbouring codes (-1 to -0.696: 0.304) times its block's absmax.
    W = torch.randn(64, 512)
    packed, state = quantize_nf4(W, double_quant=False)
    err = (full_reference(packed, state) - W).abs().view(-1, 64)
    absmax = W.abs().view(-1, 64).amax(1, keepdim=True)
    assert (err <= 0.5 * NF4_CODE.diff().max() * absmax * (1 + 1e-6)).all()


def test_zero_rows_dequantize_to_exact_zeros():
    W = torch.randn(8, 128)
    W[[1, 5]] = 0
    packed, state = quantize_nf4(W)
    deq = RowBlocks(linear4bit_from_linear(_linear(W)), 4).dequantize()
    assert torch.equal(deq[[1, 5]], torch.zeros(2, 128))


def test_adopts_a_bnb_linear4bit_without_requantizing():
    lin = bnb.nn.Linear4bit(256, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    lin = lin.to("cpu")  # bitsandbytes quantizes here
    ptr = lin.weight.data_ptr()
    absmax = lin.weight.quant_state.absmax.clone()
    adopted = adopt_linear4bit(lin)
    assert adopted is lin and lin.weight.data_ptr() == ptr
    assert torch.equal(lin.weight.quant_state.absmax, absmax)
    assert torch.equal(RowBlocks(lin, 32).dequantize(), bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state))


def test_unquantized_linear4bit_is_quantized_explicitly():
    lin = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4")
    assert not lin.weight.bnb_quantized
    adopt_linear4bit(lin)
    assert lin.weight.bnb_quantized and lin.weight.dtype == torch.uint8


def test_fp4_is_rejected_with_the_fix():
    lin = bnb.nn.Linear4bit(128, 64, bias=False).to("cpu")  # bitsandbytes' default is fp4
    with pytest.raises(ValueError, match="quant_type='fp4'; qdora needs 'nf4'"):
        adopt_linear4bit(lin)


def test_quantize_errors_are_clear():
    with pytest.raises(ValueError, match="expected a 2-D"):
        quantize_nf4(torch.randn(4, 4, 4))
    with pytest.raises(TypeError, match="expected a float weight"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
    W = torch.randn(4, 64)
    W[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(first at index \[2, 3\]\)"):
        quantize_nf4(W)
    with pytest.raises(ValueError, match="use quant_storage='uint8' for this layer"):
        quantize_nf4(torch.randn(3, 1151), quant_storage="bfloat16")
    with pytest.raises(ValueError, match="quant_storage='int2' is unknown"):
        quantize_nf4(torch.randn(4, 64), quant_storage="int2")


def test_linear4bit_from_linear_keeps_bias_and_matches_bitsandbytes_forward():
    lin = nn.Linear(256, 80)
    q = linear4bit_from_linear(lin)
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"
    assert torch.equal(q.bias, lin.bias) and not q.bias.requires_grad
    x = torch.randn(5, 256)
    W = RowBlocks(q, 1024).dequantize()
    with torch.no_grad():
        assert torch.allclose(q(x), x @ W.t() + lin.bias, atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 1151), (33, 1000), (16, 4096)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_chunked_quantization_is_bitsandbytes_bit_for_bit(shape, double_quant, storage):
    W = torch.randn(*shape)
    if ((W.numel() + 1) // 2) % (2 if storage == "bfloat16" else 1):
        pytest.skip("bytes do not fill bf16 elements")  # covered by test_quantize_errors_are_clear
    storage_dtype = {"uint8": torch.uint8, "bfloat16": torch.bfloat16}[storage]
    ref, ref_state = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=double_quant, quant_type="nf4",
                                        quant_storage=storage_dtype)
    packed, state = quantize_nf4(W, 64, double_quant, storage, chunk=1024)  # many chunks
    assert packed.dtype == ref.dtype and torch.equal(packed.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(state.absmax, ref_state.absmax) and state.shape == ref_state.shape
    if double_quant:
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.state2.absmax, ref_state.state2.absmax)


def test_quantizing_a_large_weight_costs_about_a_byte_per_element():
    """The quantizer's tensors, beyond one chunk: the packed chunks and their concatenation (9/8
    byte per element with the absmax) plus one chunk's temporaries; nothing of the weight's size
    in float or bool (a whole-weight finiteness check used to cost 7 bytes per element). The bound
    is what `qdora plan` counts for the FSDP start."""
    from qdora.core.nf4 import QUANT_CHUNK
    from qdora.eval.bench.memory import peak_bytes

    weight = torch.randn(4096, 1024)
    n = weight.numel()
    assert n == 4 * QUANT_CHUNK
    peak = peak_bytes(lambda: quantize_nf4(weight))
    # (+ 4 KiB: the code books and the double quantization's small tensors)
    assert 9 * n // 8 <= peak <= 9 * n // 8 + 29 * QUANT_CHUNK // 4 + 4096, peak / n
    weight[4095, 1023] = float("inf")  # the last chunk is checked too
    with pytest.raises(ValueError, match=r"non-finite values \(first at index \[4095, 1023\]\)"):
        quantize_nf4(weight)


@pytest.mark.parametrize("out_f, in_f", [(64, 32), (64, 96), (48, 100), (7, 1151), (64, 64)])
def test_frozen_layers_compute_the_nf4_weight_whatever_the_row_length(out_f, in_f):
    """A frozen NF4 layer's forward and input gradient against the fp64 product with its dequantized
    weight (the plain-torch reference decoder). Rows that are not whole NF4 blocks go through qdora's
    path (`ExactLinear4bit`): bitsandbytes 0.50.2's CPU kernels are wrong there (64x32: off by ~8).
    Bound: fp32 summation of n terms, elementwise `n·u·Σ|terms|` (u = 2^-24), on any CPU."""
    from qdora.core.layer import exact_frozen_forward

    torch.manual_seed(0)
    layer = linear4bit_from_linear(nn.Linear(in_f, out_f, bias=True))
    assert exact_frozen_forward(layer) == (in_f % 64 != 0)
    W = nf4_reference_dequantize(layer.weight.data, layer.weight.quant_state).double()
    x = (torch.randn(5, in_f) * 3).requires_grad_()
    dy = torch.randn(5, out_f)
    u = 2.0 ** -24
    x64, b64, dy64 = x.detach().double(), layer.bias.detach().double(), dy.double()
    for mode in (True, False):
        layer.train(mode)
        y = layer(x)
        (dx,) = torch.autograd.grad(y, x, dy)
        bound_y = (in_f + 1) * u * (x64.abs() @ W.abs().t() + b64.abs()) + 1e-30
        assert ((y.double() - (x64 @ W.t() + b64)).abs() <= bound_y).all(), f"forward, train={mode}"
        bound_dx = out_f * u * (dy64.abs() @ W.abs()) + 1e-30
        assert ((dx.double() - dy64 @ W).abs() <= bound_dx).all(), f"input gradient, train={mode}"
