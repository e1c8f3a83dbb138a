"""`qdora bench step`: one full training step of a whole model against its matmul-only lower bound,
and where the rest of the time goes.

A step is what `qdora train` does per optimizer step: forward, backward, gradient clipping (1.0),
AdamW (lr 2e-4), `zero_grad`, with gradient checkpointing on (transformers' non-reentrant
checkpointing of each decoder layer: every linear runs forward twice, backward once). Variants,
built once and stepped round-robin on the same batch so machine noise hits them alike (medians,
first step dropped):

- `ours qdora`, `ours qlora`: `qdora.load_model(..., method=...)`, NF4 base, fp32 adapters.
- `peft qdora`: PEFT `LoraConfig(use_dora=True)` over the same NF4 base.
- `bound`: the **matmul-only lower bound**. Every NF4 linear is dequantized once into a plain
  frozen fp32 `nn.Linear` (same values the NF4 variants compute with); each target module gets a
  LoRA update computed as `y = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ` with one `addmm` (no dropout, no norm, no
  magnitude, no casts). So the bound runs exactly the base and adapter matmuls every QDoRA
  implementation must run (forward, checkpoint recompute, dx and dA/dB in backward) plus the
  parts of the model that are not adapter layers (attention, RMSNorm, MLP activation, embedding,
  loss), which are the same code in every variant. Its trainable tensors are `A`, `B` of the same
  shapes; it has no magnitude vector (`out` values per layer, 2.7% of SmolLM2's adapter
  parameters: a negligible share of AdamW's time). What a QDoRA step spends above the bound is
  dequantization, dropout, the norm and the magnitude epilogue, casts, copies and Python.

Dropout (`--dropout`, default 0.05 as `qdora train`) applies to ours and PEFT's adapter input; the
bound has none (a mask is not a matmul). PEFT's DoRA with dropout > 0 runs one more base pass.

`--profile` adds a torch.profiler breakdown of one step of `ours qdora` and `bound` (self time of
every op, grouped; the profiler's stack tracing inflates the Python row most). `--components`
times the step's non-matmul pieces alone, the old and the new way side by side.

Dequantizations per step (each NF4 linear, adapted or frozen): three passes over its row blocks —
forward, the recompute under gradient checkpointing, and the `dx` pass of the backward. Each
needs `W0` and nothing dequantized is kept between them (keeping one decoder layer's weights from
the recompute to the backward would cost `layer params × 4` bytes, e.g. 0.9 GB on Llama-3-8B), so
three is the minimum; the norm's `W0·Aᵀ` rides along the forward and recompute passes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict

import bitsandbytes as bnb
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from qdora.core.config import AdapterConfig
from qdora.core.dropout import Dropout
from qdora.core.nf4 import RowBlocks, linear4bit_from_linear
from qdora.eval.common import benchmark_model, demo_batch, peft_on_qdora_nf4
from qdora.kernels.nf4 import dequantize_nf4_reference
from qdora.kernels.reference import absmax_fp32
from qdora.models.loading import load_model
from qdora.models.surgery import matches
from qdora.options import Parser
from qdora.train.loop import prepare_for_training

VARIANTS = ("ours qdora", "ours qlora", "peft qdora", "peft qlora", "bound")
DEFAULT = ("ours qdora", "ours qlora", "peft qdora", "bound")
MODEL = ("ours qdora", "ours qlora", "peft qdora", "peft qlora")
"""`qdora bench model`: ours against PEFT's, both methods, no bound."""


