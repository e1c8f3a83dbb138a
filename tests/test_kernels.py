"""The kernel ops (`qdora.kernels.ops`): reference and Triton implementations against an
independent oracle (bitsandbytes' NF4 decoding + plain-torch dequantization, fp64 formulas and
fp64 autograd), `torch.library.opcheck` on every op, the CUDA dispatch, and `torch.compile`.

No GPU here: the Triton kernels run on CPU tensors under `TRITON_INTERPRET=1` (set by conftest.py
before anything imports Triton), with fp32 `tl.dot` operands (the interpreter's bf16 dot is wrong).

Tolerances are error bounds, not guesses: an fp32 dot of K terms is within `γ_K·Σ|wᵢaᵢ|` of the
exact value, `γ_K = K·u/(1 − K·u)`, `u = 2⁻²⁴` (Higham, Accuracy and Stability, §3.1); a value
rounded to a dtype is within `u_dtype·|value|` (u = 2⁻⁸ bf16, 2⁻¹¹ fp16), and a few roundings
deep within a small multiple of it.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch
from conftest import FP32_TOL, assert_close
from oracle import nf4_reference_dequantize
from test_layer import oracle_step
from torch import nn

from qdora.core.layer import QDoRALinear
from qdora.core.nf4 import linear4bit_from_linear, quantize_nf4
from qdora.kernels import ops, reference

tk = pytest.importorskip("qdora.kernels.triton_kernels",
                         reason="Triton is not installed (pip install triton; Linux only)")
if not tk._INTERPRETING and not torch.cuda.is_available():
    pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set (see conftest.py) and there is no GPU",
                allow_module_level=True)



class _Triton:
    """The Triton launchers, called with CPU tensors: directly under the interpreter; with a GPU
    and compiled Triton, on CUDA copies (results and in-place updates copied back), so this file
    checks the real kernels wherever a GPU is present."""

    def __getattr__(self, name):
        fn = getattr(tk, name)
        if tk._INTERPRETING:
            return fn

        def on_cuda(*args):
            moved = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
            out = fn(*moved)
            for a, m in zip(args, moved):
                if isinstance(a, torch.Tensor):
                    a.copy_(m)
            return tuple(t.cpu() for t in out) if isinstance(out, tuple) else (out.cpu() if out is not None else None)
        return on_cuda


OUT, IN, T = 67, 192, 37           # awkward: 67 rows, 3 NF4 blocks a row, 37 tokens
U = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # unit roundoff 2^-p
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = {"reference": reference, "triton": _Triton()}


def gamma(k: int) -> float:
    return k * U[torch.float32] / (1 - k * U[torch.float32])


def nf4_weight(out_f=OUT, in_f=IN, blocksize=64, double_quant=True):
    W = torch.randn(out_f, in_f)
    packed, state = quantize_nf4(W, blocksize=blocksize, double_quant=double_quant)
    return ops.NF4Weight.from_quant_state(packed, state), nf4_reference_dequantize(packed, state)


def to_dtype(t: torch.Tensor, dtype: torch.dtype, impl: str) -> torch.Tensor:
    """fp32 `t` rounded to `dtype` as `impl` rounds it. Triton's interpreter converts fp32 to bf16
    by truncation (round toward zero; measured: 522 of 1024 random values differ from torch's
    round-to-nearest-even, with or without `fp_downcast_rounding="rtne"`); compiled Triton rounds
    to nearest even like torch."""
    if impl == "triton" and tk._INTERPRETING and dtype == torch.bfloat16:
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits are 0
    return t.to(dtype)


def dtype_id(d):
    return str(d).removeprefix("torch.")


# ---- NF4 dequantization --------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("shape, blocksize, start, stop", [
    ((OUT, IN), 64, 0, OUT),       # whole weight, rows of whole blocks
    ((OUT, IN), 64, 5, 18),        # a middle row block
    ((13, 96), 64, 3, 12),         # rows of 1.5 blocks, start mid-block
    ((9, 75), 128, 1, 8),          # odd row length: start mid-byte
], ids=["whole", "middle", "mid-block", "mid-byte"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dequantize_matches_oracle_bitwise(impl, double_quant, shape, blocksize, start, stop, dtype):
    w, W = nf4_weight(*shape, blocksize=blocksize, double_quant=double_quant)
    got = getattr(IMPLS[impl], "dequantize_nf4_rows")(*w._args(), start, stop - start, shape[1], dtype)
    # Same operations in the same order as bitsandbytes (code · absmax in fp32, one rounding): exact.
    assert got.dtype == dtype and torch.equal(got, to_dtype(W[start:stop], dtype, impl))


def test_dequantize_op_and_rowblocks_use_the_same_values():
    w, W = nf4_weight()
    assert torch.equal(torch.ops.qdora.dequantize_nf4(*w._args(), 0, OUT, IN, torch.float32), W)
    assert w.rows(3, 3, torch.float32).shape == (0, IN)


# ---- norm terms ----------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("r", [None, 1, 3, 16])
@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_norm_terms_match_fp64(impl, double_quant, r, a_dtype):
    w, W = nf4_weight(double_quant=double_quant)
    A = None if r is None else torch.randn(r, IN).to(a_dtype)
    start, stop = 5, OUT
    P, c = getattr(IMPLS[impl], "nf4_norm_terms")(*w._args(), start, stop - start, IN, A)
    W64 = W[start:stop].double()
    c64 = W64.pow(2).sum(1)
    assert c.dtype == torch.float32 and c.shape == (stop - start,)
    assert ((c.double() - c64).abs() <= gamma(IN) * c64 + 1e-30).all()
    assert P.dtype == torch.float32 and P.shape == (stop - start, 0 if r is None else r)
    if r is not None:
        A64 = A.double()
        bound = gamma(IN) * (W64.abs() @ A64.abs().t())
        assert ((P.double() - W64 @ A64.t()).abs() <= bound).all()


def test_norm_terms_rowblocks_equal_the_dequantized_weight_formula():
    base = linear4bit_from_linear(nn.Linear(IN, OUT))
    layer = QDoRALinear(base, r=3, alpha=6, adapter_dtype=torch.float32)
    W = layer.dequantized_base().double()
    P, c = layer._blocks.norm_terms(layer.lora_A)
    A = layer.lora_A.double()
    assert ((P.double() - W @ A.t()).abs() <= gamma(IN) * (W.abs() @ A.abs().t())).all()
    assert torch.equal(c, layer.base_row_sq_norm)


# ---- DoRA epilogue -------------------------------------------------------------------------------

def epilogue_inputs(r, dtype, with_g=True, with_bias=True, tokens=T, out_f=OUT):
    base = torch.randn(tokens, out_f).to(dtype)
    a = torch.randn(tokens, r).to(dtype) if r else None
    B = torch.randn(out_f, r).to(dtype) if r else None
    g = (torch.rand(out_f) + 0.5) if with_g else None
    if g is not None:
        g[::7] = 0.0                           # m = 0 rows: g = 0 exactly
    bias = torch.randn(out_f).to(dtype) if with_bias else None
    return base, a, B, g, bias, 0.75


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("r", [0, 3, 16])
@pytest.mark.parametrize("with_g, with_bias", [(True, True), (True, False), (False, True)],
                         ids=["dora+bias", "dora", "lora+bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_epilogue_forward_matches_fp64(impl, r, with_g, with_bias, dtype):
    base, a, B, g, bias, s = epilogue_inputs(r, dtype, with_g, with_bias)
    out = base.clone()
    getattr(IMPLS[impl], "dora_epilogue_")(out, a, B, g, bias, s)
    h = base.double()
    if r:
        h = h + s * a.double() @ B.double().t()
    gg = g.to(dtype).double() if (g is not None and impl == "reference") else (g.double() if g is not None else 1)
    y = gg * h + (bias.double() if bias is not None else 0)
    bound = epilogue_bound(base, a, B, g, bias, s, r, dtype)
    assert out.dtype == dtype
    assert ((out.double() - y).abs() <= bound).all(), ((out.double() - y).abs() / bound).max()


def epilogue_bound(base, a, B, g, bias, s, r, dtype):
    """Elementwise error bound of `dora_epilogue_` against its fp64 value: ≤ 3 roundings to the
    dtype (addmm, mul, add), the fp32 r-term dot, g rounded to the dtype: `(4u + γ_r)` times
    `|g|·(|base| + s·|a|·|B|ᵀ) + |bias|`, 1.01 for second-order terms."""
    mag = base.double().abs()
    if r:
        mag = mag + s * a.double().abs() @ B.double().abs().t()
    bound_abs = (g.double().abs() if g is not None else 1) * mag + (bias.double().abs() if bias is not None else 0)
    return (4 * U[dtype] + gamma(max(r, 1))) * bound_abs * 1.01


@pytest.mark.parametrize("r", [3, 16])
def test_epilogue_triton_equals_reference_fp32(r):
    base, a, B, g, bias, s = epilogue_inputs(r, torch.float32)
    got, want = base.clone(), base.clone()
    IMPLS["triton"].dora_epilogue_(got, a, B, g, bias, s)
    reference.dora_epilogue_(want, a, B, g, bias, s)
    # each within epilogue_bound of the fp64 value (test_epilogue_forward_matches_fp64): 2x apart
    bound = 2 * epilogue_bound(base, a, B, g, bias, s, r, torch.float32)
    assert ((got.double() - want.double()).abs() <= bound).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("tokens", [T, 1, 200])
def test_epilogue_backward_matches_fp64_autograd(impl, with_bias, dtype, tokens):
    """dh and dm of `y = (m/n) ⊙ h + bias` against fp64 autograd, fed the same stored `y`."""
    _, _, _, _, bias, _ = epilogue_inputs(0, dtype, with_bias=with_bias, tokens=tokens)
    h = torch.randn(tokens, OUT, dtype=torch.float64, requires_grad=True)
    n = torch.rand(OUT, dtype=torch.float64) + 0.5
    m = (torch.rand(OUT, dtype=torch.float64) + 0.5).requires_grad_()
    dy = torch.randn(tokens, OUT).to(dtype)
    y64 = (m / n) * h + (bias.double() if bias is not None else 0)
    y64.backward(dy.double())
    g = (m / n).detach().float()
    y = y64.detach().to(dtype)                 # what the forward stored
    dh, total = getattr(IMPLS[impl], "dora_epilogue_backward")(dy, y, g, bias)
    assert dh.dtype == dtype and total.dtype == torch.float32
    # dh: one product rounded to the dtype (two for the reference, which rounds g first).
    assert ((dh.double() - h.grad).abs() <= 2.01 * U[dtype] * h.grad.abs()).all()
    # Σ_t dy ⊙ (y − bias) / m: y is the dtype-rounded output (|err| ≤ u·|y|), summed in fp32.
    dm = total.double() / m.detach()
    y_err = (dy.double().abs() * y64.detach().abs()).sum(0) * U[dtype] * 1.01
    unbiased = y.double() - (bias.double() if bias is not None else 0)
    sum_err = gamma(tokens + 1) * (dy.double().abs() * unbiased.abs()).sum(0)
    assert ((dm - m.grad).abs() <= (y_err + sum_err) / m.detach()).all()


def test_epilogue_backward_on_column_slices():
    """The backward reads column blocks of dy and y (strided views), as QDoRALinear calls it."""
    dy, y = torch.randn(T, 150), torch.randn(T, 150)
    g, bias = torch.rand(150), torch.randn(150)
    dh64 = dy[:, 64:128].double() * g[64:128].double()
    prod = dy[:, 64:128].double() * (y[:, 64:128].double() - bias[64:128].double())
    for impl in IMPLS.values():
        dh, total = impl.dora_epilogue_backward(dy[:, 64:128], y[:, 64:128], g[64:128], bias[64:128])
        # dh: one fp32 product (u); total: y − bias and the product round once each, then T terms
        # summed (Higham §3.1): γ_(T+1)·Σ_t |dy·(y − bias)|
        assert ((dh.double() - dh64).abs() <= U[torch.float32] * dh64.abs()).all()
        assert ((total.double() - prod.sum(0)).abs() <= gamma(T + 1) * prod.abs().sum(0)).all()


def test_triton_epilogue_rejects_a_strided_output():
    out = torch.randn(OUT, T).t()
    with pytest.raises(ValueError, match="unit column stride"):
        tk.dora_epilogue_(out, None, None, torch.rand(OUT), None, 1.0)


def test_nf4_weight_errors_name_the_problem():
    W = torch.randn(8, 64)
    packed, state = bnbF.quantize_4bit(W, blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type='fp4'"):
        ops.NF4Weight.from_quant_state(packed, state)
    w, _ = nf4_weight()
    with pytest.raises(ValueError, match="A has 5 columns"):
        w.norm_terms(torch.randn(2, 5))


# ---- one op interface: opcheck, dispatch, torch.compile ------------------------------------------

def _opcheck_cases():
    w, _ = nf4_weight(double_quant=True)
    wp, _ = nf4_weight(13, 96, double_quant=False)
    base, a, B, g, bias, s = epilogue_inputs(3, torch.float32)
    dy = torch.randn(T, OUT)
    return {
        "dequantize-double": (torch.ops.qdora.dequantize_nf4.default, (*w._args(), 5, 20, IN, torch.bfloat16)),
        "dequantize-plain": (torch.ops.qdora.dequantize_nf4.default, (*wp._args(), 3, 9, 96, torch.float32)),
        "norm-terms": (torch.ops.qdora.nf4_norm_terms.default, (*w._args(), 2, 40, IN, torch.randn(3, IN))),
        "norm-terms-no-A": (torch.ops.qdora.nf4_norm_terms.default, (*wp._args(), 0, 13, 96, None)),
        "epilogue": (torch.ops.qdora.dora_epilogue_.default, (base, a, B, g, bias, s)),
        "epilogue-lora": (torch.ops.qdora.dora_epilogue_.default, (base.clone(), a, B, None, None, s)),
        "epilogue-backward": (torch.ops.qdora.dora_epilogue_backward.default, (dy, base, g, bias)),
        "epilogue-backward-no-bias": (torch.ops.qdora.dora_epilogue_backward.default, (dy, base, g, None)),
    }


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case, device):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))


def test_cuda_dispatch_runs_triton_and_falls_back_to_the_reference(monkeypatch):
    """The CUDA kernel of each op is Triton when importable, else the reference (the dispatch
    logic, not the device, is under test: the implementations are replaced by recorders)."""
    calls = []
    for module in (tk, reference):
        monkeypatch.setattr(module, "dora_epilogue_", lambda *args, _m=module: calls.append(_m))
    base, a, B, g, bias, s = epilogue_inputs(3, torch.float32)
    kernel = ops._cuda_kernel("dora_epilogue_")
    kernel(base.clone(), a, B, g, bias, s)
    monkeypatch.setattr(ops, "triton_kernels", lambda: None)
    kernel(base.clone(), a, B, g, bias, s)
    assert calls == [tk, reference]


def test_ops_compile_fullgraph():
    """Every op traces (fake implementations) and runs inside one inductor graph."""
    w, W = nf4_weight()
    A = torch.randn(4, IN)
    x, dy = torch.randn(T, IN), torch.randn(T, OUT)

    def step(x, A, dy):
        W = torch.ops.qdora.dequantize_nf4(*w._args(), 0, OUT, IN, torch.float32)
        P, c = torch.ops.qdora.nf4_norm_terms(*w._args(), 0, OUT, IN, A)
        g = 1.0 / (c + P.pow(2).sum(1)).sqrt()
        z = x @ W.t()
        torch.ops.qdora.dora_epilogue_(z, x @ A.t(), P, g, None, 0.5)
        dh, total = torch.ops.qdora.dora_epilogue_backward(dy, z, g, None)
        return z, dh, total

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    # fp64 of the same formulas on the same dequantized W. Inductor's own code (g, the matmuls
    # around the ops) differs from eager by summation order and by the vector ISA it picks at run
    # time, so there is no sourced bound between the two: each is held to fp64 with FP32_TOL
    # (conftest: IN = 192 and T = 37 are within its derivation). A misplaced op (the in-place
    # epilogue skipped or applied twice) is off by O(1).
    W64, A64, x64, dy64 = W.double(), A.double(), x.double(), dy.double()
    P64 = W64 @ A64.t()
    g64 = 1.0 / (W64.pow(2).sum(1) + P64.pow(2).sum(1)).sqrt()
    z64 = (x64 @ W64.t() + 0.5 * (x64 @ A64.t()) @ P64.t()) * g64
    want = (z64, dy64 * g64, (dy64 * z64).sum(0))
    for label, outs in (("eager", step(x, A, dy)), ("compiled", compiled(x, A, dy))):
        for name, got, ref in zip(("z", "dh", "total"), outs, want):
            assert_close(got, ref, FP32_TOL, f"{label} {name}")


@pytest.mark.parametrize("norm", ["detached", "exact"])
def test_compiled_qdora_step_equals_eager(norm):
    base = linear4bit_from_linear(nn.Linear(IN, OUT, bias=True))
    layer = QDoRALinear(base, r=4, alpha=8, norm=norm, adapter_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.magnitude_delta.normal_(0, 0.1)
    x, dy = torch.randn(2, 19, IN), torch.randn(2, 19, OUT)

    def step(module):
        for p in layer.parameters():
            p.grad = None
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(dy)
        return [y.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude_delta.grad]

    eager = step(layer)
    compiled = step(torch.compile(layer, backend="inductor"))
    # Inductor fuses and reorders fp32 arithmetic (the NF4 scale products among them) and picks its
    # vector ISA at run time, so no bound between compiled and eager is sourced: each is held to
    # the fp64 oracle with FP32_TOL (conftest: in = 192, 38 tokens are within its derivation). A
    # graph that drops or repeats an op (the in-place epilogue, the exact norm's gradient) is O(1) off.
    y_ref, ref = oracle_step(layer, x, dy, exact=norm == "exact")
    want = (y_ref, ref["x"], ref["A"], ref["B"], ref["m"])
    for label, got in (("eager", eager), ("compiled", compiled)):
        for name, g, w in zip(("y", "dx", "dA", "dB", "dm"), got, want):
            assert_close(g, w, FP32_TOL, f"{label} {name}")


# ---- qdora bench kernels -------------------------------------------------------------------------

def test_bench_kernels_runs_end_to_end(tmp_path, capsys):
    from qdora.cli import main

    path = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--shapes", f"{IN}x{OUT}", "--tokens", str(T), "--r", "3", "--reps", "2",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for row in ("| dequantize | torch |", "| norm terms | torch |", "| epilogue | torch |", "| epilogue bwd | torch |",
                "copy bandwidth"):
        assert row in out
    (res,) = __import__("json").loads(path.read_text())
    assert res["copy_gbps"] > 0 and set(res["results"]) == {"dequantize", "norm terms", "epilogue", "epilogue bwd"}
    assert all(v["torch"]["ms"] > 0 and v["torch"]["bytes"] > 0 for v in res["results"].values())


def test_bench_kernels_triton_path_agrees_and_moves_fewer_bytes():
    """The CUDA path of the benchmark (Triton beside torch), on CPU under the interpreter."""
    from qdora.eval.bench.kernels import bench_shape

    device = torch.device("cpu" if tk._INTERPRETING else "cuda")
    res = bench_shape(IN, OUT, T, 3, torch.float32, device, reps=1, triton=True)
    for name, row in res["results"].items():
        # fp32 Triton vs torch, relative to the largest torch entry: IN = 192-term dots and T = 37-token
        # sums, within FP32_TOL's derivation (conftest)
        assert row["max_rel_diff"] <= FP32_TOL, (name, row["max_rel_diff"])
        assert row["triton"]["bytes"] <= row["torch"]["bytes"], name
    assert res["results"]["epilogue"]["torch"]["bytes"] > 2 * res["results"]["epilogue"]["triton"]["bytes"]


@pytest.mark.parametrize("argv", [["--shapes", "4096by4096"], ["--shapes", "0x64"], ["--r", "0"]])
def test_bench_kernels_rejects_bad_arguments(argv):
    from qdora.eval.bench.kernels import main

    with pytest.raises(SystemExit):
        main(argv)
