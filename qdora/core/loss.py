r"""The language-model loss without the whole logits: the LM head and the cross-entropy, chunk by chunk.

Notation (tokens flattened to `N` rows, already shifted so that row `i` predicts label `y_i`):

    h (N, H)     the LM head's input (the decoder's output after its final norm)
    W (V, H)     the head's weight, b (V,) its bias if any;  y (N,) labels, `ignore_index` = no loss
    z  = h·Wᵀ + b                    (N, V) in the compute dtype, then fp32 (transformers' `.float()`)
    ℓ  = c·tanh(z / c)               final logit soft-capping (Gemma 2: c = `final_logit_softcapping`),
                                     or ℓ = z without it
    lse_i = log Σ_v exp(ℓ_iv)
    L  = Σ_{i: y_i ≠ ignore} (lse_i − ℓ_{i,y_i})     the SUM over supervised rows

`L` is a sum, not a mean: the caller divides by its token count (the batch's, or the whole
accumulated step's: transformers' `num_items_in_batch`), so gradient accumulation normalizes as the
unchunked loss does. The forward computes `z`, `ℓ`, `lse` and the target logit for `chunk` rows at a
time and keeps only `lse` (N floats): no `N × V` tensor ever exists, only `chunk × V` ones.

Backward, with `g = ∂Loss/∂L` (a scalar; the caller's 1/count arrives here) and `p = softmax(ℓ_i)`:

    ∂L/∂ℓ_iv = p_iv − [v = y_i]               (0 on ignored rows)
    ∂ℓ/∂z    = 1 − tanh²(z/c)                 (1 without capping)
    dz = g·(p − onehot(y))·(1 − tanh²(z/c))   recomputed chunk by chunk from h, W and the saved lse
    dh = dz·W                                 rows of the chunk only: nothing accumulates
    dW = Σ_chunks dzᵀ·h_chunk,  db = Σ_chunks Σ_rows dz     fp32 accumulators, only when W (b)
                                                            needs a gradient (a frozen head: never)

The logits are formed in the compute dtype and upcast, as transformers' `lm_head(h).float()` does,
so on fp32 the chunked loss is the unchunked one up to the order of fp32 sums; softmax, lse, the
soft-capping and every accumulation are fp32 (transformers soft-caps in the model's dtype). Memory:
`lse`, and one `chunk × V` fp32 tensor at a time (two in the backward with soft-capping: `tanh` is
kept for its derivative), against the whole logits and their gradient unchunked (`3·N·V·4` bytes at
the peak on fp32, measured in `tests/test_loss.py`). `cross_entropy_reference` beside it is the
unchunked path, the same formula on whole logits with autograd.

`kernel` picks who computes it: "torch" (this module, every device, the reference), or an established
fused kernel library on CUDA, "liger" (liger-kernel's fused linear cross-entropy: Triton, chunked the same
way, fp32 `dW` accumulation asked for) or "cce" (Apple's Cut Cross-Entropy: Triton, the logits only in
on-chip memory; its gradient filtering off, `filter_eps=None`, so that the gradient is exact). Both take
the same sum over supervised rows, so the callers divide it the same way. Which is the CUDA default is for
a measurement on a GPU to say (`qdora bench loss`, `scripts/gpu-check.sh`); until then it is "torch".
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Labels equal to this carry no loss (transformers' and PyTorch's default)."""
DEFAULT_CHUNK_BYTES = 256 << 20
"""Default chunk: as many tokens as make one chunk's fp32 logits 256 MiB (`default_chunk_tokens`)."""


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk whose fp32 logits take `DEFAULT_CHUNK_BYTES`: 2,097 at a 32,000 vocabulary,
    1,365 at 49,152 (SmolLM2), 523 at 128,256 (Llama 3), 262 at 256,000 (Gemma 2). Each chunk's matmul
    is still `chunk × H × V` multiply-adds (hundreds of GFLOP on an 8B model), large enough to run at
    a GPU's full rate, while the backward's temporaries stay under a GiB at any vocabulary."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(1, int(vocab_size))))


def check_chunk_tokens(chunk_tokens, name: str = "chunk_tokens") -> int:
    """`chunk_tokens` as an int ≥ 1, or a one-line ValueError naming the argument and the value."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"{name}={chunk_tokens!r} must be an integer >= 1 (tokens per chunk of the LM "
                         "head and cross-entropy; None sizes it from the vocabulary)")
    return chunk_tokens


LOSS_KERNELS = ("torch", "liger", "cce")
"""Who computes the chunked loss (module docstring): this module's torch code, or a fused CUDA library."""
_KERNEL_PACKAGES = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}


