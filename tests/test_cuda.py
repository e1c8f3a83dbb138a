"""The GPU paths, on a CUDA device: every test here is marked `cuda` and skipped, with the reason
shown, where `torch.cuda.is_available()` is false. `scripts/gpu-check.sh` runs this file (and
`tests/test_kernels.py`, whose Triton cases run the compiled kernels on a GPU) on a GPU machine.

What runs here, each against an independent oracle:

- `QDoRALinear` computing in bf16 on CUDA (its default there) against the fp64 oracle that
  materializes `W0 + s·B·A` (`tests/oracle.py`), on a weight quantized by bitsandbytes' CUDA kernel
  and dequantized for the oracle by the plain-torch reference: outputs and the gradients of x, A, B
  and m, both norm modes, awkward shapes, zero rows; and that the ops ran their Triton kernels.
- every Triton kernel against the fp64 formulas and the plain-torch reference on CUDA tensors,
  `torch.library.opcheck` on CUDA, and the fused epilogue's bytes and bandwidth against a copy.
- PEFT's DoRA/LoRA on a CUDA `bnb.nn.Linear4bit` (quantized by bitsandbytes on `.cuda()`).
- `torch.compile` of a training step.
- the loader quantizing a checkpoint on the GPU (bit for bit bitsandbytes' CUDA quantization),
  its logits against plain transformers on the reference-dequantized weights, and the merge.
- FSDP on 1 GPU (NCCL, bf16 mixed precision), with and without pinned CPU offload, against the
  single-process run; paged 8-bit AdamW; exact resume.

Tolerances: BF16_TOL (conftest) for bf16 compute against fp64; fp32 paths keep FP32_TOL; the
others are stated where they are used.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from conftest import BF16_TOL, FP32_TOL, assert_close, max_rel_err
from models import build, llama3_config, save_bpe_tokenizer, save_tokenizer
from oracle import dora_reference, nf4_reference_dequantize
from torch import nn

from qdora import AdapterConfig, QDoRALinear, linear4bit_from_linear
from qdora.kernels import ops, reference

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False): scripts/gpu-check.sh runs these on a GPU"


def cuda_only(test):
    """Mark a test `cuda` and skip it, with the reason shown, where there is no CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason=NO_CUDA)(test))

DEV = "cuda"
U_BF16 = 2.0 ** -8
WORKER = Path(__file__).with_name("fsdp_worker.py")


def _gamma(k: int) -> float:
    u = 2.0 ** -24
    return k * u / (1 - k * u)


def _triton():
    from qdora.kernels import triton_kernels as tk
    return tk


@cuda_only
def test_triton_is_compiled_not_interpreted():
    """On a GPU the kernels must run compiled: TRITON_INTERPRET=1 would make every other test here
    check the interpreter again."""
    tk = _triton()
    assert not tk._INTERPRETING, "TRITON_INTERPRET=1 is set: unset it to test the compiled kernels"
    assert ops.triton_kernels() is tk


# ---- the layer in bf16 against the fp64 oracle ---------------------------------------------------

def cuda_layer(in_f, out_f, r=8, norm="detached", bias=False, zero_rows=(), perturb=True, **kw):
    """A QDoRALinear on an NF4 weight quantized on the GPU; compute "auto" (bf16 on CUDA)."""
    lin = nn.Linear(in_f, out_f, bias=bias, device=DEV)
    with torch.no_grad():
        lin.weight.mul_(3.0)
        lin.weight[list(zero_rows)] = 0
    base = linear4bit_from_linear(lin)
    kw.setdefault("adapter_dtype", torch.bfloat16)
    layer = QDoRALinear(base, r=r, alpha=2 * r, norm=norm, **kw)
    if perturb:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.2)
            layer.magnitude_delta.normal_(0, 0.3)
    return layer


def independent_w0(layer: QDoRALinear) -> torch.Tensor:
    """The base weight dequantized by the plain-torch reference (not the layer's own Triton path), fp64."""
    w = layer.base_layer.weight
    return nf4_reference_dequantize(w.data, w.quant_state).double()


def oracle(layer, x, dy):
    W0 = independent_w0(layer)
    leaf = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    xr, A, B, m = leaf(x), leaf(layer.lora_A), leaf(layer.lora_B), leaf(layer.magnitude)
    bias = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().double()
    y = dora_reference(xr, W0, A, B, m, layer.scaling, bias=bias, exact=layer.norm == "exact", eps=layer.eps)
    y.backward(dy.double())
    return y.detach(), {"x": xr.grad, "A": A.grad, "B": B.grad, "m": m.grad}


def step(layer, x, dy):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), {"x": x.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad, "m": layer.magnitude_delta.grad}


@cuda_only
@pytest.mark.parametrize("in_f, out_f", [(64, 48), (1151, 70), (256, 130)], ids=str)
@pytest.mark.parametrize("r", [1, 16])
@pytest.mark.parametrize("norm", ["detached", "exact"])
def test_bf16_layer_matches_the_fp64_oracle(in_f, out_f, r, norm, monkeypatch):
    tk = _triton()
    calls = {}
    for name in ("dequantize_nf4_rows", "nf4_norm_terms", "dora_epilogue_", "dora_epilogue_backward"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _n=name, _r=real: (calls.__setitem__(_n, calls.get(_n, 0) + 1),
                                                                    _r(*a))[1])
    layer = cuda_layer(in_f, out_f, r=r, norm=norm, block_rows=32)
    x = torch.randn(3, 5, in_f, device=DEV).bfloat16()
    dy = torch.randn(3, 5, out_f, device=DEV).bfloat16()
    y, grads = step(layer, x, dy)
    assert y.dtype == torch.bfloat16 and grads["x"].dtype == torch.bfloat16
    y_ref, ref = oracle(layer, x, dy)
    assert_close(y, y_ref, BF16_TOL, "output")
    for name, g in grads.items():
        assert_close(g, ref[name], BF16_TOL, f"d{name}")
    # The layer's compute went through the Triton kernels (not the reference) on CUDA.
    assert set(calls) >= {"dequantize_nf4_rows", "dora_epilogue_", "dora_epilogue_backward"}, calls


