"""The Python half of `scripts/gpu-check.sh`: the parts of the GPU check and their budgets, the
training-step memory check of `qdora plan`, and the report.

    python -m qdora.eval.gpu.check parts  --mode full|quick --device cuda|cpu --out DIR
    python -m qdora.eval.gpu.check env    --json FILE
    python -m qdora.eval.gpu.check step   --device cuda|cpu [--layers N] [--seq-len S] ... --json FILE
    python -m qdora.eval.gpu.check report --out DIR

`parts` prints one line per part, `name<TAB>budget seconds<TAB>shell command`: the script runs each
under `timeout` and stops at the first that fails. The commands are the repository's own (pytest,
`qdora bench kernels`, `qdora bench layer`) and the two subcommands here. `--device cpu` gives the
same parts at tiny shapes (the script's dry run, which the CPU test suite runs).

`step` writes a checkpoint with random weights shaped like Llama-3-8B (fewer decoder layers, to fit
the time; `--device cpu`: a tiny Llama-3 shape), loads it as `qdora train` does (`qdora.load_model`
on the device: NF4 quantized there, bf16 on CUDA), and runs `qdora train`'s step (gradient
checkpointing, fused AdamW, clipping at 1.0) for qdora and for qlora: the first step creates the
optimizer states, the next is measured (CUDA: the allocator's peak of allocated bytes, which counts
the model, the states and the step; CPU: `qdora.eval.bench.memory` as `validate_plan` does), then a few
are timed. `qdora.plan.memory.plan` on the same shape and layer count predicts the tensor peak; the part
fails when a prediction misses by more than `--tolerance` (default 15%, the bound
`tests/test_plan.py` holds the CPU planner to).

`report` gathers `status.jsonl` (one line per part the script ran), `parts/*.json` and pytest's
JUnit file into `report.json` and `report.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import bitsandbytes
import torch
import transformers

import qdora
from qdora.core.config import AdapterConfig
from qdora.eval.bench.memory import peak_bytes, step_peak_bytes, tensor_bytes
from qdora.eval.gpu.report import PARTS, format_long, format_step, write_report  # noqa: F401  (also from here)
from qdora.models.head_loss import chunked_loss
from qdora.models.loading import load_model
from qdora.models.offload import offload_activations
from qdora.models.shapes import PRESETS, ModelShape
from qdora.models.tiled_mlp import tiled_layers
from qdora.plan.memory import PlanConfig, longest_sequence, plan
from qdora.train.loop import prepare_for_training

# Seconds per part. Full: 540 s in all, under the 9 minutes the whole check may take on one H200;
# quick: ~4 minutes. The CPU dry run has its own, for a shared 2-core machine.
BUDGETS = {
    "full": {"env": 15, "tests": 185, "bench-kernels": 45, "bench-layer": 60, "loss": 35, "step": 100, "long": 100},
    "quick": {"env": 15, "tests": 70, "bench-kernels": 20, "bench-layer": 25, "loss": 20, "step": 40, "long": 50},
    "cpu": {"env": 30, "tests": 120, "bench-kernels": 60, "bench-layer": 90, "loss": 60, "step": 120, "long": 120},
}
LIMIT_S = {"full": 550, "quick": 250}
"""What a mode may take on a GPU, all parts together (the budgets must fit it: tested)."""

LLAMA3_8B_SHAPES = "4096x4096,4096x14336,14336x4096"   # (in, out): q/o, up/gate, down
STEP_LAYERS = {"full": 8, "quick": 2}
LONG_VARIANTS = {"chunked loss": {}, "+ offloaded activations, tiled layers": {"offload_activations": True,
                                                                              "tiled_layers": True}}
"""`long`'s variants: `qdora train`'s defaults (the chunked loss, gradient checkpointing), then its long-sequence
options on top."""


def part_commands(mode: str, device: str, out: str, python: str = sys.executable) -> list[tuple[str, int, str]]:
    """`(name, budget_s, shell command)` of every part, in order."""
    if mode not in ("full", "quick"):
        raise ValueError(f"mode={mode!r}: use 'full' or 'quick'")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: use 'cuda' or 'cpu'")
    budgets = BUDGETS["cpu" if device == "cpu" else mode]
    parts_dir = Path(out) / "parts"
    py = shlex.quote(python)
    q = lambda p: shlex.quote(str(parts_dir / p))  # noqa: E731
    qdora = f"{py} -m qdora.cli"
    if device == "cuda":
        tests = "tests/test_cuda.py" + (" -m 'not slow'" if mode == "quick" else " tests/test_kernels.py")
        kernels = f"--shapes {'4096x4096' if mode == 'quick' else LLAMA3_8B_SHAPES}"
        layer = (f"--shapes {'4096x4096' if mode == 'quick' else LLAMA3_8B_SHAPES} --tokens 2048 --r 16 "
                 f"--reps {3 if mode == 'quick' else 5}")
        step = f"--device cuda --layers {STEP_LAYERS[mode]} --seq-len 2048 --batch-size 1 --r 64"
        long = f"--device cuda --layers {STEP_LAYERS[mode] // 2} --start 8192 --max-len 1048576"
        loss = f"--device cuda --tokens {8192 if mode == 'full' else 4096}"  # Llama-3-8B's head, every kernel
    else:  # the dry run: the same parts at tiny shapes
        tests = "tests/test_cuda.py -m 'not slow' -k 'not gpu_check'"
        kernels = "--device cpu --shapes 192x67 --tokens 37 --r 3 --reps 1"
        layer = "--device cpu --shapes 256x96 --tokens 64 --r 8 --reps 1"
        step = "--device cpu --layers 2 --seq-len 64 --batch-size 2 --r 16"
        long = "--device cpu --layers 2 --start 128 --max-len 2048 --cap-mib 16"
        loss = "--device cpu --tokens 256 --hidden 64 --vocab 1024 --reps 1 --check-tokens 64"
    return [
        ("env", budgets["env"], f"{py} -m qdora.eval.gpu.check env --json {q('env.json')}"),
        ("tests", budgets["tests"], f"{py} -m pytest {tests} -q -p no:cacheprovider --junitxml {q('tests.xml')}"),
        ("bench-kernels", budgets["bench-kernels"],
         f"{qdora} bench kernels {kernels} --json {q('bench-kernels.json')}"),
        ("bench-layer", budgets["bench-layer"], f"{qdora} bench layer {layer} --json {q('bench-layer.json')}"),
        ("loss", budgets["loss"], f"{qdora} bench loss {loss} --json {q('loss.json')}"),
        ("step", budgets["step"], f"{py} -m qdora.eval.gpu.check step {step} --json {q('step.json')} "
                                  f"--workdir {shlex.quote(str(Path(out) / 'work'))}"),
        ("long", budgets["long"], f"{py} -m qdora.eval.gpu.check long {long} --seconds {budgets['long'] - 15} "
                                  f"--json {q('long.json')} --workdir {shlex.quote(str(Path(out) / 'work-long'))}"),
    ]


# ---- env ------------------------------------------------------------------------------------------

def environment() -> dict:
    """Versions and the device, as this run sees them."""
    info = {"python": platform.python_version(), "qdora": qdora.__version__, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__, "cuda_available": torch.cuda.is_available(),
            "host": platform.node(), "cpu_threads": torch.get_num_threads()}
    try:
        import triton  # optional: not installed everywhere
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import peft  # optional: the dev extra
        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 2),
                    gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    return info


# ---- step: qdora plan against a measured training step ------------------------------------------

def step_shape(device: str, layers: int):
    """Llama-3-8B's dimensions with `layers` decoder layers (CUDA), or a tiny Llama-3 shape (CPU)."""
    base = PRESETS["llama-3-8b"] if device == "cuda" else ModelShape("tiny-llama3", 64, 224, 2, 8, 2, 1024, False)
    return dataclasses.replace(base, name=f"{base.name} ({layers} layers)", layers=layers)


