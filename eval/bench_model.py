"""`qdora bench model`: training-step time of a whole model, ours vs PEFT, side by side.

The four variants (our qdora and qlora, PEFT's over the same NF4 base) are built once and stepped
round-robin on the same batch, so machine noise hits them alike; medians are reported, the first
(warm-up) step dropped. Default: SmolLM2-135M-Instruct, batch 4 of the bundled ARC-Easy slice,
cutoff 256, r=16, alpha 32, dropout 0.05, gradient checkpointing, fp32 compute on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qdora bench model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant (default: %(default)s)")
    args = p.parse_args(argv)

    import torch

    from qdora.config import AdapterConfig
    from qdora.eval.common import benchmark_model, demo_batch, peft_on_qdora_nf4
    from qdora.loading import load_model
    from qdora.train import prepare_for_training

    path = benchmark_model(args.model)
    models, tok = {}, None
    for name in ("ours qdora", "ours qlora", "peft qdora", "peft qlora"):
        method = name.split()[1]
        cfg = AdapterConfig(method=method, r=args.r, alpha=2 * args.r, dropout=0.05, adapter_dtype="float32")
        if name.startswith("ours"):
            model, tok = load_model(path, method=method, cfg=cfg, progress=False)
        else:
            model, tok = peft_on_qdora_nf4(path, args.r, 2 * args.r, 0.05, method == "qdora", cfg.target_modules)
        prepare_for_training(model)
        models[name] = model
    batch = demo_batch(tok, args.batch_size, args.cutoff_len)
    tokens = int(batch["attention_mask"].sum())
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.reps + 1):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"{tokens} tokens per step, {torch.get_num_threads()} threads, median of {args.reps}\n")
    print("| variant | step (s) | tokens/s |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {tokens / v:.0f} |")
    print(f"\n- ours qdora / ours qlora: {med['ours qdora'] / med['ours qlora']:.3f}")
    print(f"- peft qdora / ours qdora: {med['peft qdora'] / med['ours qdora']:.3f}")
    print(f"- peft qlora / ours qlora: {med['peft qlora'] / med['ours qlora']:.3f}")
    print(f"- peft qdora / peft qlora: {med['peft qdora'] / med['peft qlora']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
