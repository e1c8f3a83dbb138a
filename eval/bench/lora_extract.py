"""LoRA extraction (`qdora merge --format lora`): rank against the share of the adapter's effect kept,
beside the bf16 and NF4 merges; the randomized SVD against the exact one; and the time it takes.

    python -m qdora.eval.bench.lora_extract --model BASE --adapter ADAPTER [--ranks 4,8,16,32]
        [--energies 0.9,0.99] [--texts 24] [--out runs/lora-extract]
    python -m qdora.eval.bench.lora_extract --timing [--timing-layers 2]

The first form loads the base as the adapter was trained (NF4 for qdora/qlora), loads the adapter,
and for each rank (and energy) extracts a LoRA, serves it through `peft.PeftModel` on that base,
and compares it with the adapted model on the held-out texts (`qdora.export.drift`): the drift (mean
total-variation distance), the adapter's own effect, the share of the effect kept
(`1 − drift / effect`), argmax agreement and perplexity; then the same for the bf16 and NF4 merges.
`--timing` times the extraction of Llama-3-8B-shaped layers (NF4 base, DoRA change of rank 16 plus
a full-rank magnitude term) with the randomized SVD, and one layer with the exact SVD.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from qdora.core.layer import QDoRALinear
from qdora.core.nf4 import linear4bit_from_linear
from qdora.core.safetensors_io import write_text_atomic
from qdora.export.drift import adapter_effect, compare, held_out_texts, load_export, token_groups
from qdora.export.lora import extract_lora, layer_delta, save_lora, truncated_svd
from qdora.export.merge import merge_and_save
from qdora.export.nf4 import save_nf4
from qdora.models.adapter_io import adapter_config, load_adapter, read_adapter
from qdora.models.loading import load_model
from qdora.options import Parser

LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
             "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
"""(out, in) of each projection of a Llama-3-8B decoder layer (32 layers)."""


def _figures(result: dict, effect: dict) -> dict:
    held = result["held-out"]
    return {"tv": held["tv_mean"], "kept": 1 - held["tv_mean"] / effect["held-out"]["tv_mean"],
            "argmax": held["argmax_agree"], "ppl": held["ppl"], "ppl_ref": held["ppl_ref"]}


def quality(base: str, adapter: str, ranks: list[int], energies: list[float], texts: int, out: Path) -> dict:
    fmt, meta, modules = read_adapter(adapter)
    cfg = adapter_config(fmt, meta, modules, quantized=True)
    model, tokenizer = load_model(base, method=cfg.method, cfg=cfg, add=False, progress=False)
    load_adapter(model, adapter, verbose=False)
    model.eval()
    groups = token_groups(tokenizer, held_out_texts(texts))
    effect = adapter_effect(model, groups)
    rows = {"effect_tv": effect["held-out"]["tv_mean"]}
    import peft  # optional (the `peft` extra): the LoRA is served as PEFT serves it

    def served(path):
        trained_base, _ = load_model(base, method=cfg.method, cfg=cfg, add=False, progress=False)
        return peft.PeftModel.from_pretrained(trained_base, path).eval()

    settings = [("rank", k) for k in ranks] + [("energy", e) for e in energies]
    for kind, value in settings:
        for exact in (None, False) if kind == "rank" and value == 16 else (None,):
            extraction = extract_lora(model, **{kind: value}, exact=exact)
            path = save_lora(extraction, out / f"lora-{kind}-{value}{'-randomized' if exact is False else ''}",
                             overwrite=True)
            label = f"{kind} {value}" + (" (randomized SVD)" if exact is False else "")
            ranks_used = sorted(extraction.ranks.values())
            left = sorted((1 - kept) ** 0.5 for kept in extraction.kept.values())
            rows[label] = {**_figures(compare(model, served(path), groups), effect),
                           "median_rank": ranks_used[len(ranks_used) // 2], "max_rank": ranks_used[-1],
                           "median_norm_left": left[len(left) // 2], "seconds": extraction.seconds,
                           "bytes": (path / "adapter_model.safetensors").stat().st_size}
            print(label, json.dumps(rows[label]), flush=True)
    with tempfile.TemporaryDirectory(dir=out) as d:
        for label, write, fmt_name in (
                ("bf16 merge", lambda p: merge_and_save(model, p, tokenizer=tokenizer), "safetensors"),
                ("NF4 merge", lambda p: save_nf4(model, p, tokenizer), "nf4")):
            path = write(Path(d) / fmt_name)
            rows[label] = _figures(compare(model, load_export(path, fmt_name), groups), effect)
            print(label, json.dumps(rows[label]), flush=True)
    return rows


def timing(layers: int) -> dict:
    """Seconds per Llama-3-8B-shaped projection (NF4 base, a DoRA change), randomized at rank 16,
    over `layers` decoder layers' worth, and one q_proj with the exact SVD."""
    torch.manual_seed(0)
    found: dict[str, list[float]] = {}
    accuracy = {}
    for _ in range(layers):
        for name, (o, i) in LLAMA3_8B.items():
            base = linear4bit_from_linear(nn.Linear(i, o, bias=False))
            layer = QDoRALinear(base, r=16, alpha=32, adapter_dtype=torch.float32)
            with torch.no_grad():
                layer.lora_B.normal_(0, 1e-3)
                layer.magnitude_delta.normal_(0, 1e-4)
            t0 = time.perf_counter()
            delta = layer_delta(layer)
            t1 = time.perf_counter()
            truncated_svd(delta, 16, exact=False)
            t2 = time.perf_counter()
            found.setdefault(name, []).append((t1 - t0, t2 - t1))
            if name == "q_proj" and "q_proj exact" not in found:
                fast = truncated_svd(delta, 16, exact=False)
                t3 = time.perf_counter()
                exact = truncated_svd(delta, 16, exact=True)
                found["q_proj exact"] = [(0.0, time.perf_counter() - t3)]
                left = [(delta - U @ torch.diag(S) @ V.T).norm().item() for U, S, V in (fast, exact)]
                accuracy = {"residual_ratio": left[0] / left[1],
                            "singular_values_max_rel": ((fast[1] - exact[1]).abs() / exact[1]).max().item(),
                            "energy_kept_exact": 1 - left[1] ** 2 / delta.norm().item() ** 2}
            del delta, layer, base
    table = {name: {"delta_s": statistics.median(d for d, _ in v), "svd_s": statistics.median(s for _, s in v)}
             for name, v in found.items()}
    per_layer = sum(t["delta_s"] + t["svd_s"] for n, t in table.items() if n in LLAMA3_8B)
    return {"per_projection": table, "decoder_layer_s": per_layer, "model_s_32_layers": 32 * per_layer,
            "q_proj_randomized_vs_exact": accuracy}


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m qdora.eval.bench.lora_extract", description=__doc__.split("\n")[0])
    p.add_argument("--model")
    p.add_argument("--adapter")
    p.add_argument("--ranks", default="4,8,16,32")
    p.add_argument("--energies", default="0.9,0.99")
    p.add_argument("--texts", type=int, default=24)
    p.add_argument("--out", default="runs/lora-extract")
    p.add_argument("--timing", action="store_true")
    p.add_argument("--timing-layers", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.timing:
        result = timing(args.timing_layers)
        print(json.dumps(result, indent=1))
        write_text_atomic(out / "timing.json", json.dumps(result, indent=1) + "\n")
        return 0
    if not (args.model and args.adapter):
        p.error("--model and --adapter are required (or --timing)")
    ranks = [int(k) for k in args.ranks.split(",") if k]
    energies = [float(e) for e in args.energies.split(",") if e]
    result = quality(args.model, args.adapter, ranks, energies, args.texts, out)
    write_text_atomic(out / "quality.json", json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