def write_checkpoint(shape, folder: Path, device: str, seed: int = 0) -> Path:
    """A safetensors checkpoint of `shape` with random bf16 weights (std 0.02, norms 1), one shard per
    decoder layer plus one for the rest; drawn on `device`, written from host memory a shard at a time."""
    from safetensors.torch import save_file  # only the step part writes a checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM  # only the step part builds a model

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, rope_theta=500000.0, max_position_embeddings=8192,
                         tie_word_embeddings=shape.tied_embeddings, torch_dtype="bfloat16")
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    groups: dict[str, dict[str, tuple]] = {}
    for key, t in meta.state_dict().items():
        parts = key.split(".")
        group = f"layer{int(parts[2]):03d}" if key.startswith("model.layers.") else "root"
        groups.setdefault(group, {})[key] = tuple(t.shape)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    names = sorted(groups)
    weight_map = {}
    for i, group in enumerate(names):
        tensors = {}
        for key, shape_ in groups[group].items():
            if key.endswith("norm.weight"):
                t = torch.ones(shape_, dtype=torch.bfloat16)
            else:
                t = (0.02 * torch.randn(shape_, generator=gen, device=device)).to(torch.bfloat16).cpu()
            tensors[key] = t
        fname = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    return folder


def optimizer_state_bytes(optimizer) -> int:
    """The bytes of an optimizer's state tensors (its step counters, 0-dim, left out)."""
    return sum(t.untyped_storage().nbytes() for st in optimizer.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)


