"""`qdora bench kernels`: each kernel op of `qdora.kernels.ops`, timed against the unfused torch
sequence it replaces, with the bytes each must move and the machine's achievable bandwidth.

Per shape (`in × out` NF4 weight, blocksize 64, double quantization, `tokens`, rank `r`):

    dequantize      W0 → compute dtype            torch: bitsandbytes (absmax pass, then codes)
    norm terms      P = W0·Aᵀ, c = rowsum(W0²)    torch: dequantize to fp32, then W·Aᵀ and rowsum(W²)
    epilogue        y = g ⊙ (base + s·a·Bᵀ) + bias     torch: addmm_, mul_, add_
    epilogue bwd    dh = dy ⊙ g, Σ_t dy ⊙ (y − bias)    torch: mul, then casts, sub, mul, sum

On CUDA with Triton the op runs its Triton kernel ("triton") and "torch" is the reference
sequence (`qdora.kernels.reference`). Anywhere else the op *is* that reference: only "torch" rows.
Bytes are counted from the shapes, per torch op for the unfused sequence (every op reads its
inputs and writes its output once), and once for a fused kernel. "GB/s" is bytes / time;
"of peak" divides it by the bandwidth of a large device-to-device copy measured in the same run.
Outputs of the two versions are compared before anything is timed. CUDA timings are medians of
`triton.testing.do_bench` (L2 flushed between runs); CPU timings are medians of `--reps` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qdora.core.nf4 import quantize_nf4
from qdora.core.safetensors_io import write_text_atomic
from qdora.eval.bench.layer import parse_shapes
from qdora.kernels import ops, reference
from qdora.options import Parser

DEFAULT_SHAPES_CUDA = ((4096, 4096), (4096, 14336), (14336, 4096))  # (in, out): Llama-3-8B q/o, up, down
DEFAULT_SHAPES_CPU = ((4096, 4096),)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of `fn()`."""
    if device.type == "cuda":
        from triton.testing import do_bench  # optional: the kernels extra
        return float(do_bench(fn, warmup=25, rep=max(100, 10 * reps), return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def copy_bandwidth(device: torch.device, reps: int) -> float:
    """Achievable memory bandwidth in GB/s: a device-to-device copy (read + write) of 1 GiB on CUDA,
    256 MiB on CPU."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _bytes(*tensors_or_counts) -> int:
    return sum(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else int(t) for t in tensors_or_counts)


def bench_shape(in_f: int, out_f: int, tokens: int, r: int, dtype: torch.dtype, device: torch.device,
                reps: int, triton: bool | None = None) -> dict:
    """One shape. `triton`: also run the Triton kernels (default: on CUDA when importable; True on
    CPU needs TRITON_INTERPRET=1, which is how the tests check this path without a GPU)."""
    g_cpu = torch.Generator().manual_seed(0)
    W = torch.randn(out_f, in_f, generator=g_cpu).to(device)
    packed, state = quantize_nf4(W, blocksize=64, double_quant=True)
    del W
    w = ops.NF4Weight.from_quant_state(packed, state)
    nargs = w._args()
    n, es = out_f * in_f, torch.empty(0, dtype=dtype).element_size()
    nblocks = w.absmax.numel()
    A = (torch.randn(r, in_f, generator=g_cpu) / in_f ** 0.5).to(device, dtype)
    base = torch.randn(tokens, out_f, generator=g_cpu).to(device, dtype)
    a = torch.randn(tokens, r, generator=g_cpu).to(device, dtype)
    B = (0.01 * torch.randn(out_f, r, generator=g_cpu)).to(device, dtype)
    g = (0.9 + 0.1 * torch.rand(out_f, generator=g_cpu)).to(device)   # fp32, <= 1: repeated in-place runs stay finite
    bias = torch.randn(out_f, generator=g_cpu).to(device, dtype)
    dy = torch.randn(tokens, out_f, generator=g_cpu).to(device, dtype)
    tk = ops.triton_kernels() if (device.type == "cuda" if triton is None else triton) else None
    if triton and tk is None:
        raise ValueError("triton=True but Triton is not importable: pip install triton")
    impls = {"torch": reference} | ({"triton": tk} if tk is not None else {})

    packed_b = _bytes(w.packed, w.absmax, w.absmax_code, w.absmax_scale, 4)
    abs_pass = _bytes(w.absmax, w.absmax_scale, w.absmax_code, 4 * nblocks)  # bnb's absmax dequantization
    out_tn = tokens * out_f * es
    fp32_cast = 0 if es == 4 else tokens * out_f * (es + 4)                   # one .float() of a T × out tensor
    ops_table = {
        "dequantize": dict(
            run=lambda m: m.dequantize_nf4_rows(*nargs, 0, out_f, in_f, dtype),
            bytes={"triton": packed_b + n * es, "torch": abs_pass + packed_b + 4 * nblocks + n * es}),
        "norm terms": dict(
            run=lambda m: m.nf4_norm_terms(*nargs, 0, out_f, in_f, A),
            bytes={"triton": packed_b + _bytes(A) + 4 * out_f * (r + 1),
                   # dequantize to fp32, read W for W·Aᵀ and for W², write the W² temporary and read it
                   "torch": abs_pass + packed_b + 4 * nblocks + 4 * n + 4 * n + 4 * n + 8 * n
                   + _bytes(A) + 4 * out_f * (r + 1)}),
        "epilogue": dict(
            run=lambda m: m.dora_epilogue_(base, a, B, g, bias, 0.5),
            bytes={"triton": 2 * out_tn + _bytes(a, B, g, bias),
                   "torch": 3 * 2 * out_tn + _bytes(a, B, g, bias)}),
        "epilogue bwd": dict(
            run=lambda m: m.dora_epilogue_backward(dy, base, g, bias),
            bytes={"triton": 3 * out_tn + _bytes(g, bias) + 4 * out_f,
                   # dh = dy·g; dy.float(), y.float(); y − bias; dy·(y − bias); sum
                   "torch": 2 * out_tn + 2 * fp32_cast + 8 * tokens * out_f + 12 * tokens * out_f
                   + 4 * tokens * out_f + _bytes(g, bias) + 4 * out_f}),
    }
    results = {}
    for name, op in ops_table.items():
        outs = {}
        for impl, module in impls.items():
            if name == "epilogue":
                saved = base.clone()
                op["run"](module)
                outs[impl] = base.clone()
                base.copy_(saved)
            else:
                outs[impl] = op["run"](module)
        row = {}
        if "triton" in outs:
            got, want = outs["triton"], outs["torch"]
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            row["max_rel_diff"] = max(((x.double() - y.double()).abs().max()
                                       / y.double().abs().max().clamp_min(1e-30)).item()
                                      for x, y in zip(got, want))
        del outs
        saved = base.clone() if name == "epilogue" else None
        for impl, module in impls.items():
            ms = time_ms(lambda: op["run"](module), device, reps)
            nbytes = op["bytes"][impl]
            row[impl] = {"ms": ms, "bytes": nbytes, "gbps": nbytes / (ms * 1e-3) / 1e9}
        if saved is not None:
            base.copy_(saved)
        results[name] = row
    return {"in": in_f, "out": out_f, "tokens": tokens, "r": r, "dtype": str(dtype).removeprefix("torch."),
            "device": str(device), "results": results}


def format_markdown(res: dict, peak_gbps: float) -> str:
    lines = [f"\n**NF4 {res['out']}×{res['in']} (blocksize 64, double quant), {res['tokens']} tokens, "
             f"r={res['r']}, {res['dtype']} on {res['device']}; copy bandwidth {peak_gbps:.3g} GB/s**\n",
             "| op | impl | time (ms) | bytes moved (MiB) | GB/s | of peak | torch / triton (time) |",
             "|---|---|---|---|---|---|---|"]
    for name, row in res["results"].items():
        for impl in ("torch", "triton"):
            if impl not in row:
                continue
            v = row[impl]
            speed = f"**{row['torch']['ms'] / v['ms']:.2f}**" if impl == "triton" else ""
            lines.append(f"| {name} | {impl} | {v['ms']:.3f} | {v['bytes'] / 2**20:.1f} | {v['gbps']:.3g} | "
                         f"{v['gbps'] / peak_gbps:.0%} | {speed} |")
    diffs = {k: v["max_rel_diff"] for k, v in res["results"].items() if "max_rel_diff" in v}
    if diffs:
        lines.append("\nmax |triton − torch| / max |torch|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = Parser(prog="qdora bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = DEFAULT_SHAPES_CUDA if cuda else DEFAULT_SHAPES_CPU
    p.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in shapes),
                   help="comma-separated IN x OUT shapes (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens (default: %(default)s)")
    p.add_argument("--r", type=int, default=16, help="rank (default: %(default)s)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16" if cuda else "float32",
                   help="compute dtype (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed runs per op on CPU (default: %(default)s)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--json", help="also write the raw results to this file")
    args = p.parse_args(argv)
    shapes = parse_shapes(p, args.shapes)
    if args.r < 1 or args.tokens < 1 or args.reps < 1:
        p.error(f"--r, --tokens and --reps must be >= 1 (got {args.r}, {args.tokens}, {args.reps})")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    kind = "Triton" if device.type == "cuda" and ops.triton_kernels() is not None else "reference (plain torch)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, ops run the {kind} "
          f"implementation", flush=True)
    peak = copy_bandwidth(device, args.reps)
    all_results = []
    for i, o in shapes:
        res = bench_shape(i, o, args.tokens, args.r, dtype, device, args.reps)
        res["copy_gbps"] = peak
        all_results.append(res)
        print(format_markdown(res, peak), flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps(all_results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