def check_loss_kernel(kernel, name: str = "kernel") -> str:
    """`kernel` if it is one of `LOSS_KERNELS` whose library imports, else a one-line ValueError with the fix."""
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"{name}={kernel!r}: use one of {', '.join(LOSS_KERNELS)}")
    if kernel in _KERNEL_PACKAGES:
        module, dist = _KERNEL_PACKAGES[kernel]
        try:
            __import__(module)
        except ImportError as e:
            raise ValueError(f"{name}={kernel!r} needs {dist} ({e}): pip install {dist}, or use {name}='torch'") \
                from None
    return kernel


def _check_kernel_inputs(kernel: str, h: torch.Tensor, bias, compute_dtype: torch.dtype) -> None:
    """A library kernel's limits, as one line before any work: Triton needs CUDA (or its CPU interpreter,
    `TRITON_INTERPRET=1`, which the tests use for Liger; Cut Cross-Entropy's kernels do not run in it), and Cut
    Cross-Entropy takes no bias and only fp16/bf16 operands."""
    if kernel == "torch":
        return
    interpreted = kernel == "liger" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if h.device.type != "cuda" and not interpreted:
        raise ValueError(f"kernel={kernel!r} runs Triton kernels on CUDA tensors, got {h.device.type}: "
                         "use kernel='torch' there")
    if kernel == "cce" and bias is not None:
        raise ValueError("kernel='cce': Cut Cross-Entropy takes no head bias; use kernel='torch' or 'liger'")
    if kernel == "cce" and compute_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"kernel='cce' computes in fp16 or bf16, the head's matmul is {compute_dtype}: "
                         "train in bf16 (autocast or a bf16 head), or use kernel='torch' or 'liger'")


def _library_cross_entropy(kernel: str, h, W, b, y, softcap, ignore_index, compute_dtype) -> torch.Tensor:
    """The sum over supervised rows by a fused library, its operands cast to the compute dtype first (as the
    torch path computes the head's matmul in it; the casts are differentiable)."""
    with _no_autocast():
        hc, Wc = h.to(compute_dtype), W.to(compute_dtype)
        if kernel == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # optional: loss-kernels

            return liger_fused_linear_cross_entropy(
                hc, Wc, y, None if b is None else b.to(compute_dtype), ignore_index=ignore_index, reduction="sum",
                softcap=softcap, accum_dtype=torch.float32 if W.requires_grad else None)
        from cut_cross_entropy import linear_cross_entropy  # optional: the loss-kernels extra

        return linear_cross_entropy(hc, Wc, y, ignore_index=ignore_index, softcap=softcap, reduction="sum",
                                    filter_eps=None, impl="cce")


def check_softcap(softcap) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
        raise ValueError(f"softcap={softcap!r} must be a positive number or None (no soft-capping)")
    return float(softcap)