@cuda_only
@pytest.mark.parametrize("norm", ["detached", "exact"])
def test_bf16_zero_rows_stay_finite_and_output_their_bias(norm):
    zero = (0, 3, 17)
    layer = cuda_layer(128, 40, r=4, norm=norm, bias=True, zero_rows=zero, perturb=False)
    x, dy = torch.randn(5, 128, device=DEV).bfloat16(), torch.randn(5, 40, device=DEV).bfloat16()
    y, grads = step(layer, x, dy)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    bias = layer.base_layer.bias.detach()[list(zero)].to(torch.bfloat16)
    assert torch.equal(y[:, list(zero)], bias.expand(5, -1))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    y, grads = step(layer, x, dy)
    y_ref, ref = oracle(layer, x, dy)
    assert_close(y, y_ref, BF16_TOL, "output")
    for name, g in grads.items():
        assert_close(g, ref[name], BF16_TOL, f"d{name}")


@cuda_only
def test_bf16_step_zero_is_the_quantized_base():
    layer = cuda_layer(512, 256, r=16, bias=True, perturb=False, block_rows=10**6)
    x = torch.randn(6, 512, device=DEV).bfloat16()
    with torch.no_grad():
        y = layer(x).double()
    W0 = independent_w0(layer)
    ref = x.double() @ W0.t() + layer.base_layer.bias.double()
    assert_close(y, ref, BF16_TOL, "step-0 output")
    assert torch.equal(layer.magnitude / layer.row_norm(), torch.ones(256, device=DEV))


# ---- the Triton kernels on CUDA tensors ----------------------------------------------------------

def _nf4(out_f, in_f, double_quant=True):
    from qdora.core.nf4 import quantize_nf4
    W = torch.randn(out_f, in_f, device=DEV)
    packed, state = quantize_nf4(W, blocksize=64, double_quant=double_quant)
    return ops.NF4Weight.from_quant_state(packed, state), nf4_reference_dequantize(packed, state)


KOUT, KIN, KT = 1032, 4096, 300   # rows not a multiple of any tile; Llama-width rows


