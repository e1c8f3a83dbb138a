"""`qdora bench long`: peak memory and time per token of one training step on long sequences, SmolLM2-135M
QDoRA (`qdora train`'s defaults: r=16, alpha 32, dropout 0.05, q/k/v/up/down, AdamW, clipping 1.0, gradient
checkpointing), batch 1, one example of N tokens (random ids, every token a target).

Each (variant, length) runs in a fresh process, the variants of one length side by side: it loads the
model, takes one step of 256 tokens (AdamW's states then exist, as in every later step), then the
measured step of N tokens. Figures: the process's peak
resident set over its whole life (the kernel's `ru_maxrss`: loading included, as a user sees it), and the
measured step's wall time per token. Variants (each a `qdora train` setting):

- `whole-malloc`: `--no-chunked-loss`, glibc's malloc (`QDORA_ALLOCATOR=system`): the code before the
  long-sequence work;
- `chunked-malloc`: the chunked loss (the default), glibc's malloc;
- `chunked`: `qdora train`'s default where the system has jemalloc (`qdora.train.allocator`);
- `tiled`: `--tiled-mlp` (tiles of the hidden size, 576 tokens), jemalloc;
- `tiled-offload`: `--tiled-mlp --offload-activations`, jemalloc (on CPU offloading saves nothing:
  it runs the path);
- `tiled-layers`: `--tiled-layers` (the norms, trained projections and MLP over tiles of 576 tokens), jemalloc.

    qdora bench long                                   # every variant at 2K and 4K tokens
    qdora bench long --lengths 8192,16384,32768 --variants tiled

Run it alone: two processes on two cores thrash, and the times mean nothing then.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from qdora.core.safetensors_io import write_text_atomic
from qdora.eval.common import run_child
from qdora.options import Parser
from qdora.train.allocator import DEFAULT_CONF, jemalloc_library

_CHILD = r"""
import json, sys, time
import torch
import qdora
from qdora.models.loading import load_model, smollm2_gguf_path
from qdora.train.allocator import loaded
from qdora.train.config import TrainConfig
from qdora.train.setup import long_sequence_options, make_optimizer, prepare_for_training

n, settings = int(sys.argv[1]), json.loads(sys.argv[2])
cfg = TrainConfig(model="SmolLM2-135M", data="-", out="-", cutoff_len=n, **settings)
torch.manual_seed(0)
model, _ = load_model(smollm2_gguf_path(), method=cfg.method, cfg=cfg.adapter_config(), progress=False)
prepare_for_training(model, cfg.gradient_checkpointing)
if cfg.chunked_loss:
    qdora.chunked_loss(model)
long_sequence_options(model, cfg)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = make_optimizer(params, cfg, torch.device("cpu"))
vocab = model.config.vocab_size

def step(tokens):
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)

step(256)
start = time.perf_counter()
loss = step(n)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "loss": loss, "allocator": loaded(),
                  "attention": model.config._attn_implementation}))
"""

VARIANTS = {
    "whole-malloc": (dict(chunked_loss=False), "system"),
    "chunked-malloc": ({}, "system"),
    "chunked": ({}, "jemalloc"),
    "tiled": (dict(tiled_mlp=True), "jemalloc"),
    "tiled-offload": (dict(tiled_mlp=True, offload_activations=True), "jemalloc"),
    "tiled-layers": (dict(tiled_layers=True), "jemalloc"),
}


def measure(variant: str, tokens: int) -> dict:
    """One fresh process: the variant's step at `tokens` tokens; its peak RSS and the step's time."""
    settings, allocator = VARIANTS[variant]
    library = jemalloc_library()
    if allocator == "jemalloc" and library is None:
        raise ValueError("this variant needs jemalloc (Debian/Ubuntu: apt install libjemalloc2); leave it out "
                         "with --variants")
    env = {"QDORA_ALLOCATOR": allocator, "LD_PRELOAD": library if allocator == "jemalloc" else "",
           "MALLOC_CONF": DEFAULT_CONF if allocator == "jemalloc" else ""}
    child = run_child(["-c", _CHILD, str(tokens), json.dumps(settings)], f"{variant} at {tokens} tokens",
                      capture=True, env=env, cwd=tempfile.gettempdir())
    row = json.loads(child.stdout.strip().splitlines()[-1])
    return {"variant": variant, "tokens": tokens, "peak_rss_bytes": child.peak_rss_bytes, **row}


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="qdora bench long", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="2048,4096", help="comma-separated tokens per step (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, from: " + ", ".join(VARIANTS) + " (default: all)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each variant and length, round-robin; the fastest step and the largest peak are "
                        "reported (default: %(default)s)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",") if n]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not lengths or min(lengths) < 257:
        p.error(f"unknown variant(s) {unknown}; use {', '.join(VARIANTS)}" if unknown else
                "--lengths: tokens above 256 (the warm-up step's), comma-separated")
    print("| variant | tokens | peak RSS (GB) | step (s) | ms per token | allocator |")
    print("|---|---:|---:|---:|---:|---|", flush=True)
    rows = []
    for n in lengths:  # the variants of one length side by side, round-robin over the repeats
        runs = {v: [] for v in variants}
        for _ in range(args.repeat):
            for variant in variants:
                runs[variant].append(measure(variant, n))
        for variant, got in runs.items():
            r = {**got[0], "seconds": min(g["seconds"] for g in got), "all_seconds": [g["seconds"] for g in got],
                 "peak_rss_bytes": max(g["peak_rss_bytes"] for g in got)}
            rows.append(r)
            print(f"| {variant} | {n:,} | {r['peak_rss_bytes'] / 1e9:.2f} | {r['seconds']:.1f} | "
                  f"{1e3 * r['seconds'] / n:.2f} | {r['allocator']} |", flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
