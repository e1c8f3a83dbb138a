"""One mixture-of-experts layer: QDoRA against QLoRA on the same NF4 experts, and dequantizing only
the routed experts against dequantizing every expert.

    python -m qdora.eval.bench.moe_speed [--experts 8,32,64,128] [--hidden 512] [--intermediate 256]
        [--tokens 512] [--top-k K] [--r 16] [--reps 5] [--device cpu|cuda] [--quick] [--json PATH]

One `QDoRAExperts` layer (E experts, each a gate_up `(2I × H)` and a down `(H × I)` NF4 projection,
SiLU gate) and T tokens routed top-k by random router logits (softmax over the k chosen), per E:

(a) a training step (forward + backward, the input requiring grad) with QDoRA and with QLoRA
    adapters (rank r on both projections of every expert) over the same NF4 experts with equal `A`
    and `B`; median of `--reps` steps after a warm-up, the variants interleaved. Peak step memory is
    the peak of tensor bytes allocated during one step (`qdora.eval.bench.memory.peak_bytes`: the
    profiler's memory timeline on CPU, the CUDA allocator on CUDA); weights, input and output
    gradient are excluded (the same for both). "adapter" is the bytes of the trainable tensors.
(b) a no-grad forward of the frozen NF4 experts (no adapters) as `QDoRAExperts` runs it, where only
    the experts the batch routes tokens to are dequantized, against the same forward after first
    dequantizing every expert's weight (`RowBlocks.dequantize`, kept as a list: a lower bound for an
    implementation that dequantizes the whole 3-D tensor and then runs a grouped matmul); the
    dequantization alone is timed too. The two forwards' outputs are compared before timing.

fp32 compute on CPU (bf16 matmuls are slow on most CPUs), bf16 on CUDA. Router logits are i.i.d.
normal, so routing is close to uniform: with T·k ≫ E every expert gets tokens and (b) can only show
the cost of the routing bookkeeping; real routers are skewed. Timings move between runs on a
shared machine; the ratios within one run are what the benchmark is for.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qdora.core.experts import QDoRAExperts
from qdora.core.layer import QDoRALinear
from qdora.core.nf4 import RowBlocks, linear4bit_from_weight
from qdora.core.safetensors_io import write_text_atomic
from qdora.eval.bench.memory import peak_bytes, tensor_bytes
from qdora.options import Parser

DEFAULTS = {"experts": "8,32,64,128", "hidden": 512, "intermediate": 256, "tokens": 512, "reps": 5}
QUICK = {"experts": "8,32", "hidden": 256, "intermediate": 128, "tokens": 128, "reps": 3}
"""`--quick`: small enough to finish in well under a minute on two CPU cores."""

NF4_BLOCK = 64
"""The NF4 blocksize (double-quantized absmax, as qdora's loader quantizes)."""
STEP_VARIANTS = ("qdora", "qlora")
FORWARD_VARIANTS = ("routed only", "dequantize all", "dequantize alone")


def machine_line(device: str) -> str:
    """The CPU's model name (`lscpu`), torch's version and threads, the device and the load average."""
    cpu = "unknown CPU"
    try:
        found = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in found.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    line = f"{cpu} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.device(device).type == "cuda":
        line += f", {torch.cuda.get_device_name(device)}"
    try:
        line += f", load average {os.getloadavg()[0]:.2f} at the start"
    except OSError:
        pass
    return line


def default_top_k(experts: int) -> int:
    """k = 2 for 8 experts or fewer (Mixtral), else 8 (Qwen3-MoE, OLMoE); never more than E."""
    return min(experts, 2 if experts <= 8 else 8)


def nf4_experts(experts: int, hidden: int, inter: int, device: str, dtype: torch.dtype,
                seed: int = 0) -> QDoRAExperts:
    """A frozen experts layer of NF4 projections (double-quantized, `NF4_BLOCK` values a block)."""
    g = torch.Generator().manual_seed(seed)

    def layer(out_f: int, in_f: int) -> nn.Module:
        weight = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
        return linear4bit_from_weight(weight.to(device=device, dtype=dtype), None, NF4_BLOCK, True, "uint8")

    gate_up = [layer(2 * inter, hidden) for _ in range(experts)]
    down = [layer(hidden, inter) for _ in range(experts)]
    return QDoRAExperts(gate_up, down, nn.SiLU(), "benchmark")


def adapted(frozen: QDoRAExperts, r: int, alpha: float, seed: int = 0) -> dict[str, QDoRAExperts]:
    """QDoRA and QLoRA over `frozen`'s NF4 projections (shared, not copied), with equal `A` and `B`
    (`B` and the magnitude offsets nonzero, so that the adapters change the output)."""
    torch.manual_seed(seed)
    layers = {name: {"gate_up": [], "down": []} for name in STEP_VARIANTS}
    for proj, modules in (("gate_up", frozen.gate_up_proj), ("down", frozen.down_proj)):
        for base in modules:
            dora = QDoRALinear(base, r=r, alpha=alpha, use_dora=True, adapter_dtype=torch.float32)
            lora = QDoRALinear(base, r=r, alpha=alpha, use_dora=False, adapter_dtype=torch.float32)
            with torch.no_grad():
                dora.lora_B.normal_(0, 0.01)
                dora.magnitude_delta.normal_(0, 0.01)
                lora.lora_A.copy_(dora.lora_A)
                lora.lora_B.copy_(dora.lora_B)
            layers["qdora"][proj].append(dora)
            layers["qlora"][proj].append(lora)
    return {name: QDoRAExperts(v["gate_up"], v["down"], nn.SiLU(), "benchmark").train()
            for name, v in layers.items()}


def route(tokens: int, experts: int, k: int, device: str, dtype: torch.dtype,
          seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`(top_k_index (T, k), top_k_weights (T, k))` from i.i.d. normal router logits."""
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))
    top = logits.topk(k, dim=-1)
    return top.indices.to(device), top.values.softmax(-1).to(device=device, dtype=dtype)


def dense_forward(experts: QDoRAExperts, readers: tuple[list[RowBlocks], list[RowBlocks]], x: torch.Tensor,
                  index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`experts`' forward after dequantizing every expert's weights, routed tokens or not."""
    gate_up = [r.dequantize(x.dtype) for r in readers[0]]
    down = [r.dequantize(x.dtype) for r in readers[1]]
    out = torch.zeros_like(x)
    routed, token, slot, bounds = experts.routed(index)
    for i, e in enumerate(routed):
        tok, pos = token[bounds[i]:bounds[i + 1]], slot[bounds[i]:bounds[i + 1]]
        gate, up = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        h = F.linear(experts.act_fn(gate) * up, down[e]) * weights[tok, pos, None]
        out.index_add_(0, tok, h.to(out.dtype))
    return out


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timings(work: dict[str, Callable[[], object]], reps: int, device: str) -> dict[str, list[float]]:
    """Seconds of each piece of work, `reps` runs after one warm-up, the pieces interleaved."""
    for fn in work.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(reps):
        for name, fn in work.items():
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def bench_experts(experts: int, hidden: int, inter: int, tokens: int, k: int, r: int, alpha: float, reps: int,
                  device: str, memory: bool = True) -> dict:
    """(a) and (b) for one layer of `experts` experts; the figures as a dict (seconds, bytes)."""
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    frozen = nf4_experts(experts, hidden, inter, device, dtype)
    variants = adapted(frozen, r, alpha)
    index, weights = route(tokens, experts, k, device, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype)
    readers = ([RowBlocks(m, 1024) for m in frozen.gate_up_proj], [RowBlocks(m, 1024) for m in frozen.down_proj])
    routed = len(frozen.routed(index)[0])

    def step(module: QDoRAExperts) -> Callable[[], None]:
        def run() -> None:
            for p in module.parameters():
                p.grad = None
            x.grad = None
            module(x, index, weights).backward(dy)
        return run

    def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            with torch.no_grad():
                return fn()
        return run

    forwards = {"routed only": no_grad(lambda: frozen(x, index, weights)),
                "dequantize all": no_grad(lambda: dense_forward(frozen, readers, x, index, weights)),
                "dequantize alone": no_grad(lambda: ([r.dequantize(dtype) for r in readers[0]],
                                                     [r.dequantize(dtype) for r in readers[1]]))}
    # The two forwards agree before anything is timed: a benchmark of wrong code measures nothing.
    want, got = forwards["routed only"](), forwards["dequantize all"]()
    diff = (want - got).abs().max().item() / max(want.abs().max().item(), 1e-30)
    if not diff <= 1e-2:
        raise RuntimeError(f"E={experts}: the dequantize-all forward differs from QDoRAExperts' by {diff:.3g}")
    result = {"experts": experts, "top_k": k, "routed": routed, "hidden": hidden, "intermediate": inter,
              "tokens": tokens, "r": r, "reps": reps, "device": device, "dtype": str(dtype).removeprefix("torch."),
              "forward_max_rel_diff": diff, "nf4_bytes": tensor_bytes(frozen),
              "adapter_bytes": {name: sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
                                for name, m in variants.items()}}
    for key, work in (("step", {name: step(m) for name, m in variants.items()}), ("forward", forwards)):
        result[f"{key}_times_s"] = timings(work, reps, device)
        result[f"{key}_s"] = {name: statistics.median(v) for name, v in result[f"{key}_times_s"].items()}
    if memory:
        gc.collect()
        result["step_peak_bytes"] = {name: peak_bytes(step(m), device) for name, m in variants.items()}
        result["forward_peak_bytes"] = {name: peak_bytes(forwards[name], device) for name in FORWARD_VARIANTS[:2]}
    return result


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def format_tables(results: list[dict]) -> str:
    """The two markdown tables: (a) the training steps, (b) the forwards."""
    first = results[0]
    lines = [f"\n(a) forward + backward, QDoRA and QLoRA r={first['r']} on both projections of every expert; "
             f"H={first['hidden']}, I={first['intermediate']}, T={first['tokens']}, {first['dtype']} compute on "
             f"{first['device']}, median of {first['reps']}\n",
             "| E | k | experts routed | qdora step (ms) | qlora step (ms) | qdora / qlora | qdora peak (MiB) "
             "| qlora peak (MiB) | adapter qdora / qlora (MiB) | NF4 experts (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        t, peak = res["step_s"], res.get("step_peak_bytes", {})
        lines.append(f"| {res['experts']} | {res['top_k']} | {res['routed']} | {t['qdora'] * 1e3:.1f} "
                     f"| {t['qlora'] * 1e3:.1f} | {t['qdora'] / t['qlora']:.3f} | {mib(peak.get('qdora'))} "
                     f"| {mib(peak.get('qlora'))} | {mib(res['adapter_bytes']['qdora'])} / "
                     f"{mib(res['adapter_bytes']['qlora'])} | {mib(res['nf4_bytes'])} |")
    lines += ["\n(b) no-grad forward of the frozen NF4 experts: only the routed experts dequantized "
              "(QDoRAExperts) against every expert dequantized first\n",
              "| E | k | experts routed | routed only (ms) | dequantize all (ms) | of which dequantizing (ms) "
              "| dequantize all / routed only | routed only peak (MiB) | dequantize all peak (MiB) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        t, peak = res["forward_s"], res.get("forward_peak_bytes", {})
        lines.append(f"| {res['experts']} | {res['top_k']} | {res['routed']} | {t['routed only'] * 1e3:.1f} "
                     f"| {t['dequantize all'] * 1e3:.1f} | {t['dequantize alone'] * 1e3:.1f} "
                     f"| {t['dequantize all'] / t['routed only']:.3f} | {mib(peak.get('routed only'))} "
                     f"| {mib(peak.get('dequantize all'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m qdora.eval.bench.moe_speed", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", help=f"comma-separated expert counts E (default: {DEFAULTS['experts']})")
    p.add_argument("--hidden", type=int, help=f"hidden size H (default: {DEFAULTS['hidden']})")
    p.add_argument("--intermediate", type=int,
                   help=f"expert intermediate size I (default: {DEFAULTS['intermediate']})")
    p.add_argument("--tokens", type=int, help=f"tokens T per step (default: {DEFAULTS['tokens']})")
    p.add_argument("--top-k", type=int, default=0,
                   help="experts per token (default: 2 for E <= 8, else 8; at most E)")
    p.add_argument("--r", type=int, default=16, help="adapter rank (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=32.0, help="adapter alpha (default: %(default)s)")
    p.add_argument("--reps", type=int, help=f"timed repeats per variant (default: {DEFAULTS['reps']})")
    p.add_argument("--device", default="cpu", help="cpu (fp32 compute) or cuda (bf16) (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--quick", action="store_true",
                   help=f"a small run: {', '.join(f'--{k} {v}' for k, v in QUICK.items())} (explicit options win)")
    p.add_argument("--no-memory", action="store_true", help="skip the (profiled, slower) peak-memory runs")
    p.add_argument("--json", help="also write the raw results to this file")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        counts = [int(e) for e in str(args.experts).split(",") if e.strip()]
    except ValueError:
        p.error(f"--experts {args.experts!r}: write comma-separated integers, e.g. 8,32,64")
    for name in ("hidden", "intermediate", "tokens", "r", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be at least 1")
    if args.hidden % NF4_BLOCK or args.intermediate % NF4_BLOCK:
        p.error(f"--hidden {args.hidden}, --intermediate {args.intermediate}: must be multiples of {NF4_BLOCK} (the "
                "NF4 blocksize): bitsandbytes' own forward of a frozen NF4 layer whose rows are not whole blocks is "
                "wrong on CPU (bitsandbytes 0.50.2), so 'routed only' would time a wrong result")
    if not counts or min(counts) < 1 or args.top_k < 0 or args.top_k > min(counts) or args.threads < 0:
        p.error(f"need E >= 1 and 0 <= --top-k <= E and --threads >= 0 (got E={counts}, --top-k {args.top_k}, "
                f"--threads {args.threads})")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)
    print(machine_line(args.device), flush=True)
    results = []
    for e in counts:
        k = args.top_k or default_top_k(e)
        print(f"E={e}, k={k} ...", flush=True)
        results.append(bench_experts(e, args.hidden, args.intermediate, args.tokens, k, args.r, args.alpha,
                                     args.reps, args.device, memory=not args.no_memory))
        gc.collect()  # the layer just measured goes before the next is built
    print(format_tables(results), flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps({"machine": machine_line(args.device), "results": results},
                                                indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