@cuda_only
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("start, stop", [(0, KOUT), (7, 515)], ids=["whole", "mid"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_triton_dequantize_equals_the_references_bitwise(double_quant, start, stop, dtype):
    w, W = _nf4(KOUT, KIN, double_quant)
    got = _triton().dequantize_nf4_rows(*w._args(), start, stop - start, KIN, dtype)
    ref = reference.dequantize_nf4_rows(*w._args(), start, stop - start, KIN, dtype)
    assert torch.equal(got, W[start:stop].to(dtype)) and torch.equal(got, ref)


@cuda_only
def test_triton_dequantize_mid_byte_start():
    w, W = _nf4(9, 75)  # odd row length: row 1 starts in the middle of a byte
    got = _triton().dequantize_nf4_rows(*w._args(), 1, 7, 75, torch.bfloat16)
    assert torch.equal(got, W[1:8].bfloat16())


@cuda_only
@pytest.mark.parametrize("r", [None, 1, 16, 64])
def test_triton_norm_terms_match_fp64(r):
    w, W = _nf4(KOUT, KIN)
    A = None if r is None else torch.randn(r, KIN, device=DEV).bfloat16()
    P, c = _triton().nf4_norm_terms(*w._args(), 0, KOUT, KIN, A)
    W64 = W.double()
    c64 = W64.pow(2).sum(1)
    assert ((c.double() - c64).abs() <= _gamma(KIN) * c64).all()
    if r is not None:
        A64 = A.double()
        assert ((P.double() - W64 @ A64.t()).abs() <= _gamma(KIN) * (W64.abs() @ A64.abs().t()) + 1e-30).all()
        Pr, cr = reference.nf4_norm_terms(*w._args(), 0, KOUT, KIN, A)
        assert_close(P, Pr, 1e-5, "P vs reference")


@cuda_only
@pytest.mark.parametrize("r", [0, 3, 16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_epilogue_matches_fp64(r, dtype):
    base = torch.randn(KT, KOUT, device=DEV).to(dtype)
    a = torch.randn(KT, r, device=DEV).to(dtype) if r else None
    B = torch.randn(KOUT, r, device=DEV).to(dtype) if r else None
    g = torch.rand(KOUT, device=DEV) + 0.5
    g[::7] = 0.0
    bias = torch.randn(KOUT, device=DEV).to(dtype)
    s = 0.75
    out = base.clone()
    _triton().dora_epilogue_(out, a, B, g, bias, s)
    h, mag = base.double(), base.double().abs()
    if r:
        h = h + s * a.double() @ B.double().t()
        mag = mag + s * a.double().abs() @ B.double().abs().t()
    y = g.double() * h + bias.double()
    u = U_BF16 if dtype == torch.bfloat16 else 2.0 ** -11
    bound = (2 * u + _gamma(max(r, 1))) * (g.double() * mag + bias.double().abs()) * 1.01
    assert ((out.double() - y).abs() <= bound).all(), ((out.double() - y).abs() / bound).max()
    ref = base.clone()
    reference.dora_epilogue_(ref, a, B, g, bias, s)
    assert_close(out, ref, 4 * u, "vs reference")


@cuda_only
@pytest.mark.parametrize("tokens", [1, KT, 4096])
def test_triton_epilogue_backward_matches_fp64(tokens):
    dy = torch.randn(tokens, KOUT, device=DEV).bfloat16()
    y = torch.randn(tokens, KOUT, device=DEV).bfloat16()
    g, bias = torch.rand(KOUT, device=DEV) + 0.5, torch.randn(KOUT, device=DEV).bfloat16()
    dh, total = _triton().dora_epilogue_backward(dy[:, 64:], y[:, 64:], g[64:], bias[64:])  # strided views
    dh64 = dy[:, 64:].double() * g[64:].double()
    assert ((dh.double() - dh64).abs() <= 1.01 * U_BF16 * dh64.abs()).all()
    prod = dy[:, 64:].double() * (y[:, 64:].double() - bias[64:].double())
    assert ((total.double() - prod.sum(0)).abs() <= _gamma(tokens + 1) * prod.abs().sum(0) + 1e-30).all()
    dh_ref, total_ref = reference.dora_epilogue_backward(dy[:, 64:], y[:, 64:], g[64:], bias[64:])
    assert_close(total, total_ref, 1e-5, "sum vs reference")


@cuda_only
def test_opcheck_every_op_on_cuda_in_bf16():
    w, _ = _nf4(67, 192)
    base = torch.randn(37, 67, device=DEV).bfloat16()
    a, B = torch.randn(37, 3, device=DEV).bfloat16(), torch.randn(67, 3, device=DEV).bfloat16()
    g, bias = torch.rand(67, device=DEV), torch.randn(67, device=DEV).bfloat16()
    cases = [(torch.ops.qdora.dequantize_nf4.default, (*w._args(), 5, 20, 192, torch.bfloat16)),
             (torch.ops.qdora.nf4_norm_terms.default, (*w._args(), 2, 40, 192, torch.randn(3, 192, device=DEV))),
             (torch.ops.qdora.dora_epilogue_.default, (base, a, B, g, bias, 0.5)),
             (torch.ops.qdora.dora_epilogue_backward.default, (torch.randn_like(base), base, g, bias))]
    for op, args in cases:
        torch.library.opcheck(op, args)


@cuda_only
def test_fused_epilogue_moves_fewer_bytes_and_nears_copy_bandwidth():
    """`qdora bench kernels`' measurement at a Llama-3-8B shape: Triton agrees with the torch
    sequence, moves less than half its bytes, beats it on time, and reaches a fair share of the
    bandwidth of a device-to-device copy (a floor of 20%, far below what a memory-bound kernel
    should reach: it catches a kernel that is broken, not one that is slightly slow)."""
    from qdora.eval.bench.kernels import bench_shape, copy_bandwidth

    device = torch.device(DEV)
    peak = copy_bandwidth(device, 5)
    res = bench_shape(4096, 4096, 2048, 16, torch.bfloat16, device, reps=5, triton=True)
    epi = res["results"]["epilogue"]
    for name, row in res["results"].items():
        assert row["max_rel_diff"] < 2e-2, (name, row["max_rel_diff"])
        assert row["triton"]["bytes"] <= row["torch"]["bytes"], name
    assert epi["torch"]["bytes"] > 2 * epi["triton"]["bytes"]
    assert epi["triton"]["ms"] < epi["torch"]["ms"], epi
    assert epi["triton"]["gbps"] >= 0.2 * peak, (epi["triton"]["gbps"], peak)


# ---- PEFT on a CUDA Linear4bit --------------------------------------------------------------------

class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


@cuda_only
@pytest.mark.parametrize("use_dora", [True, False], ids=["qdora", "qlora"])
@pytest.mark.parametrize("in_f, out_f, r", [(256, 192, 8), (1024, 130, 16)])
def test_peft_parity_on_a_cuda_linear4bit(use_dora, in_f, out_f, r):
    """fp32 compute on both sides (bitsandbytes' own compute dtype), same NF4 weight quantized by
    bitsandbytes on `.cuda()`, same A, B, m: equal to fp32 rounding (FP32_TOL, as on CPU)."""
    peft = pytest.importorskip("peft")
    dense = nn.Linear(in_f, out_f, bias=False)
    base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                             compress_statistics=True)
    base.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                    compress_statistics=True)
    base = base.cuda()   # bitsandbytes quantizes here, on the GPU
    assert base.weight.bnb_quantized and base.weight.device.type == "cuda"
    ours = QDoRALinear(base, r=r, alpha=2 * r, use_dora=use_dora, adapter_dtype=torch.float32,
                       compute_dtype=torch.float32)
    model = peft.get_peft_model(Holder(base), peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                               target_modules=["proj"], use_dora=use_dora))
    theirs = model.base_model.model.proj
    if use_dora:
        # Both take the row norms of the same dequantized fp32 values (B = 0), each a sum of `in`
        # squares and a sqrt in its own order (γ_in/2 + u each): within γ_in + 2u of each other.
        m_ours = ours.magnitude.detach().double()
        m_peft = theirs.lora_magnitude_vector["default"].weight.detach().double()
        bound = (_gamma(in_f) + 2 * 2.0 ** -24) * m_peft.abs() * 1.01
        assert ((m_ours - m_peft).abs() <= bound).all(), "initial magnitude"
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.05)
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        if use_dora:
            ours.magnitude_delta.normal_(0, 0.1)
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    x1 = torch.randn(3, 6, in_f, device=DEV, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ours(x1), model(x2)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    assert_close(y1, y2, FP32_TOL, "output")
    assert_close(x1.grad, x2.grad, FP32_TOL, "dx")
    assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, FP32_TOL, "dA")
    assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, FP32_TOL, "dB")
    if use_dora:
        assert_close(ours.magnitude_delta.grad, theirs.lora_magnitude_vector["default"].weight.grad, FP32_TOL, "dm")


