"""The `qdora` command line.

A mistake the user can fix (a bad value, a missing or unwritable path, bad data, a run that
diverged) ends with one line, `qdora <command>: error: ...`, and exit status 2 (1 for a run that
diverged); `--debug` anywhere on the command line (or QDORA_DEBUG=1) shows the traceback instead.

Each command imports its modules inside its own function, so that `qdora --help` and a mistyped
command answer at once instead of after importing torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qdora.options import Parser


def _bench(args) -> int:
    if args.what == "layer":
        from qdora.eval.bench.layer import main as bench_layer
        return bench_layer(args.rest)
    if args.what == "generate":
        from qdora.eval.bench.generate import main as bench_generate
        return bench_generate(args.rest)
    if args.what == "long":
        from qdora.eval.bench.long_seq import main as bench_long
        return bench_long(args.rest)
    if args.what == "load":
        from qdora.eval.bench.load import main as bench_load
        return bench_load(args.rest)
    if args.what == "model":  # `bench step` with ours and PEFT's qdora and qlora, no bound
        from qdora.eval.bench.step import MODEL
        from qdora.eval.bench.step import main as bench_step
        return bench_step(args.rest, prog="qdora bench model", variants=MODEL)
    if args.what == "step":
        from qdora.eval.bench.step import main as bench_step
        return bench_step(args.rest)
    if args.what == "peft":
        from qdora.eval.bench.peft import main as bench_peft
        return bench_peft(args.rest)
    if args.what == "loss":
        from qdora.eval.bench.loss import main as bench_loss
        return bench_loss(args.rest)
    from qdora.eval.bench.kernels import main as bench_kernels
    return bench_kernels(args.rest)


HEAVY = {"train": "fine-tune a model (full, lora, dora, qlora, qdora)",
         "plan": "predict peak GPU memory per device for a model, method and setting"}
"""The commands whose options import torch (their config classes), with their one-line help."""


def _add_train(sub) -> None:
    from qdora.options import add_options
    from qdora.train.config import TrainConfig
    p = sub.add_parser("train", help=HEAVY["train"],
                       description="Fine-tune a model. Writes metrics.jsonl, checkpoint/ and adapter/ (model/ for "
                                   "full) to --out. Ctrl-C or SIGTERM writes a checkpoint; --resume continues it. "
                                   "Every option is a field of qdora.train.config.TrainConfig, and can be given in a "
                                   "--config file too.")
    add_options(p, TrainConfig)
    p.set_defaults(func=_train)


def _train(args) -> int:
    from qdora.options import resolve
    from qdora.train.loop import TrainConfig, train
    cfg = resolve(TrainConfig, vars(args))
    main_rank = True
    try:
        summary = train(cfg)
    finally:
        if cfg.fsdp:
            import torch.distributed as dist
            if dist.is_initialized():
                main_rank = dist.get_rank() == 0
                dist.destroy_process_group()
    if not main_rank:  # rank 0 reports for the job
        return 128 + summary["interrupted"] if summary["interrupted"] is not None else 0
    if summary["interrupted"] is not None:
        print(f"stopped at step {summary['steps']}; continue with the same command plus --resume", file=sys.stderr)
        return 128 + summary["interrupted"]
    if cfg.progress:
        val = ""
        if "val_loss" in summary:
            val = f"; validation loss {summary['val_loss']:.4f}"
            if "best_step" in summary:
                val += f" (best {summary['best_val_loss']:.4f} at step {summary['best_step']}, in adapter-best/)"
        print(f"done: {summary['steps']} steps, {summary['tokens']} tokens in {summary['seconds']:.1f} s of "
              f"training{val}; results in {cfg.out}")
    return 0


def _add_plan(sub) -> None:
    from qdora.options import add_options
    from qdora.plan.memory import CARDS_GB, PlanConfig
    p = sub.add_parser("plan", help=HEAVY["plan"],
                       description="Predict the peak memory per device of one training step, term by term "
                                   "(NF4 weights, quantization state, adapters, gradients, optimizer states, "
                                   "activations, logits/loss, temporaries, FSDP buffers, CUDA context), and "
                                   f"whether it fits a {'/'.join(map(str, CARDS_GB))} GB card. Every option but "
                                   "--model and --json is a field of qdora.plan.config.PlanConfig. See "
                                   "qdora/plan/memory.py for the model of each term.")
    p.add_argument("--model",
                   help="a preset (Llama-2-7B, Llama-2-13B, Llama-2-70B, LLaMA-65B, Llama-3-8B, Llama-3-70B, "
                        "SmolLM2-135M, Mistral-7B-v0.3, Qwen2.5-7B, Qwen3-8B, Gemma-2-2B, Gemma-2-9B, Gemma-2-27B; "
                        "MoE: Qwen3-30B-A3B, OLMoE-1B-7B, "
                        "Mixtral-8x7B, Qwen1.5-MoE-A2.7B, "
                        "GLM-4.5-Air) or a checkpoint folder "
                        "with a config.json (required, here or in --config: a run's train_config.json names its "
                        "model)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--max-seq-len", action="store_true",
                   help="print the longest sequence that fits each card size (8, 12, 16, 24, 40, 48, 80 GB) at these "
                        "settings (--seq-len ignored), with and without the planner's margin")
    add_options(p, PlanConfig)
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    import dataclasses
    import json

    from qdora.options import read_config_file, resolve
    from qdora.plan.memory import PlanConfig, plan, resolve_model
    from qdora.plan.report import format_plan, plan_to_dict
    from qdora.train.config import TrainConfig
    model = args.model or (read_config_file(args.config).get("model") if hasattr(args, "config") else None)
    if not model:
        raise ValueError("--model is required (a preset or a checkpoint folder), on the command line or in --config")
    shape = resolve_model(str(model))
    # A run's train_config.json works as --config: its model and the settings plan shares are read
    # (its cutoff_len as seq_len), the settings that do not shape memory skipped.
    train_only = {f.name for f in dataclasses.fields(TrainConfig)} - {f.name for f in dataclasses.fields(PlanConfig)}
    cfg = resolve(PlanConfig, vars(args), ignore=frozenset(train_only), aliases={"cutoff_len": "seq_len"})
    if args.max_seq_len:
        from qdora.plan.report import format_longest, longest_table
        rows = longest_table(shape, cfg)
        print(json.dumps(rows, indent=1) if args.json else format_longest(shape, cfg, rows))
        return 0
    result = plan(shape, cfg)
    print(json.dumps(plan_to_dict(result), indent=1) if args.json else format_plan(result))
    return 0


def _add_merge(sub) -> None:
    from qdora.export.command import add_merge
    add_merge(sub)


def _add_chat(sub) -> None:
    from qdora.serve.command import add_chat
    add_chat(sub)


def _add_serve(sub) -> None:
    from qdora.serve.command import add_serve
    add_serve(sub)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, given `command`, one that knows every command's name but only
    `command`'s options (so that `qdora --help` and `qdora --version` import neither torch nor
    transformers: `command` "" lists the commands alone)."""
    parser = Parser(prog="qdora", description="Quantized DoRA fine-tuning of LLMs.",
                    epilog="A mistake that can be fixed ends with one line `qdora <command>: error: ...` (exit "
                           "status 2); add --debug to any command (or set QDORA_DEBUG=1) for the traceback.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (accepted anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser("bench", help="benchmarks: layer, load, model, step, long, generate, peft, kernels, loss",
                           description="Run a benchmark. `qdora bench layer --help` lists its options.")
    bench.add_argument("what", choices=("layer", "load", "model", "step", "long", "generate", "peft", "kernels",
                                        "loss"))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    bench.set_defaults(func=_bench)
    for name, add in (("train", _add_train), ("merge", _add_merge), ("plan", _add_plan), ("chat", _add_chat),
                      ("serve", _add_serve)):
        if name in HEAVY and command not in (None, name):
            sub.add_parser(name, help=HEAVY[name])  # listed only, as `qdora --help` shows it
        else:
            add(sub)
    sub.add_parser("eval", help="compare methods (ours and PEFT's) on one model, data and seeds; "
                                "`qdora eval --help` lists its options")
    sub.add_parser("analyze", help="magnitude/direction (ΔM/ΔD) changes of fine-tuned weights, as CSV and plot; "
                                   "`qdora analyze --help` lists its options")
    sub.add_parser("demo", help="fine-tune, score, merge and reload SmolLM2-135M on CPU (a few minutes); "
                                "`qdora demo --help` lists its options")
    return parser