def _no_autocast():
    """Autocast off inside the function: it computes in the compute dtype it was given (the one
    autocast chose at the call, if on) and keeps the backward in the same dtypes as the forward."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


def _capped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """`c·tanh(z/c)` in place (transformers' order: divide, tanh, multiply)."""
    return z if softcap is None else z.div_(softcap).tanh_().mul_(softcap)


class ChunkedCrossEntropy(torch.autograd.Function):
    """`L = Σ_{supervised i} (lse_i − ℓ_{i,y_i})`, chunk by chunk; see the module docstring.

    Arguments: `h (N, H)`, `W (V, H)`, `b (V,)` or None, `y (N,)` long, `chunk` (int ≥ 1),
    `softcap` (float or None), `ignore_index`, `compute_dtype` (the dtype of the head's matmul).
    """

    @staticmethod
    def forward(ctx, h, W, b, y, chunk, softcap, ignore_index, compute_dtype):
        with _no_autocast():
            N = h.shape[0]
            Wc = W.to(compute_dtype)
            bc = None if b is None else b.to(compute_dtype)
            lse = torch.empty(N, dtype=torch.float32, device=h.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for r0 in range(0, N, chunk):
                r1 = min(N, r0 + chunk)
                z = _capped(F.linear(h[r0:r1].to(compute_dtype), Wc, bc).float(), softcap)
                yc = y[r0:r1]
                valid = yc != ignore_index
                target = z.gather(1, torch.where(valid, yc, 0)[:, None]).squeeze(1)
                # lse = max + log Σ exp(z − max), as torch.logsumexp, in z's storage (no second chunk × V)
                top = z.amax(dim=1, keepdim=True)
                top = torch.where(torch.isfinite(top), top, 0.0)
                lse[r0:r1] = z.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
                total += torch.where(valid, lse[r0:r1] - target, 0.0).sum()
                del z
        ctx.save_for_backward(h, W, b, y, lse)
        ctx.chunk, ctx.softcap, ctx.ignore_index, ctx.compute_dtype = chunk, softcap, ignore_index, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        h, W, b, y, lse = ctx.saved_tensors
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        chunk, softcap, cd = ctx.chunk, ctx.softcap, ctx.compute_dtype
        with _no_autocast():
            N = h.shape[0]
            Wc = W.to(cd)
            bc = None if b is None else b.to(cd)
            g = grad.float()
            dh = torch.empty_like(h) if need_h else None
            dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_W else None
            db = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need_b else None
            for r0 in range(0, N, chunk):
                r1 = min(N, r0 + chunk)
                hc = h[r0:r1].to(cd)
                z = F.linear(hc, Wc, bc).float()
                yc = y[r0:r1]
                valid = yc != ctx.ignore_index
                t = None
                if softcap is not None:
                    t = z.div_(softcap).tanh_()  # z is now tanh(z/c); ℓ = c·t
                    p = (t * softcap).sub_(lse[r0:r1, None]).exp_()
                else:
                    p = z.sub_(lse[r0:r1, None]).exp_()  # softmax(ℓ), in z's storage
                p.scatter_add_(1, torch.where(valid, yc, 0)[:, None], -valid.float()[:, None])  # − onehot
                p.mul_(g)
                if t is not None:
                    p.mul_(t.square_().neg_().add_(1.0))  # · (1 − tanh²)
                    del t
                dz = p.masked_fill_(~valid[:, None], 0.0)  # ignored rows: exactly 0, NaN-proof
                if need_h:
                    dh[r0:r1] = (dz.to(cd) @ Wc).to(h.dtype)
                if need_W:
                    dW.addmm_(dz.t(), hc.float())
                if need_b:
                    db += dz.sum(0)
                del z, p, dz, hc
        return (dh, None if dW is None else dW.to(W.dtype), None if db is None else db.to(b.dtype),
                None, None, None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, *, chunk_tokens: int | None = None,
                          softcap: float | None = None, ignore_index: int = IGNORE_INDEX,
                          compute_dtype: torch.dtype | None = None, kernel: str = "torch") -> torch.Tensor:
    """The SUM over supervised tokens of `−log softmax(softcap(hidden·weightᵀ + bias))[label]`, computed
    `chunk_tokens` rows at a time (default `default_chunk_tokens(V)`), forward and backward, never
    forming the `tokens × V` logits. `hidden (..., H)` and `labels (...)` are already aligned (shifted);
    divide the result by the token count for a mean. `compute_dtype`: the head's matmul dtype (default
    autocast's, if on, else the weight's). A batch with no supervised token gives 0 and zero gradients.
    `kernel`: "torch" (this module), "liger" or "cce" (CUDA libraries that choose their own chunks; the module
    docstring)."""
    chunk = default_chunk_tokens(weight.shape[0]) if chunk_tokens is None else check_chunk_tokens(chunk_tokens)
    softcap = check_softcap(softcap)
    check_loss_kernel(kernel)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has {hidden.shape[-1]} features, the head's weight {tuple(weight.shape)} "
                         f"takes {weight.shape[1]}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)} "
                         "(shift them first: hidden[..., :-1, :] predicts labels[..., 1:])")
    if compute_dtype is None:
        device = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    _check_kernel_inputs(kernel, hidden, bias, compute_dtype)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    if kernel != "torch":
        if not (y != ignore_index).any():  # the libraries' sums of nothing differ; the contract is 0
            return sum(t[:0].sum() for t in (h, weight, bias) if t is not None).float()
        return _library_cross_entropy(kernel, h, weight, bias, y, softcap, ignore_index, compute_dtype)
    return ChunkedCrossEntropy.apply(h, weight, bias, y, chunk, softcap, ignore_index, compute_dtype)


def cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            bias: torch.Tensor | None = None, *, softcap: float | None = None,
                            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The unchunked path, plain torch with autograd: the whole logits, upcast to fp32 (unless fp64),
    soft-capped, then `F.cross_entropy(..., reduction="sum")`. In fp64 it is the tests' oracle."""
    logits = F.linear(hidden, weight, bias)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=ignore_index, reduction="sum")