# ---- torch.compile ---------------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("norm", ["detached", "exact"])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_step_equals_eager_on_cuda(norm, compute):
    """As tests/test_kernels.py on CPU. Inductor reorders arithmetic: in fp32 the compiled and the
    eager step are each held to the fp64 oracle with FP32_TOL (its derivation covers in = 192,
    19·2 tokens; the vector code inductor emits differs by GPU and by version, so no bound between
    the two is sourced); bf16 within 2 bf16 roundings of the largest entry (2·2^-8)."""
    layer = cuda_layer(192, 67, r=4, norm=norm, bias=True, adapter_dtype=torch.float32, compute_dtype=compute)
    x = torch.randn(2, 19, 192, device=DEV, dtype=compute)
    dy = torch.randn(2, 19, 67, device=DEV, dtype=compute)

    def run(module):  # `module` is the layer or its compiled wrapper: the gradients land on the layer
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(dy)
        return [y.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude_delta.grad]

    eager = run(layer)
    compiled = run(torch.compile(layer, backend="inductor"))
    names = ("y", "dx", "dA", "dB", "dm")
    if compute == torch.float32:
        y_ref, ref = oracle(layer, x, dy)
        for label, got in (("eager", eager), ("compiled", compiled)):
            for name, g, want in zip(names, got, [y_ref, ref["x"], ref["A"], ref["B"], ref["m"]]):
                assert_close(g, want, FP32_TOL, f"{label} {name}")
    else:
        for name, got, want in zip(names, compiled, eager):
            assert_close(got, want, 2 * U_BF16, name)


# ---- loader and merge on the GPU -------------------------------------------------------------------

@cuda_only
def test_chunked_quantization_on_the_gpu_is_bitsandbytes_bit_for_bit():
    """`quantize_nf4` cuts a weight larger than its chunk into pieces for bitsandbytes' CUDA op and
    double-quantizes the absmax once: the same bytes as one `quantize_4bit` call."""
    from qdora.core.nf4 import quantize_nf4
    W = torch.randn(1100, 1024, device=DEV, dtype=torch.bfloat16)
    packed, state = quantize_nf4(W, chunk=1 << 18)
    ref_packed, ref_state = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(state.state2.absmax, ref_state.state2.absmax)


@pytest.fixture(scope="module")
def gpu_loaded(tmp_path_factory):
    from qdora import load_model
    path = tmp_path_factory.mktemp("gpu-ckpt") / "ckpt"
    config = llama3_config()
    build(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="150KB")
    save_tokenizer(path, config.vocab_size)
    cfg = AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0, adapter_dtype="float32")
    model, tok = load_model(path, method="qdora", cfg=cfg, device=DEV, progress=False)
    return path, config, model.eval(), tok


@cuda_only
def test_loader_quantizes_on_the_gpu(gpu_loaded):
    from qdora.models.loading import CheckpointReader
    path, _, model, _ = gpu_loaded
    reader = CheckpointReader(path)
    assert all(t.device.type == "cuda" for t in list(model.parameters()) + list(model.buffers()))
    count = 0
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            key = name.removesuffix(".base_layer") + ".weight"
            packed, state = bnbF.quantize_4bit(reader.get(key).to(DEV), blocksize=64, compress_statistics=True,
                                               quant_type="nf4")
            assert torch.equal(mod.weight.data, packed), name
            assert torch.equal(mod.weight.quant_state.absmax, state.absmax), name
            count += 1
    assert count == 14
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16   # the checkpoint's dtype on CUDA


def _oracle_logits(path, model, ids):
    """Plain transformers in fp64 on the CPU whose NF4 linears hold the reference dequantization of
    the very bytes the GPU loader produced."""
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                w = mod.weight
                ref.get_submodule(name.removesuffix(".base_layer")).weight.copy_(
                    nf4_reference_dequantize(w.data, w.quant_state).double().cpu())
        return ref(ids).logits


@cuda_only
def test_gpu_loaded_logits_match_an_independent_dequantization(gpu_loaded):
    path, config, model, _ = gpu_loaded
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        ours = model(ids.to(DEV)).logits.double().cpu()
    # bf16 storage and compute through 2 decoder layers against fp64: a few bf16 roundings deep.
    assert_close(ours, _oracle_logits(path, model, ids), BF16_TOL, "logits")


