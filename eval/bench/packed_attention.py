"""The heap a packed row's attention takes: transformers' SDPA (with the block-diagonal `T × T` mask it builds
for a packed row) against `qdora.packed_sdpa` (SDPA over each packed sequence, no mask), on the forward of a small
random Llama (2 layers, hidden 64) over one row of `--tokens` tokens in `--sequences` equal sequences. With
`--window W`, the same shapes as Mistral with a sliding window of W tokens, whose mask transformers builds `T × T`
even for one sequence (qdora_sdpa: blocks of W queries). The heap's high-water mark by memray
(`qdora.eval.bench.memory.heap_peak_bytes`), so the mask's build temporaries count too.

With `--softcap`, Gemma 2's soft-capped scores: a training step (forward and backward) of a random 4-layer Gemma 2
(hidden 256, 8 query heads of 32 on 4 key heads, windowed and global layers alternating; `--window`, default 512)
on one sequence of `--tokens` tokens, on transformers' eager attention (its `heads × T × T` scores kept for the
backward) and on qdora_softcap's tiles (`--tile-mib`: several tile sizes, one after another): the step's peak
memory (on CPU the heap's high-water mark; on CUDA, `--device cuda`, in bf16, the allocator's peak of tensor bytes)
and the mean time of 3 steps after the measured one (run it alone: the time is a measurement).

With `--softcap --prefill`, the same Gemma 2 serving a prompt: one forward of `--tokens` tokens without gradients
into an empty cache, as `qdora chat` and `qdora serve` prefill it, on eager attention and on qdora_softcap (the
heap's peak, and the time of one more such forward).

With `--padded`, rows padded on the right (a preference batch's chosen and rejected replies, or unpacked rows of
different lengths): a training step of the same Llama with 4 layers, on 2 rows of `--tokens` tokens, the second
padded over its last quarter, given the attention mask (transformers' SDPA, with its `(rows, 1, T, T)` mask, which
each layer's SDPA also keeps for the backward) and without it (what `qdora train` gives such a model:
`qdora.models.packed_attention.unmasked_padding`): the heap's peak and the mean time of 3 steps after it (run it
alone: the time is a measurement).

    python -m qdora.eval.bench.packed_attention --tokens 32768 --sequences 8
    python -m qdora.eval.bench.packed_attention --tokens 32768 --sequences 1 --window 4096
    python -m qdora.eval.bench.packed_attention --padded --tokens 8192
    python -m qdora.eval.bench.packed_attention --softcap --tokens 4096
    python -m qdora.eval.bench.packed_attention --softcap --prefill --tokens 8192
    python -m qdora.eval.bench.packed_attention --softcap --no-eager --tokens 16384
    python -m qdora.eval.bench.packed_attention --softcap --device cuda --tokens 16384 --tile-mib 32,128,512
"""

from __future__ import annotations

import argparse
import time

import torch

from qdora.eval.bench.memory import heap_peak_bytes, peak_bytes
from qdora.models.packed_attention import packed_sdpa
from qdora.models.shapes import SOFTCAP_TILE_BYTES
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