def _version() -> str:
    from qdora import __version__
    return __version__


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["demo"]:  # these parsers own every flag after the word
        from qdora.demo import main as demo_main
        return demo_main(argv[1:])
    if argv[:1] == ["eval"]:
        from qdora.eval.harness.runner import main as eval_main
        return eval_main(argv[1:])
    if argv[:1] == ["analyze"]:
        from qdora.eval.harness.analyze import main as analyze_main
        return analyze_main(argv[1:])
    parser = build_parser(command=next((a for a in argv if not a.startswith("-")), ""))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


def _raised_here(err: BaseException) -> bool:
    """True if `err` was raised by qdora's own code, whose messages are written for the user (an
    error raised deep inside torch or transformers keeps its traceback: it is more likely a bug)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    source = Path(tb.tb_frame.f_code.co_filename).resolve()
    # qdora, and qdora.eval / qdora.kernels, which live in folders of their own (see pyproject.toml)
    packages = [sys.modules[name] for name in ("qdora", "qdora.eval", "qdora.kernels") if name in sys.modules]
    return any(source.is_relative_to(Path(package.__file__).resolve().parent) for package in packages)


def one_line(err: BaseException) -> str:
    """An error's message on one line: the listed problems of a multi-line message joined by '; '."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    head, rest = lines[0], [ln.removeprefix("- ") for ln in lines[1:]]
    return head + (" " if head.endswith(":") else ": ") + "; ".join(rest) if rest else head