@cuda_only
def test_merge_of_a_gpu_model(gpu_loaded, tmp_path):
    """`merge_and_save` on a model that lives on the GPU: each merged weight against the fp64
    formula on the reference-dequantized W0, and the merged checkpoint's logits (plain transformers,
    fp32, CPU) against the adapted model's."""
    from transformers import AutoModelForCausalLM

    from qdora import merge_and_save, merged_weight
    path, config, model, tok = gpu_loaded
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QDoRALinear):
                layer.lora_B.normal_(0, 0.2)
                layer.set_magnitude(layer.magnitude * (1 + 0.5 * torch.rand(layer.out_features, device=DEV)))
    layer = model.model.layers[0].self_attn.q_proj
    W = independent_w0(layer) + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    expected = W * (layer.magnitude.double() / W.norm(dim=1))[:, None]
    assert_close(merged_weight(layer, torch.float32).double().cpu(), expected.cpu(), 1e-5, "merged weight")
    merge_and_save(model, tmp_path / "merged", tokenizer=tok, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        adapted = model(ids.to(DEV)).logits.float().cpu()
        assert_close(merged(ids).logits, adapted, BF16_TOL, "merged logits vs the adapted GPU model")


# ---- training: FSDP on one GPU, paged 8-bit AdamW, resume -----------------------------------------

LOSS_RTOL = 2e-2       # bf16 compute: FSDP's bf16 all-gathered adapters vs fp32 ones cast at each use
GRAD_NORM_RTOL = 5e-2
UPDATE_RTOL = 0.1      # ||B_a - B_b|| / ||B_b||: B starts at 0, so B is the whole update of 4 steps


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    from qdora.data.examples import DEMO_DATA
    root = tmp_path_factory.mktemp("gpu-train")
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:11]
    (root / "data.json").write_text(json.dumps(records))
    model = build(llama3_config(vocab_size=512, intermediate_size=256, max_position_embeddings=512))
    model.to(torch.bfloat16).save_pretrained(root / "model")   # bf16: what a GPU run stores and computes
    save_bpe_tokenizer(root / "model", [r["instruction"] + " " + r["output"] for r in records])
    return root


def train_config(root: Path, out: Path, **kw) -> dict:
    base = dict(model=str(root / "model"), data=str(root / "data.json"), out=str(out), method="qdora", r=4,
                alpha=8, dropout=0.0, lr=5e-3, max_steps=4, batch_size=5, cutoff_len=320, save_every=2,
                warmup_steps=1, progress=False)
    base.update(kw)
    return base


