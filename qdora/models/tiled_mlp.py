"""Tiled MLP (ALST, arXiv 2506.13996, "TiledMLP"): after `qdora.tiled_mlp(model)`, each decoder layer's
MLP (or MoE block) runs over tiles of `tile_tokens` tokens, forward and backward, so its working set is
one tile's, not the whole sequence's.

Why: the MLP is per token, and for long sequences its intermediates dominate one layer's memory. Per
token an untiled MLP holds about 3–5 tensors of `intermediate` values (gate, up, silu(gate), their
product, and in backward their gradients): at Llama-3-8B's intermediate 14336 in bf16, ~143 KB per
token (5 × 14336 × 2 bytes), 18.8 GB at 128K tokens, beside 1 GB for the layer's hidden states
(4096 × 2 bytes per token). Tiled, that term is one tile's: 143 KB × `tile_tokens`.

How: the MLP module's `forward` is replaced by an instance attribute (`remove()` restores it) that,
when grad is enabled, something needs a gradient and the call has more than `tile_tokens` tokens,
applies `TiledApply`: the input is flattened to `(tokens, hidden)`; the forward runs the module's own
forward tile by tile under `no_grad` into one preallocated output and saves only the input; the
backward recomputes each tile with grad and takes `torch.autograd.grad` of it, writing the input's
gradient tile by tile and summing the parameters' gradients over tiles. The trainable parameters are
inputs of the Function, so their gradients arrive even when the input needs none (only the MLP is
adapted, or the first layer's input comes from frozen embeddings). Every other call (inference, short
batches) is the module's own forward, unchanged: bit for bit the untiled result.

Cost: the MLP's forward runs once more per step (forward, then the tile recompute in backward; with
gradient checkpointing: forward, checkpoint recompute, tile recompute, three times instead of two).

Exactness: the MLP (or MoE block: router and experts) is per token, so tiling changes no value, only
rounding: a token's output and input gradient are the same sums as untiled (a matmul kernel may block
a tile's rows differently); a parameter's gradient is a sum over tokens taken tile by tile (each
tile's in fp32, or the parameter's dtype if wider, rounded once to the parameter's dtype at the end,
as the untiled matmul rounds once). Dropout inside the MLP (the adapters' `qdora.core.dropout`, any
torch random op) draws the same masks in the recompute as in the forward: the RNG state (CPU's, and
the CUDA device's for CUDA inputs) is saved before each tile and restored for its recompute, as
`torch.utils.checkpoint` does; the autocast state too. The masks are the tiles' draws, in tile
order: the same distribution as untiled, not the same samples (on CPU the same where an MLP masks
one projection and each tile's element count is a multiple of 4, `drop_mask`'s words).

Default tile: `hidden_size` tokens (ALST's choice): one tile's intermediate tensor is then
`hidden × intermediate` values, the size of one MLP weight matrix, whatever the sequence length (at
Llama-3-8B, 4096 tokens × 14336 in bf16: 117 MB each, ~590 MB for the ~5 held).

Not supported: an MoE model that records its router logits (`output_router_logits=True`, for the
load-balancing loss). transformers 5 records them with a forward hook on the router module
(`OutputRecorder` in `_can_record_outputs`), once per call of the router; tiled, the router runs once
per tile under `no_grad`, so the loss gets one `(tile, experts)` tensor per tile instead of one
`(tokens, experts)` per layer, none with a gradient (measured on a tiny Qwen3-MoE, tiles of 5 tokens:
12 tensors of (5, 4) for 2 of (26, 4); the aux loss's value unchanged, the router's gradient wrong; with an
attention mask the loss fails on a shape mismatch). Refused with a one-line `ValueError`: by
`tiled_mlp` when the config asks for them, and at the call when `output_router_logits=True` is given
to the model (calls that are not tiled pass).
"""

from __future__ import annotations

import contextlib
import itertools
import types

import torch
from torch import nn

from qdora.models.head_loss import causal_lm

_MARK = "_qdora_tiled_mlp"
_KEYS = itertools.count()


