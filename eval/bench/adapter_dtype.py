"""Adapters stored in bf16, with and without fp32 master copies (`qdora.MasterWeights`), against fp32.

    python -m qdora.eval.bench.adapter_dtype [--steps 40] [--lr 2e-5] [--out runs/adapter-dtype]

1. The first AdamW step on a SmolLM2-sized QDoRA layer (576 x 576, r=16, NF4 base): the fraction of
   `lora_A`'s entries whose trained value (the parameter, or its master copy) did not move.
2. A short `qdora train` run on SmolLM2-135M-Instruct and the demo's chat data, three times from the
   same seed: fp32 adapters, bf16 adapters as `qdora train` trains them (master copies), and bf16
   adapters with the copies switched off (the behaviour before). Prints the loss curves and how far
   each bf16 run's `lora_B` and magnitude offsets (both start at zero) end from the fp32 run's,
   relative to the fp32 run's own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from qdora.core.layer import QDoRALinear
from qdora.core.nf4 import linear4bit_from_linear
from qdora.core.optim import MasterWeights
from qdora.core.safetensors_io import write_text_atomic
from qdora.demo import demo_choices, write_chat_data
from qdora.models.loading import convert_gguf, smollm2_gguf_path
from qdora.options import Parser
from qdora.train.loop import TrainConfig, read_metrics, train

VARIANTS = ("float32", "bfloat16", "bfloat16, no master copies")


def first_step_unchanged(variant: str, lr: float, size: int = 576, r: int = 16) -> float:
    """Fraction of `lora_A`'s trained values unchanged by one AdamW step."""
    torch.manual_seed(0)
    base = linear4bit_from_linear(nn.Linear(size, size, bias=False))
    x = torch.randn(8, size)
    torch.manual_seed(1)
    dtype = torch.float32 if variant == "float32" else torch.bfloat16
    layer = QDoRALinear(base, r=r, alpha=2 * r, adapter_dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    before = layer.lora_A.detach().float().clone()
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if variant == "bfloat16":
        optimizer = MasterWeights(optimizer)
    layer(x).pow(2).mean().backward()
    optimizer.step()
    trained = layer.lora_A.detach().float()
    if isinstance(optimizer, MasterWeights):
        trained = next(master for p, master in optimizer.pairs if p is layer.lora_A)
    return (trained == before).float().mean().item()


def short_run(variant: str, model: Path, data: Path, out: Path, steps: int, lr: float) -> dict:
    cfg = TrainConfig(model=str(model), data=str(data), out=str(out), method="qdora", r=16, alpha=32, dropout=0.05,
                      lr=lr, max_steps=steps, batch_size=4, cutoff_len=256, warmup_steps=max(1, steps // 10),
                      save_every=steps, schedule="constant", seed=0, progress=False,
                      adapter_dtype="float32" if variant == "float32" else "bfloat16")
    if variant.endswith("no master copies"):
        with mock.patch("qdora.train.setup.needs_master_weights", return_value=False):
            summary = train(cfg)
    else:
        summary = train(cfg)
    # lora_B and the magnitude offsets start at zero: their final values are how far the run moved them
    adapter = {n: p.detach().float().clone() for n, p in summary["model"].named_parameters()
               if n.endswith(("lora_B", "magnitude_delta"))}
    return {"losses": [m["loss"] for m in read_metrics(out)], "adapter": adapter}


def _norm(tensors: dict) -> float:
    return sum(t.pow(2).sum().item() for t in tensors.values()) ** 0.5


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m qdora.eval.bench.adapter_dtype", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--out", default="runs/adapter-dtype")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists and is not empty; pass another --out or delete it", file=sys.stderr)
        return 2

    print("first AdamW step, SmolLM2-sized lora_A (576 x 16): trained values left unchanged")
    first = {v: {lr: first_step_unchanged(v, lr) for lr in (1e-4, 5e-5, 2e-5)} for v in VARIANTS}
    print("| adapters | lr 1e-4 | lr 5e-5 | lr 2e-5 |\n|---|---|---|---|")
    for v, row in first.items():
        print(f"| {v} | " + " | ".join(f"{row[lr]:.1%}" for lr in row) + " |")

    out.mkdir(parents=True, exist_ok=True)
    model = convert_gguf(smollm2_gguf_path(), False)
    data = out / "train.jsonl"
    write_chat_data(demo_choices("arc_easy_train.json"), data)
    runs = {v: short_run(v, model, data, out / v.replace(", ", "-").replace(" ", "-"), args.steps, args.lr)
            for v in VARIANTS}
    print(f"\n{args.steps} steps of 4 chats, lr {args.lr:g} (constant after warmup), SmolLM2-135M, QDoRA r=16")
    print("| step | " + " | ".join(VARIANTS) + " |\n|---|---|---|---|")
    for i in range(0, args.steps, max(1, args.steps // 8)):
        print(f"| {i + 1} | " + " | ".join(f"{runs[v]['losses'][i]:.4f}" for v in VARIANTS) + " |")
    last = {v: sum(runs[v]["losses"][-10:]) / len(runs[v]["losses"][-10:]) for v in VARIANTS}
    print("| mean of the last 10 | " + " | ".join(f"{last[v]:.4f}" for v in VARIANTS) + " |")
    reference = runs["float32"]["adapter"]
    gaps = {v: _norm({k: runs[v]["adapter"][k] - reference[k] for k in reference}) / _norm(reference)
            for v in VARIANTS[1:]}
    for v, gap in gaps.items():
        print(f"{v}: lora_B and magnitude offsets end {gap:.1%} (of the fp32 run's own size) away from the fp32 run's")
    record = {"first_step_unchanged": {v: {str(k): x for k, x in row.items()} for v, row in first.items()},
              "losses": {v: runs[v]["losses"] for v in VARIANTS}, "gap_to_fp32": gaps,
              "steps": args.steps, "lr": args.lr}
    write_text_atomic(out / "adapter_dtype.json", json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