def _same_run(actual: Path, expected: Path, loss_rtol=LOSS_RTOL, grad_rtol=GRAD_NORM_RTOL):
    from safetensors.torch import load_file

    from qdora.train.loop import read_metrics
    a, e = read_metrics(actual), read_metrics(expected)
    assert [m["step"] for m in a] == [m["step"] for m in e]
    for x, y in zip(a, e):
        assert abs(x["loss"] - y["loss"]) <= loss_rtol * abs(y["loss"]), (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= grad_rtol * y["grad_norm"], (x["grad_norm"], y["grad_norm"])
    fa = load_file(str(actual / "adapter" / "adapter.safetensors"))
    fe = load_file(str(expected / "adapter" / "adapter.safetensors"))
    assert sorted(fa) == sorted(fe)
    moved = [k for k in fe if k.endswith("lora_B")]
    assert moved
    for k in moved:
        diff = (fa[k].double() - fe[k].double()).norm() / fe[k].double().norm()
        assert diff <= UPDATE_RTOL, f"{k}: relative difference {diff:.3e}"


@pytest.fixture(scope="module")
def single_run(train_setup):
    from qdora.train.loop import TrainConfig, train
    out = train_setup / "single"
    train(TrainConfig(**train_config(train_setup, out)))
    return out


@cuda_only
@pytest.mark.slow
def test_fsdp_on_one_gpu_nccl_bf16_with_and_without_cpu_offload(train_setup, single_run):
    root = train_setup
    runs = [{"config": train_config(root, root / "fsdp", fsdp=True)},
            {"config": train_config(root, root / "fsdp-offload", fsdp=True, cpu_offload=True)}]
    spec = root / "fsdp-spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    env = dict(os.environ, QDORA_DIST_TIMEOUT="120")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(WORKER),
           str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for name, offload in (("fsdp", False), ("fsdp-offload", True)):
        facts = json.loads((root / name / "facts-rank0.json").read_text())
        assert facts["all_dtensor"] and facts["fsdp_layers"] == 2
        assert facts["packed_dtypes"] == ["torch.bfloat16"]           # quant_storage bf16 for mixed precision
        assert facts["offload_to_cpu"] == [offload]
        assert facts["shard_devices"] == (["cpu"] if offload else ["cuda:0"])
        _same_run(root / name, single_run)


@cuda_only
def test_resume_on_gpu_continues_the_run(train_setup, single_run):
    """Stopped by SIGTERM after step 2 and resumed: the same curve as the uninterrupted run. The CUDA
    RNG state is restored; SDPA's backward may use atomics on a GPU, so equality is within 1e-4."""
    from qdora.train.loop import TrainConfig, read_metrics, train
    out = train_setup / "resumed"
    stop = lambda s, _: s == 2 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    first = train(TrainConfig(**train_config(train_setup, out)), on_step=stop)
    assert first["steps"] == 2 and first["interrupted"] == signal.SIGTERM
    train(TrainConfig(**train_config(train_setup, out, resume=True)))
    _same_run(out, single_run, loss_rtol=1e-4, grad_rtol=1e-3)
    losses = [m["loss"] for m in read_metrics(out)], [m["loss"] for m in read_metrics(single_run)]
    print(f"resume bit for bit on this GPU: {losses[0] == losses[1]}")


@cuda_only
@pytest.mark.slow
def test_paged_adamw_8bit_trains_checkpoints_and_resumes(tmp_path, train_setup):
    """Adapters large enough for bitsandbytes' 8-bit states (>= 4096 values) and its paged buffers
    (>= 1e5 values): step 1 equals the AdamW run's (no update yet), later steps follow it, and a
    run stopped after step 2 and resumed from its checkpoint continues the same curve."""
    from qdora.train.loop import TrainConfig, read_metrics, train
    root = tmp_path
    build(llama3_config(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
                        num_key_value_heads=2, max_position_embeddings=512)).to(torch.bfloat16).save_pretrained(
        root / "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (train_setup / "model" / f).is_file():
            (root / "model" / f).write_bytes((train_setup / "model" / f).read_bytes())
    (root / "data.json").write_bytes((train_setup / "data.json").read_bytes())
    kw = dict(r=128, alpha=256, lr=1e-3)
    train(TrainConfig(**train_config(root, root / "adamw", **kw)))
    train(TrainConfig(**train_config(root, root / "paged", optimizer="paged_adamw_8bit", **kw)))
    a, e = read_metrics(root / "paged"), read_metrics(root / "adamw")
    assert abs(a[0]["loss"] - e[0]["loss"]) <= 1e-5 * e[0]["loss"]
    for x, y in zip(a[1:], e[1:]):
        assert abs(x["loss"] - y["loss"]) <= 5e-2 * y["loss"], (x, y)
    out = root / "paged-resumed"
    stop = lambda s, _: s == 2 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    train(TrainConfig(**train_config(root, out, optimizer="paged_adamw_8bit", **kw)), on_step=stop)
    train(TrainConfig(**train_config(root, out, optimizer="paged_adamw_8bit", resume=True, **kw)))
    r = read_metrics(out)
    assert [m["step"] for m in r] == [1, 2, 3, 4]
    assert max_rel_err(torch.tensor([m["loss"] for m in r]), torch.tensor([m["loss"] for m in a])) <= 1e-3


@cuda_only
def test_paged_adamw_8bit_optimizer_uses_paged_8bit_states():
    """The optimizer `qdora train --optimizer paged_adamw_8bit` builds, on CUDA: 8-bit states, paged
    for a tensor of >= 1e5 values, and its update follows torch's AdamW (8-bit quantized moments:
    within 2% of the update's norm after 3 steps)."""
    from qdora.train.loop import TrainConfig, make_optimizer
    cfg = TrainConfig(model="m", data="d", out="o", optimizer="paged_adamw_8bit", lr=1e-3)
    torch.manual_seed(0)
    p8 = nn.Parameter(torch.randn(256, 512, device=DEV))
    p32 = nn.Parameter(p8.detach().clone())
    start = p8.detach().clone()
    opt8 = make_optimizer([p8], cfg, torch.device(DEV))
    opt32 = torch.optim.AdamW([p32], lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn_like(p8)
        p8.grad, p32.grad = g.clone(), g.clone()
        opt8.step()
        opt32.step()
    state = opt8.state[p8]
    assert state["state1"].dtype == torch.uint8 and getattr(state["state1"], "is_paged", False)
    upd8, upd32 = (p8 - start).double(), (p32 - start).double()
    assert ((upd8 - upd32).norm() / upd32.norm()).item() < 0.02


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason=NO_CUDA)])])
def test_checkpoint_holds_the_8bit_optimizer_state(tmp_path, device):
    """`qdora.train.checkpoint` writes and reads back bitsandbytes' 8-bit optimizer state (paged on CUDA;
    on CPU bitsandbytes falls back to unpaged states, the same state_dict): the reloaded optimizer
    steps exactly as the original (bitsandbytes nests its 8-bit states in a dict)."""
    import warnings

    from qdora.train.checkpoint import load_checkpoint, save_checkpoint
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    torch.manual_seed(0)
    model = nn.Linear(512, 256, bias=False, device=device)
    opt = bnb.optim.PagedAdamW8bit(model.parameters(), lr=1e-3)
    model.weight.grad = torch.randn_like(model.weight)
    opt.step()
    assert opt.state[model.weight]["state1"].dtype == torch.uint8
    save_checkpoint(tmp_path / "ck", model, opt, {0: "weight"}, {"step": 1})
    other = nn.Linear(512, 256, bias=False, device=device)
    opt2 = bnb.optim.PagedAdamW8bit(other.parameters(), lr=1e-3)
    load_checkpoint(tmp_path / "ck", other, opt2, {0: "weight"})
    assert torch.equal(other.weight, model.weight)
    g = torch.randn_like(model.weight)
    model.weight.grad, other.weight.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(other.weight, model.weight)


# ---- scripts/gpu-check.sh itself, on the CPU ------------------------------------------------------

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check.sh"


def _run_script(*args, env=None, timeout=300):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))


def test_gpu_check_budgets_fit_its_time_limits():
    from qdora.eval.gpu.check import BUDGETS, LIMIT_S, PARTS, part_commands
    root = SCRIPT.parent.parent
    for mode in ("full", "quick"):
        parts = part_commands(mode, "cuda", "out")
        assert [p[0] for p in parts] == list(PARTS)
        assert sum(p[1] for p in parts) <= LIMIT_S[mode] - 10, (mode, [p[1] for p in parts])
        tests = parts[1][2]
        assert "tests/test_cuda.py" in tests
        assert all((root / t).is_file() for t in tests.split() if t.startswith("tests/"))
    assert "tests/test_kernels.py" in part_commands("full", "cuda", "out")[1][2]  # compiled Triton on a GPU
    assert [p[1] for p in part_commands("quick", "cpu", "out")] == [BUDGETS["cpu"][n] for n in PARTS]
    with pytest.raises(ValueError, match="mode='slow'"):
        part_commands("slow", "cuda", "out")