class TiledApply(torch.autograd.Function):
    """`TiledApply.apply(fn, tile_tokens, x, *params)`: `fn(x)` computed over tiles of `tile_tokens` tokens
    (`x (..., hidden)` flattened to `(tokens, hidden)`, each tile given to `fn` as `(1, …, 1, n, hidden)`,
    the rank of `x`). `params`: the tensors `fn` uses that need a gradient (they get it summed over
    tiles). Saves `x` only; recomputes each tile in backward with the RNG and autocast state it had."""

    @staticmethod
    def forward(ctx, fn, tile_tokens, x, *params):
        flat = x.reshape(-1, x.shape[-1])
        lead = (1,) * (x.dim() - 2)
        out, states = None, []
        cuda = x.device if x.device.type == "cuda" else None
        for start in range(0, flat.shape[0], tile_tokens):
            tile = flat[start:start + tile_tokens]
            states.append((torch.get_rng_state(), None if cuda is None else torch.cuda.get_rng_state(cuda)))
            with torch.no_grad():
                # a copy: a module may scale its input in place (Mixtral's router jitter)
                y = fn(tile.clone().view(*lead, *tile.shape))
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"qdora.tiled_mlp: the MLP returned {type(y).__name__}, not one tensor; "
                                "remove the tiled MLP (handle.remove()) for this model")
            y = y.reshape(tile.shape[0], -1)
            if out is None:
                out = y.new_empty(flat.shape[0], y.shape[1])
            out[start:start + tile.shape[0]] = y
        ctx.fn, ctx.tile_tokens, ctx.params, ctx.states = fn, tile_tokens, params, states
        ctx.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                        for kind in dict.fromkeys(("cpu", x.device.type))]
        ctx.save_for_backward(x)
        return out.view(*x.shape[:-1], out.shape[1])

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        params, tile_tokens = ctx.params, ctx.tile_tokens
        need_x = ctx.needs_input_grad[2]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        flat, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        lead = (1,) * (x.dim() - 2)
        dx = torch.empty(flat.shape, dtype=x.dtype, device=x.device) if need_x else None
        sums: dict[int, torch.Tensor] = {}
        cuda = x.device if x.device.type == "cuda" else None
        for k, start in enumerate(range(0, flat.shape[0], tile_tokens)):
            tile = flat[start:start + tile_tokens].detach().requires_grad_(need_x)
            cpu_state, cuda_state = ctx.states[k]
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.random.fork_rng(devices=[] if cuda is None else [cuda]))
                torch.set_rng_state(cpu_state)
                if cuda is not None:
                    torch.cuda.set_rng_state(cuda_state, cuda)
                for kind, enabled, dtype in ctx.autocast:
                    stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
                stack.enter_context(torch.enable_grad())
                y = ctx.fn(tile.clone().view(*lead, *tile.shape))  # a non-leaf copy: in-place ops stay legal
            inputs = ([tile] if need_x else []) + [params[i] for i in wanted]
            grads = torch.autograd.grad(y, inputs, dy[start:start + tile.shape[0]].view_as(y), allow_unused=True)
            if need_x:
                dx[start:start + tile.shape[0]] = 0 if grads[0] is None else grads[0]
                grads = grads[1:]
            for i, g in zip(wanted, grads):
                if g is None:
                    continue
                if i in sums:
                    sums[i] += g
                else:  # fp32 (or wider): tile by tile sums then round once, as the untiled matmul does
                    sums[i] = g.to(torch.promote_types(g.dtype, torch.float32), copy=True)
        param_grads = [sums[i].to(p.dtype) if i in sums else None for i, p in enumerate(params)]
        return None, None, None if dx is None else dx.view(x.shape), *param_grads


def check_tile_tokens(tile_tokens) -> None:
    """One-line `ValueError` unless `tile_tokens` is an integer >= 1."""
    if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 1:
        raise ValueError(f"qdora.tiled_mlp: tile_tokens={tile_tokens!r} must be an integer >= 1 (tokens per tile "
                         "of the MLP), or None for the model's hidden_size")


