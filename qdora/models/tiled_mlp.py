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
adapted, or the first layer's input comes from frozen embeddings). A training-mode call without grad (an
offloaded checkpoint's forward, a DPO reference's) runs tile by tile too, with no autograd: its working set
is one tile's as well. Every other call (inference in eval mode, short batches) is the module's own
forward, unchanged: bit for bit the untiled result.

Cost: the MLP's forward runs once more per step (forward, then the tile recompute in backward; with
gradient checkpointing: forward, checkpoint recompute, tile recompute, three times instead of two).

Exactness: the MLP (or MoE block: router and experts) is per token, so tiling changes no value, only
rounding: a token's output and input gradient are the same sums as untiled (a matmul kernel may block
a tile's rows differently); a parameter's gradient is a sum over tokens taken tile by tile (each
tile's in fp32, or the parameter's dtype if wider, rounded once to the parameter's dtype at the end,
as the untiled matmul rounds once). Dropout inside the MLP (the adapters' `qdora.core.dropout`, any
torch random op) draws the same masks in the recompute as in the forward: the RNG state (CPU's, and
the CUDA device's for CUDA inputs) is saved before the first tile and restored before the recompute, as
`torch.utils.checkpoint` does, and the tiles are recomputed in their forward order, so each draws what it
drew (one state per call, not per tile: ~5 KB each, kept from the forward to the backward); the autocast
state too. The masks are the tiles' draws, in tile order: the same distribution as untiled, not the same
samples (on CPU the same where an MLP masks one projection and each tile's element count is a multiple of
4, `drop_mask`'s words).

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

Tiled layers (`qdora.tiled_layers(model)`, `qdora train --tiled-layers`): the MLP and every other per-token
part of each decoder layer, tiled the same way: its norms (each RMSNorm otherwise keeps an fp32 copy of its
input: 2 GB per norm at 128K tokens of Llama-3-8B), the attention's q, k, v, o projections that train
(an adapter otherwise keeps its input, with dropout one dropped copy per adapter, `x·Aᵀ` and, for DoRA,
its output), the per-head query/key norms (Qwen3; tiled whole tokens at a time, all heads), and the final
norm after the last layer (whose backward otherwise holds five fp32 `tokens × hidden` temporaries). Each keeps
only its input; the attention's own tensors (q, k, v after the rotary embedding, its output, the
logsumexp) stay, as they mix tokens. A projection that trains nothing is not tiled: untiled it keeps
nothing. Cost: each tiled part's forward once more per step, the DoRA row norm included (per tile: about
`r / tile_tokens` of the tile's product).
"""

from __future__ import annotations

import itertools
import math
import types

import torch
from torch import nn

from qdora.core.recompute import ForwardState
from qdora.models.head_loss import causal_lm

_MARK = "_qdora_tiled_mlp"
_KEYS = itertools.count()


def tiles_forward(fn, tile_tokens: int, x: torch.Tensor) -> torch.Tensor:
    """`fn(x)` computed over tiles of `tile_tokens` rows under `no_grad` (see `TiledApply`), into one output."""
    flat = x.reshape(-1, x.shape[-1])
    lead = (1,) * (x.dim() - 2)
    out = None
    for start in range(0, flat.shape[0], tile_tokens):
        tile = flat[start:start + tile_tokens]
        with torch.no_grad():
            # a copy: a module may scale its input in place (Mixtral's router jitter)
            y = fn(tile.clone().view(*lead, *tile.shape))
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"qdora.tiled_mlp: a tiled module returned {type(y).__name__}, not one tensor; "
                            "remove the tiling (handle.remove()) for this model")
        y = y.reshape(tile.shape[0], -1)
        if out is None:
            out = y.new_empty(flat.shape[0], y.shape[1])
        out[start:start + tile.shape[0]] = y
    return out.view(*x.shape[:-1], out.shape[1])


class TiledApply(torch.autograd.Function):
    """`TiledApply.apply(fn, tile_tokens, x, *params)`: `fn(x)` computed over tiles of `tile_tokens` rows
    (`x (..., hidden)` flattened to `(rows, hidden)`, each tile given to `fn` as `(1, …, 1, n, hidden)`,
    the rank of `x`). `params`: the tensors `fn` uses that need a gradient (they get it summed over
    tiles). Saves `x` only; recomputes the tiles in backward, in order, from the RNG state the first had
    (so each draws what it drew) and with the autocast state of the forward."""

    @staticmethod
    def forward(ctx, fn, tile_tokens, x, *params):
        # one RNG state for all the tiles: the backward recomputes them in the same order, drawing as they drew
        state = ForwardState.capture(x)
        out = tiles_forward(fn, tile_tokens, x)
        ctx.fn, ctx.tile_tokens, ctx.params, ctx.state = fn, tile_tokens, params, state
        ctx.save_for_backward(x)
        return out

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
        with ctx.state.rng():
            for start in range(0, flat.shape[0], tile_tokens):
                tile = flat[start:start + tile_tokens].detach().requires_grad_(need_x)
                with ctx.state.autocast():
                    y = ctx.fn(tile.clone().view(*lead, *tile.shape))  # a non-leaf copy: in-place ops stay legal
                inputs = ([tile] if need_x else []) + [params[i] for i in wanted]
                grads = torch.autograd.grad(y, inputs, dy[start:start + tile.shape[0]].view_as(y),
                                            allow_unused=True)
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


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer  # heavy; transformers' layer class

    return [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]


def decoder_mlps(lm: nn.Module) -> list[nn.Module]:
    """The `mlp` module (dense MLP or MoE block) of every decoder layer of a transformers model."""
    return [m.mlp for m in _decoder_layers(lm) if isinstance(getattr(m, "mlp", None), nn.Module)]


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The attention's per-token projections `tiled_layers` tiles (where they train)."""


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def decoder_per_token(lm: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """`(modules, projections)`: every per-token module of each decoder layer `tiled_layers` tiles — the
    layer's own norms, its attention's q/k norms and `PROJECTIONS`, its `mlp` — and the final norm after the
    last layer; and the projections among them."""
    modules, projections = [], []
    final = getattr(getattr(lm, "model", None), "norm", None)
    if isinstance(final, nn.Module) and _is_norm(final):
        modules.append(final)
    for layer in _decoder_layers(lm):
        modules += [m for m in layer.children() if _is_norm(m)]
        attention = getattr(layer, "self_attn", None)
        if isinstance(attention, nn.Module):
            modules += [m for m in attention.children() if _is_norm(m)]
            found = [getattr(attention, n) for n in PROJECTIONS if isinstance(getattr(attention, n, None), nn.Module)]
            modules += found
            projections += found
        if isinstance(getattr(layer, "mlp", None), nn.Module):
            modules.append(layer.mlp)
    return modules, projections


def _router_logits_line(where: str) -> str:
    return (f"qdora.tiled_mlp: {where} output_router_logits=True, whose load-balancing loss reads the router "
            "logits that transformers records per call of the router; tiled, it would record one per tile "
            "and without gradients. Turn output_router_logits off, or do not tile the MLP (handle.remove())")


class TiledModules:
    """The tiled modules of one model, as `tiled_mlp` or `tiled_layers` installed them. `remove()`, or leaving
    a `with` block, gives every module its forward back."""

    def __init__(self, lm: nn.Module, modules: list[nn.Module], tile_tokens: int, parts: str = "mlp",
                 projections: list[nn.Module] = ()):
        self.model = lm
        self.tile_tokens = tile_tokens
        """Tokens per tile; calls with at most this many tokens run the module's own forward."""
        self.parts = parts
        """"mlp" (`tiled_mlp`) or "layers" (`tiled_layers`: norms, attention projections and MLP)."""
        self.layers = len(decoder_mlps(lm)) if parts == "mlp" else len(_decoder_layers(lm))
        """How many decoder layers are tiled."""
        self.active = True
        self._modules = modules
        self._projections = {id(m) for m in projections}
        self._hooks = []
        self._routing = False  # the model's current call asked for router logits
        self._key = f"{_MARK}_{next(_KEYS)}"  # looked up on the module called, so that a deep copy calls its own

    def _install(self) -> None:
        key = self._key

        def forward(module, *args, **kwargs):
            return module.__dict__[key][0].call(module, args, kwargs)

        self._function = forward
        for module in self._modules:
            module.__dict__[key] = (self, module.__dict__.get("forward"))  # an instance forward (accelerate's) or None
            module.forward = types.MethodType(forward, module)
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
        """One call of `module` (a wrapped module): tiled when it pays (see the module docstring)."""
        previous = module.__dict__[self._key][1]
        own = previous if previous is not None else types.MethodType(type(module).forward, module)
        grad = torch.is_grad_enabled()
        if not self.active or len(args) + len(kwargs) != 1 or not (grad or module.training):
            return own(*args, **kwargs)
        name, x = (None, args[0]) if args else next(iter(kwargs.items()))
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return own(*args, **kwargs)
        rows = self.tile_tokens * math.prod(x.shape[2:-1])  # a token's rows: per head in a q/k norm's (b, s, heads, d)
        if x.numel() <= rows * x.shape[-1]:
            return own(*args, **kwargs)
        params = [p for p in module.parameters() if p.requires_grad] if grad else []
        if not params and (id(module) in self._projections or grad and not x.requires_grad):
            # a frozen projection keeps nothing and its working set is its output; or nothing to differentiate
            return own(*args, **kwargs)
        if self._routing or getattr(getattr(self.model, "config", None), "output_router_logits", False):
            raise ValueError(_router_logits_line("the model was called with"))

        def fn(tile):
            return own(tile) if name is None else own(**{name: tile})

        if not grad:  # a training forward without autograd (an offloaded checkpoint's, a reference's): tiles too
            return tiles_forward(fn, rows, x)
        return TiledApply.apply(fn, rows, x, *params)

    def remove(self) -> None:
        """Give every module its forward back (a module whose forward another wrapper replaced since keeps
        it, and this one passes its calls through)."""
        self.active = False
        for module in self._modules:
            if getattr(module.__dict__.get("forward"), "__func__", None) is self._function:
                previous = module.__dict__.pop(self._key)[1]
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> TiledModules:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


TiledMLP = TiledModules
"""The handle's earlier name."""


def find_tiled_mlp(model: nn.Module) -> TiledModules | None:
    """The active tiling (`tiled_mlp`'s or `tiled_layers`') installed on `model` (or on a PEFT model's base
    model), or None."""
    for mlp in decoder_mlps(causal_lm(model)):
        for key, value in mlp.__dict__.items():
            if key.startswith(_MARK) and value[0].active:
                return value[0]
    return None


def _tile(model: nn.Module, tile_tokens: int | None, parts: str) -> TiledModules:
    """`tiled_mlp` (`parts="mlp"`) and `tiled_layers` (`parts="layers"`)."""
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
        raise ValueError(f"{type(lm).__name__}'s {'MLPs' if existing.parts == 'mlp' else 'layers'} are already "
                         f"tiled (tile_tokens={existing.tile_tokens}); call .remove() on its handle first")
    modules, projections = (mlps, []) if parts == "mlp" else decoder_per_token(lm)
    handle = TiledModules(lm, modules, tile_tokens, parts, projections)
    handle._install()
    return handle


def tiled_mlp(model: nn.Module, tile_tokens: int | None = None) -> TiledModules:
    """Compute the MLP (or MoE block) of every decoder layer of `model` (a transformers causal LM, or a
    PEFT model around one) over tiles of `tile_tokens` tokens in training, forward and backward (see the
    module docstring). Default `tile_tokens`: the model's `hidden_size` (ALST's choice). Returns the handle:
    `.remove()` (or `with qdora.tiled_mlp(model):`) undoes it. Calling it again on a model whose MLPs
    are tiled is an error: remove the first handle, then tile again with the new size."""
    return _tile(model, tile_tokens, "mlp")


def tiled_layers(model: nn.Module, tile_tokens: int | None = None) -> TiledModules:
    """`tiled_mlp`, and every other per-token part of each decoder layer tiled the same way: its norms, its
    attention's q/k norms and the q, k, v, o projections that train (see the module docstring). One layer's
    saved activations are then its input, each tiled part's input and the attention's own tensors."""
    return _tile(model, tile_tokens, "layers")
