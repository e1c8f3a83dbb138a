"""`qdora bench layer`: one training step (forward + backward) of a single linear layer.

Four variants run on the same NF4 weight, the same input and the same output gradient:
ours (`qdora`, `qlora`) and PEFT's (`LoraConfig(use_dora=True)` and plain LoRA over the same
`bnb.nn.Linear4bit`). Steps are interleaved round-robin so machine noise hits all variants alike;
the figures are medians. Peak memory is the peak of tensor bytes allocated during one step
(weights, input and output gradient excluded: they are identical across variants), measured from
the PyTorch profiler's memory timeline (CPU) or the CUDA allocator.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from torch import nn

from qdora.core.layer import QDoRALinear
from qdora.core.nf4 import linear4bit_from_linear
from qdora.core.safetensors_io import write_text_atomic
from qdora.eval.bench.memory import peak_bytes, tensor_bytes
from qdora.options import Parser

DEFAULT_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (in, out): q/o, up/gate, down of Llama-3-8B


class _Holder(nn.Module):
    """A one-layer model so PEFT can wrap the layer by name."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def build_variants(in_f: int, out_f: int, r: int, alpha: float, device: str, peft: bool = True,
                   seed: int = 0) -> dict[str, nn.Module]:
    """Our qdora/qlora and PEFT's qdora/qlora over one shared NF4 weight, with equal A, B, m."""
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=False, device=device)
    base = linear4bit_from_linear(dense)
    del dense
    variants: dict[str, nn.Module] = {}
    ours_dora = QDoRALinear(base, r=r, alpha=alpha, dropout=0.0, use_dora=True, adapter_dtype=torch.float32)
    ours_lora = QDoRALinear(base, r=r, alpha=alpha, dropout=0.0, use_dora=False, adapter_dtype=torch.float32)
    with torch.no_grad():  # make the adapter matter, identically everywhere
        ours_dora.lora_B.normal_(0, 0.01)
        ours_dora.magnitude_delta.normal_(0, 0.01)
        ours_lora.lora_A.copy_(ours_dora.lora_A)
        ours_lora.lora_B.copy_(ours_dora.lora_B)
    variants["ours qdora"] = ours_dora
    variants["ours qlora"] = ours_lora
    if peft:
        from peft import LoraConfig, get_peft_model  # optional: only this path uses PEFT

        for use_dora in (True, False):
            holder = get_peft_model(_Holder(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                              target_modules=["proj"], use_dora=use_dora))
            layer = holder.base_model.model.proj
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(ours_dora.lora_A)
                layer.lora_B["default"].weight.copy_(ours_dora.lora_B)
                if use_dora:
                    layer.lora_magnitude_vector["default"].weight.copy_(ours_dora.magnitude)
            variants["peft qdora" if use_dora else "peft qlora"] = holder
    return variants


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    for p in module.parameters():
        p.grad = None
    x.grad = None
    y = module(x)
    y.backward(dy)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_shape(in_f: int, out_f: int, tokens: int, r: int, alpha: float, reps: int, device: str,
                peft: bool = True, memory: bool = True) -> dict:
    variants = build_variants(in_f, out_f, r, alpha, device, peft)
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(tokens, in_f, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(tokens, out_f, generator=g).to(device=device, dtype=dtype)
    results = {name: {"times": []} for name in variants}
    # Outputs agree before anything is timed: a benchmark of wrong code measures nothing.
    with torch.no_grad():
        ref = variants["ours qdora"](x)
        if "peft qdora" in variants:
            diff = (variants["peft qdora"](x) - ref).abs().max().item()
            results["peft qdora"]["max_abs_diff_vs_ours"] = diff
    for name, module in variants.items():  # warm-up
        _step(module, x, dy)
    for _ in range(reps):
        for name, module in variants.items():
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            _step(module, x, dy)
            _sync(device)
            results[name]["times"].append(time.perf_counter() - t0)
    for name, module in variants.items():
        res = results[name]
        res["median_s"] = statistics.median(res["times"])
        if memory:
            gc.collect()
            res["peak_step_bytes"] = peak_bytes(lambda: _step(module, x, dy), device)
            res["module_bytes"] = tensor_bytes(module)
    del variants
    gc.collect()
    return {"in": in_f, "out": out_f, "tokens": tokens, "r": r, "alpha": alpha, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "reps": reps, "results": results}


def ratios(res: dict) -> dict[str, float]:
    r = res["results"]
    out = {"ours qdora / ours qlora (time)": r["ours qdora"]["median_s"] / r["ours qlora"]["median_s"]}
    if "peak_step_bytes" in r["ours qdora"]:
        out["ours qdora / ours qlora (peak)"] = r["ours qdora"]["peak_step_bytes"] / r["ours qlora"]["peak_step_bytes"]
    if "peft qdora" in r:
        out["peft qdora / ours qdora (time)"] = r["peft qdora"]["median_s"] / r["ours qdora"]["median_s"]
        out["peft qlora / ours qlora (time)"] = r["peft qlora"]["median_s"] / r["ours qlora"]["median_s"]
        out["peft qdora / peft qlora (time)"] = r["peft qdora"]["median_s"] / r["peft qlora"]["median_s"]
        if "peak_step_bytes" in r["peft qdora"]:
            out["peft qdora / ours qdora (peak)"] = (r["peft qdora"]["peak_step_bytes"]
                                                     / r["ours qdora"]["peak_step_bytes"])
    return out


def format_markdown(all_results: list[dict]) -> str:
    lines = []
    for res in all_results:
        lines.append(f"\n**in={res['in']}, out={res['out']}, {res['tokens']} tokens, r={res['r']}, "
                     f"{res['dtype']} compute on {res['device']}, median of {res['reps']}**\n")
        lines.append("| variant | step (s) | peak step memory (MiB) | weights+adapter (MiB) |")
        lines.append("|---|---|---|---|")
        for name, v in res["results"].items():
            peak = f"{v['peak_step_bytes'] / 2**20:.1f}" if "peak_step_bytes" in v else "-"
            mod = f"{v['module_bytes'] / 2**20:.1f}" if "module_bytes" in v else "-"
            lines.append(f"| {name} | {v['median_s']:.3f} | {peak} | {mod} |")
        lines.append("")
        for k, v in ratios(res).items():
            lines.append(f"- {k}: **{v:.3f}**")
    return "\n".join(lines)


def parse_shapes(parser: argparse.ArgumentParser, text: str) -> list[tuple[int, int]]:
    """`--shapes IN x OUT,...` as `(in, out)` pairs; a malformed or empty size ends with `parser.error`."""
    shapes = []
    for item in text.split(","):
        try:
            i, o = (int(v) for v in item.lower().split("x"))
        except ValueError:
            parser.error(f"bad shape {item!r}: write IN x OUT, e.g. 4096x14336")
        if i <= 0 or o <= 0:
            parser.error(f"bad shape {item!r}: sizes must be positive")
        shapes.append((i, o))
    return shapes


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="qdora bench layer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in DEFAULT_SHAPES),
                   help="comma-separated IN x OUT shapes (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (default: %(default)s)")
    p.add_argument("--r", type=int, default=16, help="rank (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=32.0, help="alpha (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's variants")
    p.add_argument("--no-memory", action="store_true", help="skip the (slow, profiled) memory step")
    p.add_argument("--json", help="also write the raw results to this file")
    args = p.parse_args(argv)
    shapes = parse_shapes(p, args.shapes)
    if not args.no_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            p.error("PEFT is not installed: pip install peft (or pass --no-peft)")
    torch.set_grad_enabled(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", flush=True)
    all_results = []
    for i, o in shapes:
        print(f"benchmarking in={i} out={o} ...", flush=True)
        res = bench_shape(i, o, args.tokens, args.r, args.alpha, args.reps, args.device,
                          peft=not args.no_peft, memory=not args.no_memory)
        all_results.append(res)
        print(format_markdown([res]), flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps(all_results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