def user_error_status(err: BaseException) -> int | None:
    """The exit status for an error the user can fix (2; 1 for a run that diverged), None for others.
    Any OSError (a path, a full disk, a read-only file system) is the user's to fix, as is a
    ValueError or ImportError that qdora raised itself. A child process's failure
    (`qdora.eval.common.ChildFailed`) carries its own: the child's one line, or 1 when the child's
    traceback is already on the terminal."""
    from qdora.train.loop import NonFiniteError
    if getattr(err, "exit_status", None) is not None:
        return err.exit_status
    if isinstance(err, NonFiniteError):
        return 1
    if isinstance(err, OSError):
        return 2
    if isinstance(err, (ValueError, ImportError)) and _raised_here(err):
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    if argv is None and next((a for a in sys.argv[1:] if not a.startswith("-")), "") == "train":
        from qdora.train.allocator import restart_with_jemalloc  # the command only, not a call from Python
        restart_with_jemalloc(sys.argv[1:])
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("QDORA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    report = os.environ.pop("QDORA_ERROR_FILE", None)  # qdora.eval.common.ERROR_FILE; not for this one's children
    if debug:
        os.environ["QDORA_DEBUG"] = "1"  # child processes (qdora eval's runs) show their tracebacks too
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nqdora {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        status = user_error_status(err)
        if debug or status is None:
            raise
        if report:  # a child of qdora.eval.common.run_child: its parent says it, naming the run
            Path(report).write_text(json.dumps({"status": status, "message": one_line(err)}))
        else:
            print(f"qdora {command}: error: {one_line(err)}", file=sys.stderr)
        return status


if __name__ == "__main__":
    raise SystemExit(main())
