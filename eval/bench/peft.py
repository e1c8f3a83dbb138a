"""`qdora bench peft`: PEFT's QDoRA with and without `qdora.patch_peft`, beside PEFT's QLoRA and
qdora's own QDoRA, on a real model.

Part 1, steps. For each dropout (0 and 0.05): PEFT QLoRA, PEFT QDoRA, PEFT QDoRA patched by
`qdora.patch_peft`, and qdora's own QDoRA, all r=16, alpha 32, q/k/v/up/down, gradient
checkpointing, on SmolLM2-135M-Instruct in NF4 (PEFT's variants on the base transformers loads with
`BitsAndBytesConfig`, as a PEFT user loads it; qdora's on its own loader's NF4). One forward +
backward on the same batch, stepped round-robin so machine noise hits them alike; the median of
`--reps` steps (the first, a warm-up, dropped) and the peak of tensor bytes during one step (the
PyTorch profiler's memory timeline on CPU, the allocator on CUDA).

Part 2, a run. TRL's `SFTTrainer`, 20 steps of PEFT QDoRA (dropout 0) on the bundled ARC-Easy
slice, unpatched then patched, each in its own process: wall time of `trainer.train()`, the
process's peak resident set, and the two loss curves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

import torch

from qdora.core.config import AdapterConfig
from qdora.core.safetensors_io import write_text_atomic
from qdora.data.examples import DEMO_DATA, load_records
from qdora.eval.bench.memory import peak_bytes
from qdora.eval.common import TARGETS, benchmark_model, demo_batch, peft_on_bnb_4bit, run_child
from qdora.integrations.peft import patch_peft
from qdora.models.loading import load_model
from qdora.options import Parser
from qdora.train.loop import prepare_for_training

VARIANTS = ("peft qlora", "peft qdora", "peft qdora patched", "qdora qdora")


def _peft_model(path: str, r: int, dropout: float, use_dora: bool):
    return peft_on_bnb_4bit(path, r, 2 * r, dropout, use_dora, TARGETS)


def build(name: str, path: str, r: int, dropout: float):
    if name == "qdora qdora":
        cfg = AdapterConfig(method="qdora", r=r, alpha=2 * r, dropout=dropout, target_modules=TARGETS,
                            adapter_dtype="float32")
        model, _ = load_model(path, method="qdora", cfg=cfg, progress=False)
    else:
        model = _peft_model(path, r, dropout, use_dora=name != "peft qlora")
        if name.endswith("patched"):
            patch_peft(model)
    prepare_for_training(model)
    return model


def steps(path: str, r: int, dropout: float, batch: dict, reps: int, memory: bool) -> dict[str, dict]:

    models = {name: build(name, path, r, dropout) for name in VARIANTS}
    device = next(models["qdora qdora"].parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    losses: dict[str, float] = {}

    def step(model):
        loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(reps + 1):
        for name, model in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses[name] = step(model)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    out = {name: {"median_s": statistics.median(t[1:]), "loss": losses[name]} for name, t in times.items()}
    if memory:
        for name, model in models.items():
            out[name]["peak_step_bytes"] = peak_bytes(lambda m=model: step(m), device)
    return out


def _sft_child(mode: str, path: str, r: int, steps_: int, batch_size: int, cutoff: int, adapter_dtype: str,
               dropout: float, result: str) -> int:
    """One SFTTrainer run (`mode`: patched or unpatched) in this process; writes its figures to `result`."""

    import datasets  # optional: dev extra
    import trl  # optional: dev extra

    warnings.filterwarnings("ignore")
    model = _peft_model(path, r, dropout, use_dora=True)
    if mode == "patched":
        patch_peft(model)
    from transformers import AutoTokenizer  # heavy, used here only
    tok = AutoTokenizer.from_pretrained(path)
    records = load_records(DEMO_DATA / "arc_easy_train.json")
    data = datasets.Dataset.from_list([{"prompt": rec.prompt, "completion": rec.response} for rec in records])
    with tempfile.TemporaryDirectory() as out:
        trainer = trl.SFTTrainer(model=model, processing_class=tok, train_dataset=data, args=trl.SFTConfig(
            output_dir=out, max_steps=steps_, per_device_train_batch_size=batch_size, learning_rate=3e-4,
            lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0,
            max_length=cutoff, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=False, disable_tqdm=True, use_cpu=not __import__("torch").cuda.is_available()))
        if adapter_dtype == "float32":  # undo TRL's cast of a 4-bit model's LoRA A/B to bf16
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    curve = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    write_text_atomic(result, json.dumps({"wall_s": wall, "losses": curve}))
    return 0


def sft_runs(path: str, r: int, steps_: int, batch_size: int, cutoff: int, adapter_dtype: str,
             dropout: float) -> dict[str, dict]:
    results = {}
    for mode in ("unpatched", "patched"):
        with tempfile.TemporaryDirectory() as tmp:
            result = os.path.join(tmp, "result.json")
            args = ["-m", "qdora.eval.bench.peft", "--sft-child", mode, "--model", path, "--r", str(r),
                    "--sft-steps", str(steps_), "--batch-size", str(batch_size), "--cutoff-len", str(cutoff),
                    "--sft-adapter-dtype", adapter_dtype, "--sft-dropout", str(dropout), "--result", result]
            child = run_child(args, f"the {mode} SFTTrainer run")
            with open(result) as f:
                results[mode] = {**json.load(f), "peak_rss_mib": child.peak_rss_bytes / 2**20}
    return results


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="qdora bench peft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant (default: %(default)s)")
    p.add_argument("--dropouts", default="0,0.05", help="comma-separated (default: %(default)s)")
    p.add_argument("--sft-steps", type=int, default=20, help="SFTTrainer steps per run; 0 skips part 2")
    p.add_argument("--sft-adapter-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="LoRA A/B dtype in the SFTTrainer runs: TRL casts a 4-bit model's to bf16, and PEFT's "
                        "DoRA then computes its branch and row norm in bf16; float32 (default) undoes that cast")
    p.add_argument("--sft-dropouts", default="0,0.05", help="dropouts of the SFTTrainer pairs (default: %(default)s)")
    p.add_argument("--sft-dropout", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--sft-child", choices=("patched", "unpatched"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    path = benchmark_model(args.model)
    if args.sft_child:
        return _sft_child(args.sft_child, path, args.r, args.sft_steps, args.batch_size, args.cutoff_len,
                          args.sft_adapter_dtype, args.sft_dropout, args.result)
    from transformers import AutoTokenizer  # heavy, used here only

    batch = demo_batch(AutoTokenizer.from_pretrained(path), args.batch_size, args.cutoff_len)
    tokens = int(batch["attention_mask"].sum())
    report = {"model": path, "tokens_per_step": tokens, "threads": torch.get_num_threads(), "reps": args.reps,
              "steps": {}}
    print(f"{tokens} tokens per step, {torch.get_num_threads()} threads, median of {args.reps} steps, "
          f"r={args.r}, gradient checkpointing\n")
    for dropout in (float(d) for d in args.dropouts.split(",") if d.strip()):
        res = steps(path, args.r, dropout, batch, args.reps, not args.no_memory)
        report["steps"][str(dropout)] = res
        print(f"dropout {dropout}\n\n| variant | step (s) | tokens/s | peak step MiB | loss |\n|---|---|---|---|---|")
        for name, v in res.items():
            peak = f"{v['peak_step_bytes'] / 2**20:.1f}" if "peak_step_bytes" in v else "-"
            print(f"| {name} | {v['median_s']:.3f} | {tokens / v['median_s']:.0f} | {peak} | {v['loss']:.6f} |")
        t = {k: v["median_s"] for k, v in res.items()}
        print(f"\n- patched / PEFT QLoRA (time): {t['peft qdora patched'] / t['peft qlora']:.3f}")
        print(f"- unpatched / patched (time): {t['peft qdora'] / t['peft qdora patched']:.3f}")
        print(f"- qdora's own / patched (time): {t['qdora qdora'] / t['peft qdora patched']:.3f}")
        if "peak_step_bytes" in res["peft qlora"]:
            m = {k: v["peak_step_bytes"] for k, v in res.items()}
            print(f"- patched / PEFT QLoRA (peak): {m['peft qdora patched'] / m['peft qlora']:.3f}")
            print(f"- unpatched / PEFT QLoRA (peak): {m['peft qdora'] / m['peft qlora']:.3f}")
        print()
    for dropout in (float(d) for d in args.sft_dropouts.split(",") if d.strip()) if args.sft_steps else ():
        sft = sft_runs(path, args.r, args.sft_steps, args.batch_size, args.cutoff_len, args.sft_adapter_dtype, dropout)
        report.setdefault("sft", {})[str(dropout)] = sft
        u, pt = sft["unpatched"], sft["patched"]
        rel = max(abs(a - b) / abs(b) for a, b in zip(pt["losses"], u["losses"]))
        print(f"SFTTrainer, {args.sft_steps} steps of PEFT QDoRA (dropout {dropout}, LoRA A/B in "
              f"{args.sft_adapter_dtype}), each run in its own process\n")
        print("| run | wall (s) | peak RSS (MiB) | loss first / last 5 (mean) |\n|---|---|---|---|")
        for mode, v in sft.items():
            first, last = statistics.fmean(v["losses"][:5]), statistics.fmean(v["losses"][-5:])
            print(f"| {mode} | {v['wall_s']:.1f} | {v['peak_rss_mib']:.0f} | {first:.4f} / {last:.4f} |")
        print(f"\n- unpatched / patched (wall): {u['wall_s'] / pt['wall_s']:.3f}")
        print(f"- loss curves: largest relative difference {rel:.2e} over {len(pt['losses'])} steps\n")
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