def test_gpu_check_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")   # a driver tool that finds no GPU
    (fake / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    proc = _run_script("--out", str(tmp_path / "report"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "gpu-check: no NVIDIA GPU here (nvidia-smi lists none): nothing run; use --device cpu for a dry run"]
    assert not (tmp_path / "report").exists()


def test_gpu_check_rejects_unknown_options():
    proc = _run_script("--fast")
    assert proc.returncode == 2 and proc.stderr.strip() == "gpu-check: error: unknown option --fast (see --help)"


def test_gpu_check_offline_options_fail_in_one_line():
    """`--wheels` goes with `--python`; an interpreter that is not there is named (nothing is made)."""
    proc = _run_script("--wheels", "somewhere")
    assert proc.returncode == 2 and proc.stderr.strip() == "gpu-check: error: --wheels goes with --python PY"
    proc = _run_script("--python", "/nonexistent/python3", "--device", "cpu")
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "gpu-check: error: no interpreter '/nonexistent/python3' (--python takes a path or a command name)")


@pytest.mark.slow
def test_gpu_check_stops_at_the_first_failing_part_with_its_log(tmp_path):
    """A part past its budget is ended (with everything it started) and the run stops there; the
    report names the part and its log, and lists what did not run."""
    out = tmp_path / "report"
    proc = _run_script("--device", "cpu", "--no-setup", "--only", "env,bench-kernels", "--budget-scale", "0.001",
                       "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = out / "logs" / "env.log"
    assert f"gpu-check: env: ran past its 0.1 s budget; log: {log}" in proc.stdout
    status = [json.loads(line) for line in (out / "status.jsonl").read_text().splitlines()]
    assert [(s["part"], s["rc"]) for s in status] == [("env", 124)]
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == f"failed: env (log: {log})" and report["not_run"] == ["bench-kernels"]
    assert "| bench-kernels | not run |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """`scripts/gpu-check.sh --device cpu`: every part at tiny shapes, every figure in the report,
    `qdora plan` within the tolerance of the measured CPU step."""
    out = tmp_path / "report"
    proc = _run_script("--device", "cpu", "--no-setup", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "passed" and report["not_run"] == []
    parts = {p["part"]: p for p in report["parts"]}
    assert list(parts) == ["env", "tests", "bench-kernels", "bench-layer", "loss", "step", "long"]
    assert all(p["ok"] and p["seconds"] <= p["budget_s"] for p in parts.values())
    assert parts["env"]["figures"]["cuda_available"] is False
    tests = parts["tests"]["figures"]
    assert tests["failed"] == 0 and tests["skipped"] > 10          # the GPU tests, skipped on CPU
    assert set(parts["bench-kernels"]["figures"][0]["results"]) == {"dequantize", "norm terms", "epilogue",
                                                                     "epilogue bwd"}
    assert "ours qdora" in parts["bench-layer"]["figures"][0]["results"]
    loss = parts["loss"]["figures"]  # on CPU: the whole logits and qdora's chunks, each against fp64
    assert [r["variant"] for r in loss] == ["whole", "torch"]
    assert all(r["loss_rel_err"] <= FP32_TOL and r["dh_rel_err"] <= FP32_TOL for r in loss)
    step = parts["step"]["figures"]
    assert [r["method"] for r in step["rows"]] == ["qdora", "qlora"] and step["ok"]
    for row in step["rows"]:
        assert abs(row["error"]) <= step["tolerance"] and row["measured_bytes"] > 0 and row["step_s"] > 0
    assert not (out / "work" / "synthetic-checkpoint").exists()   # the synthetic checkpoint is removed
    long = parts["long"]["figures"]
    assert [r["variant"] for r in long["rows"]] == ["chunked loss", "+ offloaded activations, tiled layers"]
    for row in long["rows"]:  # doubled from 128 tokens while the steps fit the 16 MiB the dry run allows
        tokens = [t["tokens"] for t in row["tries"]]
        assert tokens[:2] == [128, 256] and row["longest_tokens"] >= 128 and row["predicted_longest_tokens"] > 0
        assert all(t["ok"] == (t["peak_bytes"] <= 16 * 2**20) for t in row["tries"])
        assert row["longest_tokens"] == max(t["tokens"] for t in row["tries"] if t["ok"])
    assert not (out / "work-long" / "synthetic-checkpoint").exists()
    md = (out / "report.md").read_text()
    assert md.startswith("# GPU check\n\n**passed**") and "| step | ok |" in md and "| torch |" in md


# The loss kernels (qdora.core.loss, `kernel=`): qdora's torch path and the two CUDA libraries, in bf16, each
# against the fp64 oracle, with ignored rows and Gemma 2's soft cap (Liger's soft-capping and Cut
# Cross-Entropy do not run in Triton's CPU interpreter: this is their only exactness test).
@cuda_only
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("kernel", ["torch", "liger", "cce"])
def test_loss_kernels_in_bf16_match_the_fp64_oracle(kernel, softcap):
    from qdora.core.loss import chunked_cross_entropy
    if kernel != "torch":
        pytest.importorskip({"liger": "liger_kernel", "cce": "cut_cross_entropy"}[kernel])
    g = torch.Generator(device=DEV).manual_seed(0)
    N, H, V = 1000, 256, 32003  # V prime: no tile divides it
    h = torch.randn(N, H, device=DEV, generator=g).bfloat16().requires_grad_()
    W = (torch.randn(V, H, device=DEV, generator=g) * 0.1).bfloat16().requires_grad_()
    y = torch.randint(0, V, (N,), device=DEV, generator=g)
    y[100:300] = -100
    loss = chunked_cross_entropy(h, W, y, softcap=softcap, kernel=kernel)
    dh, dW = torch.autograd.grad(loss / N, (h, W))
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    logits = h64 @ W64.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    keep = y != -100
    ref = -torch.log_softmax(logits, -1)[keep].gather(1, y[keep][:, None]).sum()
    dh_ref, dW_ref = torch.autograd.grad(ref / N, (h64, W64))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) <= BF16_TOL * ref.item(), (loss.item(), ref.item())
    assert dh.dtype == torch.bfloat16 and dW.dtype == torch.bfloat16
    assert_close(dh, dh_ref, BF16_TOL, f"{kernel} dh")
    assert_close(dW, dW_ref, BF16_TOL, f"{kernel} dW")
    assert dh[~keep].abs().max() == 0


@cuda_only
def test_cut_cross_entropy_refusals_are_one_line():
    from qdora.core.loss import chunked_cross_entropy
    pytest.importorskip("cut_cross_entropy")
    h, W = torch.randn(8, 16, device=DEV), torch.randn(32, 16, device=DEV)
    y = torch.randint(0, 32, (8,), device=DEV)
    with pytest.raises(ValueError, match=r"kernel='cce' computes in fp16 or bf16, the head's matmul is torch.float32"):
        chunked_cross_entropy(h, W, y, kernel="cce")
    with pytest.raises(ValueError, match=r"kernel='cce': Cut Cross-Entropy takes no head bias"):
        chunked_cross_entropy(h.bfloat16(), W.bfloat16(), y, torch.zeros(32, device=DEV), kernel="cce")


def _packed_attention_against_transformers(model, implementation: str) -> None:
    """Logits and every gradient of `model` (bf16, on CUDA) on two packed rows of 80 tokens (sequences longer and
    shorter than a 16-token window, packed; and one alone), after `qdora.packed_sdpa` (whose attention is then
    `implementation`) against before it, within BF16_TOL."""
    from qdora.models.packed_attention import packed_sdpa

    lengths = [(40, 7, 33), (80,)]
    ids = torch.randint(3, 97, (2, 80), device=DEV, generator=torch.Generator(device=DEV).manual_seed(1))
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).to(DEV)

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.float().square().mean().backward()
        return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run()
    packed_sdpa(model)
    assert model.config._attn_implementation == implementation
    got, grads = run()
    assert_close(got, want, BF16_TOL, "logits")
    assert sorted(grads) == sorted(want_grads)
    for name in grads:
        assert_close(grads[name], want_grads[name], BF16_TOL, name)


@cuda_only
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_packed_and_windowed_sdpa_in_bf16_match_transformers_masked_sdpa(kv_heads):
    """`qdora.packed_sdpa` on CUDA in bf16 (CUDA's SDPA kernels; its window blocks through transformers' SDPA with
    repeated keys and the shared additive band mask), against transformers' own SDPA with its `T × T` mask, on packed
    rows with a 16-token sliding window: logits and every gradient."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv_heads, sliding_window=16,
                                        max_position_embeddings=256, attn_implementation="sdpa")
    model = transformers.AutoModelForCausalLM.from_config(config).to(DEV, torch.bfloat16).train()
    _packed_attention_against_transformers(model, "qdora_sdpa")


@cuda_only
def test_right_padded_rows_without_a_mask_in_bf16_match_the_masked_model():
    """`qdora.unmasked_padding` on CUDA in bf16: two rows, the second padded on the right past a 16-token window, fed
    without their mask (CUDA's causal SDPA kernels) against transformers' masked SDPA: the real tokens' logits and
    every gradient of a loss over them."""
    import transformers

    import qdora

    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                                        max_position_embeddings=256, attn_implementation="sdpa")
    model = transformers.AutoModelForCausalLM.from_config(config).to(DEV, torch.bfloat16).train()
    ids = torch.randint(3, 97, (2, 80), device=DEV, generator=torch.Generator(device=DEV).manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 47:] = 0
    real = mask.bool()

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        (logits.float().square() * real[..., None]).mean().backward()
        return logits.detach().float()[real], {n: p.grad.float() for n, p in model.named_parameters()
                                                if p.grad is not None}

    want, want_grads = run()
    handle = qdora.unmasked_padding(qdora.packed_sdpa(model))
    assert handle is not None
    got, grads = run()
    assert_close(got, want, BF16_TOL, "real tokens' logits")
    assert sorted(grads) == sorted(want_grads)
    for name in grads:
        assert_close(grads[name], want_grads[name], BF16_TOL, name)


@cuda_only
def test_softcapped_tiles_in_bf16_match_transformers_eager_attention(monkeypatch):
    """Gemma 2's soft-capped attention on CUDA in bf16 (`qdora.packed_sdpa`'s "qdora_softcap": tiles of 8 queries
    here, each recomputed in the backward), against transformers' eager attention with its `T × T` mask, on packed
    rows with a 16-token sliding window on one layer: logits and every gradient."""
    import transformers

    from qdora.models.shapes import SOFTCAP_TILE_BYTES

    monkeypatch.setitem(SOFTCAP_TILE_BYTES, "cuda", 4 * 4 * 80 * 8)  # 4 heads, 80 keys, 8 queries a tile
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       query_pre_attn_scalar=16, sliding_window=16, attn_logit_softcapping=1.0,
                                       layer_types=["sliding_attention", "full_attention"],
                                       max_position_embeddings=256, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).to(DEV, torch.bfloat16).train()
    _packed_attention_against_transformers(model, "qdora_softcap")