class DenseLoRA(nn.Module):
    """Frozen fp32 `W0` plus a LoRA update, matmuls only: `addmm(x·W0ᵀ, x·Aᵀ, Bᵀ, alpha=s)`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base_layer = base
        A = torch.empty(r, base.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A = nn.Parameter(A)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(torch.nn.functional.linear(x2, self.base_layer.weight, self.base_layer.bias),
                        x2 @ self.lora_A.t(), self.lora_B.t(), alpha=self.scaling)
        return y.view(*x.shape[:-1], y.shape[-1])


def bound_model(path: str, cfg, device: str = "cpu"):
    """The lower-bound model: NF4 linears dequantized to frozen fp32 `nn.Linear`, LoRA on targets."""

    model, tok = load_model(path, method="qlora", cfg=cfg.replace(method="qlora"), add=False, progress=False,
                            device=device)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=device)
        with torch.no_grad():
            dense.weight.copy_(RowBlocks(mod, 1 << 30).dequantize(torch.float32))
            if mod.bias is not None:
                dense.bias.copy_(mod.bias.float())
        dense.requires_grad_(False)
        layer = DenseLoRA(dense, cfg.r, cfg.alpha) if any(matches(name, p) for p in cfg.target_modules) else dense
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model, tok


def build(name: str, path: str, r: int, dropout: float, device: str = "cpu"):
    method = "qlora" if name == "bound" else name.split()[1]
    cfg = AdapterConfig(method=method, r=r, alpha=2 * r, dropout=dropout, adapter_dtype="float32")
    if name.startswith("ours"):
        model, tok = load_model(path, method=method, cfg=cfg, progress=False, device=device)
    elif name == "bound":
        model, tok = bound_model(path, cfg, device)
    else:
        model, tok = peft_on_qdora_nf4(path, r, 2 * r, dropout, method == "qdora", cfg.target_modules, device)
    prepare_for_training(model)
    return model, tok


def make_step(model, batch, fused: bool = True):
    """One `qdora train` optimizer step (forward, backward, clip 1.0, fused AdamW 2e-4, zero_grad),
    or with `fused=False` the per-tensor AdamW and clipping loops torch uses by default on CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=fused)

    def step():
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=fused)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if params[0].is_cuda:  # the step's kernels finish before it is timed
            torch.cuda.synchronize()
    return step


# ---- profile breakdown --------------------------------------------------------------------------

GROUPS = ("matmuls", "NF4 dequantize", "norm terms & DoRA epilogue", "dropout", "casts/copies/fills",
          "attention (sdpa)", "elementwise", "optimizer", "other ops", "Python & framework")
_MATMUL = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul",
           "aten::linear"}
_COPY = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat",
         "aten::stack", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::zeros",
         "aten::zeros_like", "aten::zero_", "aten::fill_", "aten::ones_like", "aten::new_empty",
         "aten::new_zeros", "aten::resize_", "aten::as_strided_"}
_DROPOUT = ("aten::bernoulli_", "aten::native_dropout", "aten::dropout", "aten::native_dropout_backward",
            "NativeDropoutBackward", "): dropout", "qdora/core/dropout.py", "_MaskedScale")
_OTHER = {"aten::embedding", "aten::embedding_backward", "aten::embedding_dense_backward",
          "aten::log_softmax", "aten::_log_softmax", "aten::nll_loss_forward", "aten::nll_loss_backward",
          "aten::_log_softmax_backward_data", "aten::index", "aten::index_put_", "aten::nonzero",
          "aten::item", "aten::_local_scalar_dense", "aten::index_select", "aten::scatter_"}


def classify(evt) -> str | None:
    """The group of one op event from its name and its ancestors' names (with `with_stack`, the
    ancestors include the Python frames, e.g. `qdora/core/function.py(150): backward`). None for
    events that are not ops, or that lie inside an op counted whole (see `breakdown`)."""
    chain = []
    e = evt.cpu_parent
    while e is not None:
        if e.name.startswith("bitsandbytes::"):
            return None          # inside a bitsandbytes op: counted with it
        chain.append(e.name)
        e = e.cpu_parent
    name = evt.name
    if not (name.startswith("aten::") or name.startswith("bitsandbytes::")):
        return None
    text = "\n".join([name] + chain)
    if "torch/profiler/" in text or "torch/autograd/profiler" in text:
        return None
    if "Optimizer." in text or "torch/optim/" in text or "clip_grad" in text:
        return "optimizer"
    if "qdora::nf4_norm_terms" in text or "qdora::dora_epilogue" in text:
        return "norm terms & DoRA epilogue"
    if "dequantize" in text or "qdora/core/nf4.py" in text or "kernels/nf4.py" in text:
        return "NF4 dequantize"
    if any(k in text for k in _DROPOUT):
        return "dropout"
    if "scaled_dot_product" in text:
        return "attention (sdpa)"
    if name in _MATMUL:
        return "matmuls"
    if name in _COPY:
        return "casts/copies/fills"
    if "qdora/core/function.py" in text or "qdora/core/layer.py" in text:
        return "norm terms & DoRA epilogue"
    if name in _OTHER:
        return "other ops"
    return "elementwise"


