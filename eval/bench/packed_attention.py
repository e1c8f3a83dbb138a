"""The heap a packed row's attention takes: transformers' SDPA (with the block-diagonal `T × T` mask it builds
for a packed row) against `qdora.packed_sdpa` (SDPA over each packed sequence, no mask), on the forward of a small
random Llama (2 layers, hidden 64) over one row of `--tokens` tokens in `--sequences` equal sequences. With
`--window W`, the same shapes as Mistral with a sliding window of W tokens, whose mask transformers builds `T × T`
even for one sequence (qdora_sdpa: blocks of W queries). The heap's high-water mark by memray
(`qdora.eval.bench.memory.heap_peak_bytes`), so the mask's build temporaries count too.

With `--softcap`, Gemma 2's soft-capped scores: a training step (forward and backward) of a random 4-layer Gemma 2
(hidden 256, 8 query heads of 32 on 4 key heads, windowed and global layers alternating; `--window`, default 512)
on one sequence of `--tokens` tokens, on transformers' eager attention (its `heads × T × T` scores kept for the
backward) and on qdora_softcap's tiles: the heap's high-water mark of a step, and the mean time of 3 steps after
one to warm up (run it alone: the time is a measurement).

    python -m qdora.eval.bench.packed_attention --tokens 32768 --sequences 8
    python -m qdora.eval.bench.packed_attention --tokens 32768 --sequences 1 --window 4096
    python -m qdora.eval.bench.packed_attention --softcap --tokens 4096
    python -m qdora.eval.bench.packed_attention --softcap --no-eager --tokens 16384
"""

from __future__ import annotations

import argparse
import time

import torch

from qdora.eval.bench.memory import heap_peak_bytes
from qdora.models.packed_attention import packed_sdpa
from qdora.options import Parser


def measure(tokens: int, sequences: int, window: int | None = None) -> dict:
    import transformers  # heavy, used here only

    torch.manual_seed(0)
    shape = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=tokens, attn_implementation="sdpa")
    config = (transformers.LlamaConfig(**shape) if window is None
              else transformers.MistralConfig(**shape, sliding_window=window))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 97, (1, tokens))
    pos = torch.arange(tokens).remainder(-(-tokens // sequences))[None]

    def forward():
        with torch.no_grad():
            model(input_ids=ids, position_ids=pos, use_cache=False)

    masked = heap_peak_bytes(forward)
    packed_sdpa(model)
    return {"tokens": tokens, "sequences": sequences, "window": window, "sdpa_bytes": masked,
            "packed_sdpa_bytes": heap_peak_bytes(forward)}


def measure_softcap(tokens: int, window: int = 512, steps: int = 3, eager: bool = True) -> dict:
    """Heap peak and mean seconds of a Gemma 2 training step on eager attention (unless `eager` is False) and on
    qdora_softcap."""
    import transformers  # heavy, used here only

    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                       query_pre_attn_scalar=32, sliding_window=window, max_position_embeddings=tokens,
                                       attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(0, 4096, (1, tokens))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, use_cache=False).logits.float().mean().backward()

    out = {"tokens": tokens, "window": window}
    for name in ("eager", "qdora_softcap") if eager else ("qdora_softcap",):
        if name == "qdora_softcap":
            packed_sdpa(model)
        out[f"{name}_bytes"] = heap_peak_bytes(step)  # (also the warm-up)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        out[f"{name}_seconds"] = (time.perf_counter() - start) / steps
    return out


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m qdora.eval.bench.packed_attention", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768, help="tokens of the packed row (default: %(default)s)")
    p.add_argument("--sequences", type=int, default=8, help="sequences packed in it (default: %(default)s)")
    p.add_argument("--window", type=int, help="a sliding window of this many tokens (Mistral's shapes; default: none; "
                   "with --softcap, Gemma 2's windowed layers: 512)")
    p.add_argument("--softcap", action="store_true", help="Gemma 2's soft-capped scores: a training step's heap and "
                   "time on eager attention and on qdora_softcap")
    p.add_argument("--no-eager", action="store_true", help="with --softcap, qdora_softcap alone (eager's scores "
                   "outgrow the memory first: 5.3 GiB of heap at 4,096 tokens here, four times that at 8,192)")
    args = p.parse_args(argv)
    if args.tokens < 2 or not 1 <= args.sequences <= args.tokens:
        p.error(f"--tokens={args.tokens} must be >= 2 and --sequences={args.sequences} between 1 and --tokens")
    if args.no_eager and not args.softcap:
        p.error("--no-eager goes with --softcap (the soft-capped attention's measurement)")
    if args.window is not None and args.window < 1:
        p.error(f"--window={args.window} must be >= 1 (or left out: no sliding window)")
    if args.softcap:
        r = measure_softcap(args.tokens, args.window or 512, eager=not args.no_eager)
        eager = (f"eager {r['eager_bytes'] / 2**20:,.1f} MiB, {r['eager_seconds']:.3f} s; " if "eager_bytes" in r
                 else "")
        ratio = f" ({r['qdora_softcap_seconds'] / r['eager_seconds']:.2f}x eager's time)" if eager else ""
        print(f"Gemma 2, {r['tokens']:,} tokens, a {r['window']:,}-token window on half the layers, a training step "
              f"(heap peak, time): {eager}qdora_softcap {r['qdora_softcap_bytes'] / 2**20:,.1f} MiB, "
              f"{r['qdora_softcap_seconds']:.3f} s{ratio}")
        return 0
    r = measure(args.tokens, args.sequences, args.window)
    window = f", a {r['window']:,}-token sliding window" if r["window"] else ""
    sequences = f"{r['sequences']} sequence{'s' if r['sequences'] != 1 else ''}"
    print(f"{r['tokens']:,} tokens in {sequences}{window}: transformers' SDPA "
          f"{r['sdpa_bytes'] / 2**20:,.1f} MiB, qdora.packed_sdpa {r['packed_sdpa_bytes'] / 2**20:,.1f} MiB "
          "of heap at the peak")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