def measure_step(folder: Path, method: str, shape, args, device: torch.device) -> dict:
    """Load `folder` for `method` as `qdora train` does and measure its training step."""

    cfg = AdapterConfig(method=method, r=args.r, alpha=2.0 * args.r, dropout=args.dropout, adapter_dtype="float32")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, _ = load_model(folder, method=method, cfg=cfg, device=device, progress=False)
    load_s = time.perf_counter() - t0
    prepare_for_training(model, True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)   # as qdora.train.loop.make_optimizer
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape.vocab, (args.batch_size, args.seq_len), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def step():  # qdora.train.loop's step: loss, backward, clip (foreach), optimizer step, zero_grad
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer states exist from now on, as in every later step
    sync()
    row = {"method": method, "load_s": load_s}
    if cuda:
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync()
        row["measured_bytes"] = torch.cuda.max_memory_allocated(device)
        row["reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        free, total = torch.cuda.mem_get_info(device)
        row["device_used_bytes"] = total - free   # CUDA context and other processes included
    else:
        weights = tensor_bytes(model)
        states = optimizer_state_bytes(optimizer)
        row["measured_bytes"] = weights + states + peak_bytes(step)
    times = []
    for _ in range(args.reps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    row["step_s"] = statistics.median(times)
    row["tokens_per_s"] = args.batch_size * args.seq_len / row["step_s"]
    predicted = plan(shape, PlanConfig(method=method, r=args.r, dropout=args.dropout, batch_size=args.batch_size,
                                       seq_len=args.seq_len, device=device.type))
    row.update(predicted_tensor_bytes=predicted.tensor_bytes, predicted_total_bytes=predicted.total_bytes,
               predicted_phase=predicted.peak_phase,
               predicted_terms={k: v for k, v in predicted.terms.items() if v})
    row["error"] = row["predicted_tensor_bytes"] / row["measured_bytes"] - 1.0
    if cuda:
        slack = predicted.terms["allocator_slack"]
        row["reserved_error"] = (predicted.tensor_bytes + slack) / row["reserved_bytes"] - 1
    return row  # the model and its optimizer go with this frame: the caller collects them


def longest_trained(folder: Path, shape, options: dict, args, device: torch.device, seconds: float) -> dict:
    """The longest sequence (batch 1) one QDoRA training step of `folder` runs at, with `options`: lengths doubled
    from `args.start` until a step runs out of memory (CUDA), or past `args.cap_mib` of tensors (a CPU dry run),
    then halved between the last that ran and the first that did not, while `seconds` last: a try is started only
    if it should end in them (its time guessed from the last try's, grown as the length's 1.5th power)."""
    cfg = AdapterConfig(method="qdora", r=args.r, alpha=2.0 * args.r, dropout=0.0, adapter_dtype="float32")
    t_end = time.perf_counter() + seconds
    torch.manual_seed(0)
    model, _ = load_model(folder, method="qdora", cfg=cfg, device=device, progress=False)
    prepare_for_training(model, True)
    chunked_loss(model)
    if options.get("tiled_layers"):
        tiled_layers(model)
    if options.get("offload_activations"):
        offload_activations(model)
        model.disable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)
    cuda = device.type == "cuda"
    weights = tensor_bytes(model)
    tries: list[dict] = []

    def attempt(length: int) -> bool:
        ids = torch.randint(0, shape.vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

        def step():
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                step()
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device)
            else:
                states = optimizer_state_bytes(optimizer)
                peak = weights + states + step_peak_bytes(step)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            peak = None
        ok = peak is not None and (cuda or peak <= args.cap_mib * 2**20)
        tries.append({"tokens": length, "ok": ok, "peak_bytes": peak, "step_s": time.perf_counter() - t0})
        _free(device)
        return ok

    def fits_in_time(length: int) -> bool:
        guess = tries[-1]["step_s"] * max(1.0, length / tries[-1]["tokens"]) ** 1.5 if tries else 0.0
        return time.perf_counter() + guess < t_end

    best, failed, length = 0, None, args.start
    while length <= args.max_len and fits_in_time(length):
        if not attempt(length):
            failed = length
            break
        best, length = length, 2 * length
    grain = 1024 if cuda else 16
    while best and failed and failed - best > grain:
        middle = (best + failed) // 2 // grain * grain
        if not fits_in_time(middle):
            break
        if attempt(middle):
            best = middle
        else:
            failed = middle
    return {"longest_tokens": best, "first_failed_tokens": failed, "tries": tries,
            "searched_to_the_end": failed is None or failed - best <= grain}


def run_long(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check long: --device cuda, but torch sees no CUDA device")
    shape = step_shape(device.type, args.layers)
    work = Path(args.workdir)
    folder = work / "synthetic-checkpoint"
    capacity = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else args.cap_mib * 2**20
    rows = []
    try:
        write_checkpoint(shape, folder, device.type)
        per_variant = args.seconds / len(LONG_VARIANTS)
        for name, options in LONG_VARIANTS.items():
            found = longest_trained(folder, shape, options, args, device, per_variant)
            _free(device)  # the variant's model went with its frame
            planned = PlanConfig(method="qdora", r=args.r, dropout=0.0, batch_size=1, chunked_loss=True,
                                 device=device.type, **options)
            card_gib = capacity / 2**30
            rows.append({"variant": name, **found,
                         "predicted_longest_tokens": longest_sequence(shape, planned, card_gib, margin=False)})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {"model": shape.name, "device": str(device), "r": args.r, "capacity_bytes": capacity,
              "limit": "the device's memory" if device.type == "cuda" else f"{args.cap_mib} MiB of tensors (dry run)",
              "rows": rows, "ok": all(r["longest_tokens"] > 0 for r in rows)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(format_long(result))
    return 0 if result["ok"] else 1


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_step(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check step: --device cuda, but torch sees no CUDA device")
    shape = step_shape(device.type, args.layers)
    work = Path(args.workdir)
    folder = work / "synthetic-checkpoint"
    try:
        t0 = time.perf_counter()
        write_checkpoint(shape, folder, device.type)
        write_s = time.perf_counter() - t0
        rows = []
        for method in ("qdora", "qlora"):
            rows.append(measure_step(folder, method, shape, args, device))
            _free(device)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {"model": shape.name, "shape": dataclasses.asdict(shape), "device": str(device), "r": args.r,
              "dropout": args.dropout, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "tolerance": args.tolerance, "checkpoint_write_s": write_s, "rows": rows,
              "qdora_over_qlora_time": rows[0]["step_s"] / rows[1]["step_s"],
              "qdora_over_qlora_peak": rows[0]["measured_bytes"] / rows[1]["measured_bytes"]}
    bad = [r for r in rows if abs(r["error"]) > args.tolerance]
    result["ok"] = not bad
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(format_step(result))
    if bad:
        print(f"gpu_check step: qdora plan misses the measured peak by more than {args.tolerance:.0%} for "
              + ", ".join(f"{r['method']} ({r['error']:+.1%})" for r in bad), file=sys.stderr)
        return 1
    return 0


# ---- command line ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qdora.eval.gpu.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("parts", help="print the parts: name, budget (s), command; tab-separated")
    sp.add_argument("--mode", choices=("full", "quick"), default="full")
    sp.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    sp.add_argument("--out", required=True)
    sp.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(PARTS))
    sp.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget (default 1)")
    se = sub.add_parser("env", help="versions and the device, as JSON")
    se.add_argument("--json", required=True)
    ss = sub.add_parser("step", help="qdora plan against a measured training step of a synthetic model")
    ss.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ss.add_argument("--layers", type=int, default=8)
    ss.add_argument("--seq-len", type=int, default=2048)
    ss.add_argument("--batch-size", type=int, default=1)
    ss.add_argument("--r", type=int, default=64)
    ss.add_argument("--dropout", type=float, default=0.05)
    ss.add_argument("--reps", type=int, default=3, help="timed steps per method (default: %(default)s)")
    ss.add_argument("--tolerance", type=float, default=0.15)
    ss.add_argument("--workdir", required=True, help="where the synthetic checkpoint is written (removed after)")
    ss.add_argument("--json", required=True)
    sl = sub.add_parser("long", help="the longest sequence a QDoRA step of a synthetic model runs at, and the plan's")
    sl.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    sl.add_argument("--layers", type=int, default=4)
    sl.add_argument("--r", type=int, default=16)
    sl.add_argument("--start", type=int, default=8192, help="the first length tried (doubled from there)")
    sl.add_argument("--max-len", type=int, default=1 << 20)
    sl.add_argument("--cap-mib", type=int, default=48, help="CPU dry run: the tensor bytes a step may use")
    sl.add_argument("--seconds", type=float, default=85.0, help="the search's time, both variants together")
    sl.add_argument("--workdir", required=True)
    sl.add_argument("--json", required=True)
    sr = sub.add_parser("report", help="gather the parts into report.json and report.md")
    sr.add_argument("--out", required=True)
    args = p.parse_args(argv)

    if args.command == "parts":
        only = [n for n in args.only.split(",") if n]
        unknown = [n for n in only if n not in PARTS]
        if unknown:
            p.error(f"--only: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
        if not args.budget_scale > 0:
            p.error(f"--budget-scale={args.budget_scale} must be > 0")
        for name, budget, cmd in part_commands(args.mode, args.device, args.out):
            if not only or name in only:
                print(f"{name}\t{max(0.1, round(budget * args.budget_scale, 1)):g}\t{cmd}")
        return 0
    if args.command == "env":
        info = environment()
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=1) + "\n")
        print("\n".join(f"{k}: {v}" for k, v in info.items()))
        return 0
    if args.command == "step":
        for name in ("layers", "seq_len", "batch_size", "r", "reps"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
        return run_step(args)
    if args.command == "long":
        for name in ("layers", "r", "start", "max_len", "cap_mib"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
        return run_long(args)
    rep = write_report(Path(args.out))
    print(f"gpu-check: {rep['verdict']}; report: {Path(args.out) / 'report.md'}")
    return 0 if rep["verdict"] == "passed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