def breakdown(step) -> tuple[dict[str, float], float]:
    """Milliseconds per group for one call of `step`, and the step's wall time under the profiler.

    An op's self time counts in its group; a bitsandbytes op counts whole (its CPU kernel is a
    Python function calling C, which the profiler sees as Python, not as an op). The rest of the
    wall time is Python and framework overhead (inflated by the profiler's stack tracing)."""

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        t0 = time.perf_counter()
        step()
        wall = (time.perf_counter() - t0) * 1e3
    groups: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        group = classify(evt)
        if group is not None:
            whole = evt.name.startswith("bitsandbytes::")
            groups[group] += (evt.cpu_time_total if whole else evt.self_cpu_time_total) / 1e3
    groups["Python & framework"] = max(0.0, wall - sum(groups.values()))
    return groups, wall


def _timed(fns: dict, reps: int) -> dict[str, tuple[float, float]]:
    """Round-robin calls of each function; (min, median) milliseconds."""
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (min(v), statistics.median(v)) for k, v in ts.items()}


def components(tokens: int, r: int, reps: int = 50) -> None:
    """The step's non-matmul pieces, old and new way side by side, at SmolLM2's shapes."""

    rows = []
    for width in (576, 1536):
        x = torch.randn(tokens, width, requires_grad=True)
        dy = torch.randn(tokens, width)
        fns = {}
        for label, mod in (("nn.Dropout", nn.Dropout(0.05)), ("qdora Dropout", Dropout(0.05))):
            fns[f"dropout fwd ({tokens}x{width}), {label}"] = lambda m=mod: m(x)
            fns[f"dropout fwd+bwd ({tokens}x{width}), {label}"] = lambda m=mod: m(x).backward(dy)
        rows.append(_timed(fns, reps))
    shapes = [(576, 576), (192, 576), (192, 576), (1536, 576), (576, 1536)] * 30  # SmolLM2 targets
    params = [nn.Parameter(torch.randn(*s)) for o, i in shapes for s in ((r, i), (o, r), (o,))]
    for q in params:
        q.grad = torch.randn_like(q)
    loop, fused = torch.optim.AdamW(params, lr=1e-12), torch.optim.AdamW(params, lr=1e-12, fused=True)
    rows.append(_timed({f"AdamW, {len(params)} adapter tensors, per-tensor loop": loop.step,
                        f"AdamW, {len(params)} adapter tensors, fused": fused.step,
                        "clip_grad_norm_, loop": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=False),
                        "clip_grad_norm_, foreach": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)},
                       max(5, reps // 5)))
    blocks = RowBlocks(linear4bit_from_linear(nn.Linear(576, 1536, bias=False)), 1024)
    w = blocks.nf4
    nb = 1024 * 576 // w.blocksize
    absmax_args = (w.absmax, w.absmax_code, w.absmax_scale, w.absmax_offset, w.absmax_blocksize, 0, nb)
    absmax = absmax_fp32(*absmax_args)

    def absmax_by_index():  # the formula absmax_fp32 used before: one index per NF4 block
        scale = w.absmax_scale.float()[torch.arange(0, nb) // w.absmax_blocksize]
        return w.absmax_code.float()[w.absmax[:nb].long()] * scale + w.absmax_offset.float()

    rows.append(_timed({"NF4 row block 1024x576, bitsandbytes kernel (RowBlocks.rows)":
                        lambda: blocks.rows(0, 1024, torch.float32),
                        "NF4 row block 1024x576, plain torch reference": lambda: dequantize_nf4_reference(
                            w.packed[: 1024 * 576 // 2], absmax, w.blocksize, 1024 * 576),
                        "  its double-quantized absmax, indexed per block (before)": absmax_by_index,
                        "  its double-quantized absmax, repeat_interleave (now)": lambda: absmax_fp32(*absmax_args)},
                       reps))
    print("\nComponents (ms, min / median of round-robin calls):\n\n| piece | min | median |\n|---|---|---|")
    for table in rows:
        for k, (lo, med) in table.items():
            print(f"| {k} | {lo:.3f} | {med:.3f} |")


def _print_times(wall: dict[str, list[float]], cpu: dict[str, list[float]], tokens: int, args) -> None:
    """The table of median wall and CPU seconds per variant (first step dropped), and the ratios."""
    threads = torch.get_num_threads()
    print(f"{tokens} tokens per step (batch {args.batch_size} x cutoff {args.cutoff_len}), r={args.r}, "
          f"dropout {args.dropout}, gradient checkpointing, fused AdamW; {threads} thread(s), "
          f"median of {args.reps}\n")
    # CPU time of the process: with one thread it is the step's own work, not the time other
    # programs held the cores (wall time on a shared machine counts both).
    columns = {"wall": {k: statistics.median(v[1:]) for k, v in wall.items()},
               "CPU": {k: statistics.median(v[1:]) for k, v in cpu.items()}}
    print("| variant | wall (s) | tokens/s | wall / bound | CPU (s) | CPU / bound |\n|---|---|---|---|---|---|")
    for k in wall:
        cells = []
        for label, med in columns.items():
            b = med.get("bound")
            cells += [f"{med[k]:.3f}"] + ([f"{tokens / med[k]:.0f}"] if label == "wall" else [])
            cells += [f"{med[k] / b:.3f}" if b else "-"]
        print(f"| {k} | " + " | ".join(cells) + " |")
    print()
    ratios = (("ours qdora", "ours qlora"), ("peft qdora", "ours qdora"), ("peft qlora", "ours qlora"),
              ("peft qdora", "peft qlora"))
    for label, med in columns.items():
        for a, b in ratios:
            if a in med and b in med:
                print(f"- {label}: {a} / {b}: {med[a] / med[b]:.3f}")



def main(argv: list[str] | None = None, prog: str = "qdora bench step", variants=DEFAULT) -> int:
    p = Parser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant (default: %(default)s)")
    p.add_argument("--variants", default=",".join(variants),
                   help="comma-separated, from: " + ", ".join(VARIANTS) + " (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: %(default)s)")
    p.add_argument("--profile", action="store_true", help="also print the profiler breakdown")
    p.add_argument("--components", action="store_true",
                   help="only time the step's non-matmul pieces (dropout, AdamW, NF4 dequantize), old and new way")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default: torch's choice); 1 is steadier on a shared machine")
    args = p.parse_args(argv)
    if args.threads < 0:
        raise ValueError(f"--threads={args.threads} must be >= 0 (0: torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise ValueError(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")

    if args.components:
        components(args.batch_size * 108, args.r)   # 108: mean tokens per example of the default batch
        return 0

    path = benchmark_model(args.model)
    tok = None
    models = {}
    for name in names:
        models[name], tok = build(name, path, args.r, args.dropout, args.device)
    batch = {k: v.to(args.device) for k, v in demo_batch(tok, args.batch_size, args.cutoff_len).items()}
    steps = {name: make_step(model, batch) for name, model in models.items()}
    tokens = int(batch["attention_mask"].sum())
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.reps + 1):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    _print_times(wall, cpu, tokens, args)
    if args.profile:
        cols = [n for n in ("ours qdora", "bound") if n in steps]
        tables = {n: breakdown(steps[n]) for n in cols}
        print("\nProfile of one step (ms per group, share of the profiled step's wall time):\n")
        print("| group | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
        for g in GROUPS:
            row = []
            for n in cols:
                groups, wall = tables[n]
                row.append(f"{groups.get(g, 0.0):.0f} ({100 * groups.get(g, 0.0) / wall:.0f}%)")
            print(f"| {g} | " + " | ".join(row) + " |")
        print("| wall | " + " | ".join(f"{t[1]:.0f}" for t in tables.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