def measure_padded(tokens: int, steps: int = 3) -> dict:
    """The heap's peak and the mean time of `steps` more training steps over 2 rows of `tokens` tokens, the second
    padded over its last quarter, with the attention mask and without it (the real tokens' loss is the same:
    `tests/test_packed_attention.py`)."""
    import transformers  # heavy, used here only

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=tokens, attn_implementation="sdpa")).train()
    ids = torch.randint(3, 97, (2, tokens))
    mask = torch.ones_like(ids)
    mask[1, tokens - tokens // 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def step(attention_mask):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss.backward()

    out = {"tokens": tokens}
    for name, attention_mask in (("masked", mask), ("unmasked", None)):
        out[f"{name}_bytes"] = heap_peak_bytes(lambda: step(attention_mask))  # also the warm-up
        start = time.perf_counter()
        for _ in range(steps):
            step(attention_mask)
        out[f"{name}_seconds"] = (time.perf_counter() - start) / steps
    return out


def gemma2_config(tokens: int, window: int):
    """The soft-capped measurements' Gemma 2: 4 layers, hidden 256, 8 query heads of 32 on 4 key heads, `window` on
    every other layer, on transformers' eager attention."""
    import transformers  # heavy, used here only

    return transformers.Gemma2Config(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                     query_pre_attn_scalar=32, sliding_window=window,
                                     max_position_embeddings=tokens, attn_implementation="eager")


def measure_softcap(tokens: int, window: int = 512, steps: int = 3, eager: bool = True, device: str = "cpu",
                    tiles_mib: tuple[int, ...] = ()) -> dict:
    """Peak memory and mean seconds of a Gemma 2 training step on eager attention (unless `eager` is False) and on
    qdora_softcap, once per tile size in `tiles_mib` (MiB of fp32 scores a tile; none: the device's default,
    `qdora.models.shapes.SOFTCAP_TILE_BYTES`). On CPU in fp32, the heap's peak (memray); on CUDA in bf16, the peak of
    tensor bytes a step allocates (the allocator's counters)."""
    import transformers  # heavy, used here only

    dev = torch.device(device)
    torch.manual_seed(0)
    config = gemma2_config(tokens, window)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dev, torch.bfloat16 if dev.type == "cuda"
                                                                      else torch.float32).train()
    ids = torch.randint(0, 4096, (1, tokens), device=dev)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, use_cache=False).logits.float().mean().backward()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def measure(name: str) -> None:
        out[f"{name}_bytes"] = (peak_bytes(step, dev) if dev.type == "cuda" else heap_peak_bytes(step))  # + warm-up
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        out[f"{name}_seconds"] = (time.perf_counter() - start) / steps

    out = {"tokens": tokens, "window": window, "device": dev.type}
    if eager:
        measure("eager")
    packed_sdpa(model)
    kind = "cpu" if dev.type == "cpu" else "cuda"
    default = SOFTCAP_TILE_BYTES[kind]
    try:
        for mib in tiles_mib or (default >> 20,):
            SOFTCAP_TILE_BYTES[kind] = mib << 20
            measure("qdora_softcap" if not tiles_mib else f"qdora_softcap_{mib}mib")
    finally:
        SOFTCAP_TILE_BYTES[kind] = default
    return out


