"""The `qdora` command line."""

from __future__ import annotations

import argparse
import sys

# Subcommands not built yet: their flags are the documented contract; running them says so.
_PLANNED = {
    "train": "fine-tune a model with an adapter method",
    "merge": "dequantize-merge an adapter into a plain bf16 checkpoint",
    "eval": "compare methods on models and tasks",
    "analyze": "magnitude/direction (dM/dD) diagnostics of fine-tuned weights",
    "plan": "predict peak GPU memory for a model, method and setting",
    "demo": "fine-tune, evaluate, merge and reload a small real model on CPU",
}


def _not_available(name: str):
    def run(_args) -> int:
        print(f"qdora {name}: not available in this version yet. "
              f"Available now: `qdora bench layer` (see `qdora bench --help`).", file=sys.stderr)
        return 2
    return run


def _bench(args) -> int:
    if args.what == "layer":
        from qdora.eval.bench_layer import main as bench_layer
        return bench_layer(args.rest)
    if args.what == "load":
        from qdora.eval.bench_load import main as bench_load
        return bench_load(args.rest)
    print(f"qdora bench {args.what}: not available in this version yet; try `qdora bench layer`.",
          file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdora", description="Quantized DoRA fine-tuning of LLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser("bench", help="benchmarks: layer, load (available); model, kernels",
                           description="Run a benchmark. `qdora bench layer --help` lists its options.")
    bench.add_argument("what", choices=("layer", "load", "model", "kernels"))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    bench.set_defaults(func=_bench)
    for name, text in _PLANNED.items():
        p = sub.add_parser(name, help=f"{text} (not available yet)", description=f"{text} (not available yet).")
        p.set_defaults(func=_not_available(name))
    return parser


def _version() -> str:
    from qdora import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
