"""`qdora bench load`: peak memory (RSS) of loading a checkpoint, qdora's NF4 loader vs transformers.

Each load runs in a fresh process; the figure is the growth of the process's peak resident set
(Linux `VmHWM`, reset through `/proc/self/clear_refs` after the imports) over the resident set
before the load, so the interpreter and libraries do not count. Memory-mapped checkpoint pages a
loader touches and keeps mapped count, as they should.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from qdora.eval.common import run_child
from qdora.models.loading import convert_gguf, smollm2_gguf_path
from qdora.options import Parser

_CHILD = r"""
import gc, json, sys, time
import torch
import qdora
from transformers import AutoModelForCausalLM

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

mode, path = sys.argv[1], sys.argv[2]
# Warm up what every loader initialises lazily on first use (modeling code, safetensors, the
# bitsandbytes CPU library), so that one-time import memory is not counted as loading memory.
from accelerate import init_empty_weights
from transformers import AutoConfig
import bitsandbytes.functional as bnbF
from safetensors import safe_open
import pathlib
if pathlib.Path(path).is_dir():
    with init_empty_weights():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    first = sorted(pathlib.Path(path).glob("*.safetensors"))[0]
    with safe_open(str(first), "pt") as f:
        f.get_tensor(next(iter(f.keys())))
bnbF.quantize_4bit(torch.randn(64, 64), quant_type="nf4", compress_statistics=True)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS")
t0 = time.perf_counter()
if mode == "transformers-fp32":
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
elif mode == "transformers-bf16":
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
else:
    model, _ = qdora.load_model(path, method=mode, add=False, progress=False)
seconds = time.perf_counter() - t0
# transformers may hand back tensors that still sit in the memory-mapped file, unread: read every
# weight once so that each loader is charged for the memory its model really occupies.
with torch.no_grad():
    for t in list(model.parameters()) + list(model.buffers()):
        t.sum()
peak = status("VmHWM")
nbytes = 0
seen = set()
for t in list(model.parameters()) + list(model.buffers()):
    key = t.untyped_storage().data_ptr()
    if key not in seen:
        seen.add(key)
        nbytes += t.untyped_storage().nbytes()
        state = getattr(t, "quant_state", None)
        if state is not None:
            nbytes += state.absmax.numel() * state.absmax.element_size()
print(json.dumps({"mode": mode, "peak_growth_bytes": peak - base, "seconds": seconds,
                  "model_bytes": nbytes}))
"""

MODES = ("transformers-fp32", "transformers-bf16", "qlora")


def measure(path: str | os.PathLike, mode: str) -> dict:
    """Load `path` with `mode` (`transformers-fp32`, `transformers-bf16`, or a qdora method) in a
    fresh process and return its peak RSS growth, wall time and resident model bytes."""
    child = run_child(["-c", _CHILD, mode, str(path)], f"loading {path} with {mode}", capture=True,
                      cwd=tempfile.gettempdir())
    return json.loads(child.stdout.strip().splitlines()[-1])


def checkpoint_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def synthetic_checkpoint(path: str | os.PathLike, hidden: int, layers: int, shard_size: str = "500MB") -> Path:
    """A random Llama checkpoint (bf16, sharded) of roughly 2·(12·hidden²·layers) bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy, used here only

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128,
                         num_key_value_heads=hidden // 128,
                         tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=shard_size)
    return path


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="qdora bench load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[],
                   help="checkpoint folder or .gguf to measure (repeatable); default: SmolLM2-135M and a "
                        "synthetic ~3 GB bf16 checkpoint")
    p.add_argument("--synthetic-dir", default=os.path.join(tempfile.gettempdir(), "qdora-synthetic-3gb"),
                   help="where the synthetic checkpoint is written (reused if present)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated (default: %(default)s)")
    args = p.parse_args(argv)
    targets = list(args.model)
    if not targets:
        targets = [str(convert_gguf(smollm2_gguf_path())),
                   str(synthetic_checkpoint(args.synthetic_dir, hidden=2048, layers=24))]
    print("| checkpoint | on disk | loader | peak RSS growth | resident model | time |")
    print("|---|---|---|---|---|---|")
    for target in targets:
        disk = checkpoint_bytes(target) if Path(target).is_dir() else Path(target).stat().st_size
        for mode in args.modes.split(","):
            r = measure(target, mode)
            print(f"| {Path(target).name} | {disk / 2**20:.0f} MiB | {mode} | "
                  f"{r['peak_growth_bytes'] / 2**20:.0f} MiB "
                  f"| {r['model_bytes'] / 2**20:.0f} MiB | {r['seconds']:.1f} s |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