def decoder_mlps(lm: nn.Module) -> list[nn.Module]:
    """The `mlp` module (dense MLP or MoE block) of every decoder layer of a transformers model."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # heavy; transformers' layer class

    return [m.mlp for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)
            and isinstance(getattr(m, "mlp", None), nn.Module)]


def _router_logits_line(where: str) -> str:
    return (f"qdora.tiled_mlp: {where} output_router_logits=True, whose load-balancing loss reads the router "
            "logits that transformers records per call of the router; tiled, it would record one per tile "
            "and without gradients. Turn output_router_logits off, or do not tile the MLP (handle.remove())")


class TiledMLP:
    """The tiled MLPs of one model, as `tiled_mlp` installed them. `remove()`, or leaving a `with`
    block, gives every MLP its forward back."""

    def __init__(self, lm: nn.Module, mlps: list[nn.Module], tile_tokens: int):
        self.model = lm
        self.tile_tokens = tile_tokens
        """Tokens per tile; calls with at most this many tokens run the MLP's own forward."""
        self.layers = len(mlps)
        """How many decoder-layer MLPs are tiled."""
        self.active = True
        self._mlps = mlps
        self._hooks = []
        self._routing = False  # the model's current call asked for router logits
        self._key = f"{_MARK}_{next(_KEYS)}"  # looked up on the module called, so that a deep copy calls its own

    def _install(self) -> None:
        key = self._key

        def forward(module, *args, **kwargs):
            return module.__dict__[key][0].call(module, args, kwargs)

        self._function = forward
        for mlp in self._mlps:
            mlp.__dict__[key] = (self, mlp.__dict__.get("forward"))  # an instance forward (accelerate's) or None
            mlp.forward = types.MethodType(forward, mlp)
        decoder = getattr(self.model, "base_model", self.model)
        if hasattr(getattr(self.model, "config", None), "output_router_logits"):  # an MoE: router logits per call
            def before(module, args, kwargs):
                asked = kwargs.get("output_router_logits")
                self._routing = bool(getattr(self.model.config, "output_router_logits", False)
                                     if asked is None else asked)

            def after(module, args, output):
                self._routing = False

            self._hooks = [decoder.register_forward_pre_hook(before, with_kwargs=True),
                           decoder.register_forward_hook(after, always_call=True)]

    def call(self, module: nn.Module, args: tuple, kwargs: dict):
        """One call of `module` (a wrapped MLP): tiled when it pays (see the module docstring)."""
        previous = module.__dict__[self._key][1]
        own = previous if previous is not None else types.MethodType(type(module).forward, module)
        if not self.active or len(args) + len(kwargs) != 1 or not torch.is_grad_enabled():
            return own(*args, **kwargs)
        name, x = (None, args[0]) if args else next(iter(kwargs.items()))
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.numel() <= self.tile_tokens * x.shape[-1]:
            return own(*args, **kwargs)
        params = [p for p in module.parameters() if p.requires_grad]
        if not x.requires_grad and not params:
            return own(*args, **kwargs)
        if self._routing or getattr(getattr(self.model, "config", None), "output_router_logits", False):
            raise ValueError(_router_logits_line("the model was called with"))

        def fn(tile):
            return own(tile) if name is None else own(**{name: tile})

        return TiledApply.apply(fn, self.tile_tokens, x, *params)

    def remove(self) -> None:
        """Give every MLP its forward back (an MLP whose forward another wrapper replaced since keeps
        it, and this one passes its calls through)."""
        self.active = False
        for mlp in self._mlps:
            if getattr(mlp.__dict__.get("forward"), "__func__", None) is self._function:
                previous = mlp.__dict__.pop(self._key)[1]
                if previous is None:
                    del mlp.forward
                else:
                    mlp.forward = previous
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> TiledMLP:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def find_tiled_mlp(model: nn.Module) -> TiledMLP | None:
    """The active tiled MLP installed on `model` (or on a PEFT model's base model), or None."""
    for mlp in decoder_mlps(causal_lm(model)):
        for key, value in mlp.__dict__.items():
            if key.startswith(_MARK) and value[0].active:
                return value[0]
    return None


def tiled_mlp(model: nn.Module, tile_tokens: int | None = None) -> TiledMLP:
    """Compute the MLP (or MoE block) of every decoder layer of `model` (a transformers causal LM, or a
    PEFT model around one) over tiles of `tile_tokens` tokens in training, forward and backward (see the
    module docstring). Default `tile_tokens`: the model's `hidden_size` (ALST's choice). Returns the handle:
    `.remove()` (or `with qdora.tiled_mlp(model):`) undoes it. Calling it again on a model whose MLPs
    are tiled is an error: remove the first handle, then tile again with the new size."""
    if tile_tokens is not None:
        check_tile_tokens(tile_tokens)
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    if tile_tokens is None:
        text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
        tile_tokens = getattr(text, "hidden_size", None)
        if not isinstance(tile_tokens, int) or tile_tokens < 1:
            raise ValueError(f"qdora.tiled_mlp: {type(lm).__name__}'s config has no hidden_size to size the "
                             "tiles; give tile_tokens (e.g. 4096)")
    mlps = decoder_mlps(lm)
    if not mlps:
        raise ValueError(f"qdora.tiled_mlp: {type(lm).__name__} has no decoder layer with an `mlp` module "
                         "(transformers' GradientCheckpointingLayer); nothing to tile")
    if getattr(config, "output_router_logits", False):
        raise ValueError(_router_logits_line(f"{type(lm).__name__}'s config has"))
    existing = find_tiled_mlp(lm)
    if existing is not None:
        raise ValueError(f"{type(lm).__name__}'s MLPs are already tiled (tile_tokens={existing.tile_tokens}); "
                         "call .remove() on its handle first")
    handle = TiledMLP(lm, mlps, tile_tokens)
    handle._install()
    return handle
