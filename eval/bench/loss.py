"""`qdora bench loss`: the LM head and cross-entropy of a long sequence, by each kernel of
`qdora.core.loss` (qdora's torch chunks, Liger's fused linear cross-entropy, Cut Cross-Entropy) beside the
whole logits (transformers' path): time of the forward and backward, peak memory above the inputs, and the
error of the loss and of the hidden states' gradient against an fp64 oracle.

The default shape is Llama-3-8B's head (hidden 4096, vocabulary 128,256) at 8,192 tokens in bf16, the head
frozen as QDoRA keeps it (`--train-head`: its gradient too, fp32 accumulation). The errors are taken on the
first `--check-tokens` rows (the fp64 logits of all 8,192 would take 8 GiB), relative to the largest entry of
the oracle's gradient. Which library becomes the CUDA default is decided on these figures from a GPU
(`scripts/gpu-check.sh` runs this as its `loss` part); on CPU only the torch path and the whole logits run.

    qdora bench loss                                   # CUDA: every kernel whose library is installed
    qdora bench loss --tokens 1024 --hidden 576 --vocab 49152 --reps 2   # CPU, SmolLM2's head
"""

from __future__ import annotations

import argparse
import json

import torch

from qdora.core.loss import LOSS_KERNELS, check_loss_kernel, chunked_cross_entropy, cross_entropy_reference
from qdora.core.safetensors_io import write_text_atomic
from qdora.eval.bench.kernels import time_ms
from qdora.eval.bench.memory import peak_bytes, step_peak_bytes
from qdora.options import Parser

VARIANTS = ("whole",) + LOSS_KERNELS
"""`whole`: the unchunked logits, upcast to fp32, and `F.cross_entropy` (transformers' loss); then each kernel."""


def inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, train_head: bool,
           seed: int = 0):
    """Hidden states, head weight and labels of one long sequence (a tenth of the labels ignored: a prompt)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(tokens, hidden, device=device, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(vocab, hidden, device=device, generator=g) * hidden ** -0.5).to(dtype)
    y = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    y[: tokens // 10] = -100
    return h, W.requires_grad_(train_head), y


def loss_of(variant: str, h, W, y) -> torch.Tensor:
    if variant == "whole":
        return cross_entropy_reference(h, W, y)
    return chunked_cross_entropy(h, W, y, kernel=variant)


def errors(variant: str, h, W, y, check_tokens: int) -> dict:
    """Relative errors of the loss and of `dh` (and `dW` if the head trains) on the first rows, against fp64."""
    hs, ys = h.detach()[:check_tokens].requires_grad_(), y[:check_tokens]
    Ws = W.detach().requires_grad_(W.requires_grad)
    leaves = [hs] + ([Ws] if W.requires_grad else [])
    loss = loss_of(variant, hs, Ws, ys)
    grads = torch.autograd.grad(loss, leaves)
    h64, W64 = hs.detach().double().requires_grad_(), Ws.detach().double().requires_grad_(W.requires_grad)
    ref = cross_entropy_reference(h64, W64, ys)  # in fp64: the tests' oracle
    refs = torch.autograd.grad(ref, [h64] + ([W64] if W.requires_grad else []))
    out = {"loss_rel_err": abs(loss.item() - ref.item()) / abs(ref.item())}
    for name, g, r in zip(("dh", "dW"), grads, refs):
        out[f"{name}_rel_err"] = ((g.double() - r).abs().max() / r.abs().max()).item()
    return out


def bench_variant(variant: str, tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device,
                  reps: int, train_head: bool, check_tokens: int) -> dict:
    h, W, y = inputs(tokens, hidden, vocab, dtype, device, train_head)
    leaves = [h] + ([W] if train_head else [])

    def step():
        grads = torch.autograd.grad(loss_of(variant, h, W, y), leaves)
        del grads

    step()  # compiles a library's kernels, warms the allocator
    row = {"variant": variant, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": str(dtype).split(".")[-1],
           "train_head": train_head, "device": str(device)}
    row["peak_bytes"] = peak_bytes(step, device) if device.type == "cuda" else step_peak_bytes(step)
    row["ms"] = time_ms(step, device, reps)
    row.update(errors(variant, h, W, y, min(check_tokens, tokens)))
    return row


def format_markdown(rows: list[dict]) -> str:
    r0 = rows[0]
    out = [f"{r0['tokens']:,} tokens, hidden {r0['hidden']:,}, vocabulary {r0['vocab']:,}, {r0['dtype']}, head "
           f"{'trained' if r0['train_head'] else 'frozen'}, {r0['device']}", "",
           "| loss | forward + backward (ms) | peak (MiB) | loss error | dh error |"
           + (" dW error |" if r0["train_head"] else ""),
           "|---|---:|---:|---:|---:|" + ("---:|" if r0["train_head"] else "")]
    for r in rows:
        out.append(f"| {r['variant']} | {r['ms']:.1f} | {r['peak_bytes'] / 2**20:,.1f} | {r['loss_rel_err']:.1e} | "
                   f"{r['dh_rel_err']:.1e} |" + (f" {r['dW_rel_err']:.1e} |" if r0["train_head"] else ""))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = Parser(prog="qdora bench loss", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the sequence (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=4096, help="the head's input features (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary (default: %(default)s)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16" if cuda else "float32",
                   help="the hidden states' and head's dtype (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS if cuda else ("whole", "torch")),
                   help="comma-separated, of " + ", ".join(VARIANTS) + " (default: %(default)s; a library that is "
                        "not installed is skipped, said in one line)")
    p.add_argument("--train-head", action="store_true", help="the head trains too (its gradient, fp32 accumulation)")
    p.add_argument("--check-tokens", type=int, default=1024, help="rows of the fp64 check (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed runs on CPU (default: %(default)s)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    for name in ("tokens", "hidden", "vocab", "check_tokens", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        p.error(f"--variants: {bad[0] if bad else 'none given'}; use some of {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    if device.type != "cuda" and set(variants) - {"whole", "torch"}:
        p.error(f"--variants {args.variants}: liger and cce run on CUDA, the device is {device.type}")
    dtype = getattr(torch, args.dtype)
    rows = []
    for variant in variants:
        if variant in ("liger", "cce"):
            try:
                check_loss_kernel(variant)
            except ValueError as e:
                print(f"skipped {variant}: {e}", flush=True)
                continue
        rows.append(bench_variant(variant, args.tokens, args.hidden, args.vocab, dtype, device, args.reps,
                                  args.train_head, args.check_tokens))
        print(f"{variant}: {rows[-1]['ms']:.1f} ms, {rows[-1]['peak_bytes'] / 2**20:,.1f} MiB", flush=True)
        if args.json:  # after every variant: a run stopped part-way keeps what it measured
            write_text_atomic(args.json, json.dumps(rows, indent=1) + "\n")
    if rows:
        print(format_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