def measure_prefill(tokens: int, window: int = 512) -> dict:
    """Heap peak and seconds of a Gemma 2 prefill (`measure_softcap`'s model, no gradients, an empty cache) of
    `tokens` tokens, on eager attention and on qdora_softcap."""
    import transformers  # heavy, used here only

    torch.manual_seed(0)
    config = gemma2_config(tokens, window)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 4096, (1, tokens))

    def prefill():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                  past_key_values=transformers.DynamicCache(config=config), logits_to_keep=1)

    out = {"tokens": tokens, "window": window}
    for name in ("eager", "qdora_softcap"):
        if name == "qdora_softcap":
            packed_sdpa(model)
        out[f"{name}_bytes"] = heap_peak_bytes(prefill)
        start = time.perf_counter()
        prefill()
        out[f"{name}_seconds"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m qdora.eval.bench.packed_attention", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768, help="tokens of the packed row (default: %(default)s)")
    p.add_argument("--sequences", type=int, default=8, help="sequences packed in it (default: %(default)s)")
    p.add_argument("--window", type=int, help="a sliding window of this many tokens (Mistral's shapes; default: none; "
                   "with --softcap, Gemma 2's windowed layers: 512)")
    p.add_argument("--padded", action="store_true", help="2 rows padded on the right: a training step's heap with "
                   "the attention mask and without it")
    p.add_argument("--softcap", action="store_true", help="Gemma 2's soft-capped scores: a training step's heap and "
                   "time on eager attention and on qdora_softcap")
    p.add_argument("--prefill", action="store_true", help="with --softcap, a serving prefill (no gradients, a cache) "
                   "instead of a training step")
    p.add_argument("--no-eager", action="store_true", help="with --softcap, qdora_softcap alone (eager's scores "
                   "outgrow the memory first: 5.3 GiB of heap at 4,096 tokens here, four times that at 8,192)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="with --softcap: cpu (fp32, the heap's "
                   "peak) or cuda (bf16, the allocator's peak of tensor bytes); default: %(default)s")
    p.add_argument("--tile-mib", default="", help="with --softcap: comma-separated tile sizes (MiB of fp32 scores "
                   "a tile) to time qdora_softcap with, one after another (default: the device's, 4 on CPU, 128 on "
                   "CUDA)")
    args = p.parse_args(argv)
    if args.tokens < 2 or not 1 <= args.sequences <= args.tokens:
        p.error(f"--tokens={args.tokens} must be >= 2 and --sequences={args.sequences} between 1 and --tokens")
    if (args.no_eager or args.device != "cpu" or args.tile_mib or args.prefill) and not args.softcap:
        p.error("--no-eager, --device, --tile-mib and --prefill go with --softcap (the soft-capped attention's "
                "measurement)")
    if args.prefill and (args.no_eager or args.device != "cpu" or args.tile_mib):
        p.error("--prefill measures eager attention and qdora_softcap on the CPU; it goes with none of --no-eager, "
                "--device and --tile-mib")
    try:
        tiles = tuple(int(x) for x in args.tile_mib.split(",") if x.strip())
    except ValueError:
        tiles = (0,)
    if any(t < 1 for t in tiles):
        p.error(f"--tile-mib={args.tile_mib!r} must be comma-separated whole numbers of MiB, each >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here; leave --device out to measure on the CPU")
    if args.window is not None and args.window < 1:
        p.error(f"--window={args.window} must be >= 1 (or left out: no sliding window)")
    if args.padded and (args.softcap or args.window is not None):
        p.error("--padded measures a Llama's padded rows; it goes with neither --softcap nor --window")
    if args.padded:
        r = measure_padded(args.tokens)
        masked, unmasked = r["masked_bytes"] / 2**20, r["unmasked_bytes"] / 2**20
        print(f"2 rows of {r['tokens']:,} tokens, one padded over its last quarter, a training step (heap peak, "
              f"time): with the attention mask {masked:,.1f} MiB, {r['masked_seconds']:.3f} s; without it "
              f"{unmasked:,.1f} MiB, {r['unmasked_seconds']:.3f} s")
        return 0
    if args.prefill:
        r = measure_prefill(args.tokens, args.window or 512)
        print(f"Gemma 2, {r['tokens']:,} tokens, a {r['window']:,}-token window on half the layers, a prefill "
              f"(heap peak, time): eager {r['eager_bytes'] / 2**20:,.1f} MiB, {r['eager_seconds']:.3f} s; "
              f"qdora_softcap {r['qdora_softcap_bytes'] / 2**20:,.1f} MiB, {r['qdora_softcap_seconds']:.3f} s")
        return 0
    if args.softcap:
        r = measure_softcap(args.tokens, args.window or 512, eager=not args.no_eager, device=args.device,
                            tiles_mib=tiles)
        memory = "heap peak" if args.device == "cpu" else "peak of tensor bytes"
        runs = [(name.removesuffix("_bytes"), r[name], r[name.replace("_bytes", "_seconds")]) for name in r
                if name.endswith("_bytes")]
        eager_s = r.get("eager_seconds")
        parts = [f"{name.replace('qdora_softcap_', 'qdora_softcap, ').replace('mib', ' MiB tiles')} "
                 f"{nbytes / 2**20:,.1f} MiB, {seconds:.3f} s"
                 + (f" ({seconds / eager_s:.2f}x eager's time)" if eager_s and name != "eager" else "")
                 for name, nbytes, seconds in runs]
        print(f"Gemma 2, {r['tokens']:,} tokens, a {r['window']:,}-token window on half the layers, a training step "
              f"on {args.device} ({memory}, time): " + "; ".join(parts))
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
