"""Packed rows without a `tokens × tokens` mask: SDPA over each packed sequence of a row.

Why: a packed row holds several examples, told apart by `position_ids` that restart at 0. For SDPA,
transformers then builds a boolean block-diagonal causal mask per row, `T × T` bytes: 1 GiB at 32K tokens,
16 GiB at 128K, more than the rest of a long step (flash attention's variable-length path needs none, but
it is CUDA-only and an optional install). SDPA given a mask also cannot skip the masked blocks: it computes
all `T²` scores.

How: `packed_sdpa(model)` switches the model's attention from "sdpa" to "qdora_sdpa", registered once with
transformers' `AttentionInterface` and `AttentionMaskInterface`. Its mask function builds no mask where the
mask would only say "causal within each sequence" (a full-length query, no cache offset, no padding), and
otherwise hands over to transformers' own `sdpa_mask` (padding, generation with a cache). Its attention
function, given no mask, cuts each row where `position_ids` does not go up by one (the rule of
transformers' `find_packed_sequence_indices`) and runs transformers' `sdpa_attention_forward` with
`is_causal` on each piece: exactly the block-diagonal mask's attention, in `Σ len²` work instead of `T²`.
Given a mask, it is `sdpa_attention_forward` itself.

Sliding windows (Mistral, Phi-3, Qwen2's windowed layers, Gemma 3's local layers): transformers' mask also
carries the window, `T × T` even for one unpacked sequence. Here the attention module's own `sliding_window`
(which these models pass to the attention function) cuts each sequence longer than the window into blocks of
`window` queries, each attending to its `2·window − 1` keys with one `window × (2·window − 1)` mask shared by every
block and layer (`band_mask`): `O(T · window)` work, and no mask that grows with `T`.

One difference, by design: transformers looks for packed sequences only without a KV cache, so a forward with a
cache and restarting `position_ids` (not a training call; `qdora train` runs without one) attends across them
there, and within each sequence here.

`qdora train` switches an SDPA model to it with `--packing`, and for a model with a sliding window always (the run
log's `attention:` line says so).

Soft-capped scores (Gemma 2, `SOFTCAPPED`): SDPA cannot cap scores, so transformers runs these models eagerly, with
every layer's `heads × T × T` scores (and their fp32 softmax) kept for the backward: 32 GiB a layer for Gemma-2-9B at
32K tokens. `packed_sdpa` switches them to "qdora_softcap" (the same functions under another name: transformers
checks any name with "sdpa" in it against the model's own SDPA support), whose attention runs the eager formula in
tiles of queries (`tile_rows`: at most `qdora.models.shapes.SOFTCAP_TILE_BYTES` of fp32 scores a tile), over each
packed sequence, within the window on windowed layers, each tile recomputed in the backward (`CappedTiles`): what it
keeps is q, k, v, and what it holds at once is one tile's scores. Given a mask (padding, generation) its tiles take
their rows of transformers' eager mask.

Models: the types whose attention passes `position_ids` (and a window, and a soft cap, if it has them) through to
the attention function (`VERIFIED`, each tested against its own attention with the mask in
`tests/test_packed_attention.py`, windowed too where the type has windows); another, a multimodal model around
one, or bidirectional attention is refused in one line.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from qdora.core.recompute import ForwardState
from qdora.models.head_loss import causal_lm
from qdora.models.shapes import softcap_tile_rows, used_sliding_window

NAME = "qdora_sdpa"
"""The attention implementation's name in transformers' registries (and `model.config._attn_implementation`)."""
SOFTCAP_NAME = "qdora_softcap"
"""The name it has for models that soft-cap their attention scores (`SOFTCAPPED`)."""
VERIFIED = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "olmoe", "olmo2", "phi3", "gemma",
                      "gemma2", "gemma3_text"})
"""Model types whose attention forwards `position_ids`, and its `sliding_window` and `softcap` where it has them, to
the attention function (read in transformers 5.25)."""
SOFTCAPPED = frozenset({"gemma2"})
"""Of those, the types whose attention soft-caps its scores (`attn_logit_softcapping`): eager in transformers."""
_registered = False


def _needs_mask(q_length, kv_length, q_offset, kv_offset, attention_mask) -> bool:
    """Whether the rows need more than causality within each packed sequence (which the attention splits by itself):
    a cache offset, a query shorter than the keys, or padding."""
    plain = (q_length == kv_length and not isinstance(q_offset, torch.Tensor) and q_offset == 0
             and not isinstance(kv_offset, torch.Tensor) and kv_offset == 0)
    return not (plain and (attention_mask is None or bool(attention_mask[:, -kv_length:].all())))


def _mask(*, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """"qdora_sdpa"'s mask: none where the rows need only causality within each packed sequence, else transformers'
    own SDPA mask."""
    if not _needs_mask(q_length, kv_length, q_offset, kv_offset, attention_mask):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def _eager_mask(*, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """"qdora_softcap"'s mask: as `_mask`, with transformers' eager (additive float) mask where one is needed."""
    if not _needs_mask(q_length, kv_length, q_offset, kv_offset, attention_mask):
        return None
    return eager_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                      kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def sequence_starts(position_ids: torch.Tensor, rows: int | None = None) -> list[list[int]]:
    """Per row, the token index where each packed sequence starts (0 first): where `position_ids` does not go up
    by one from the token before. `rows`: the batch's, where `position_ids` is one row for all of them."""
    if rows is not None and position_ids.shape[0] == 1:
        position_ids = position_ids.expand(rows, -1)
    pos = position_ids.reshape(position_ids.shape[0], -1)
    breaks = torch.ones_like(pos, dtype=torch.bool)
    breaks[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return [torch.nonzero(row).flatten().tolist() for row in breaks.cpu()]


def window_blocks(start: int, end: int, window: int) -> list[tuple[int, int, int]]:
    """The query blocks `(q0, q1, k0)` of one sequence's tokens `[start, end)` under a sliding window of `window`
    tokens (token i sees token j iff `0 <= i - j < window`, transformers' `sliding_window_overlay`): blocks of
    `window` queries, each with the keys `[k0, q1)` it can see."""
    return [(q0, min(q0 + window, end), max(start, q0 - window + 1)) for q0 in range(start, end, window)]


@functools.lru_cache(maxsize=8)
def band_mask(window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive mask `(1, 1, window, 2·window − 1)` of a block of `window` queries over the keys from
    `window − 1` before its first query to its last: query a sees key b iff `a <= b <= a + window − 1` (0 there,
    -inf elsewhere). One tensor per window, dtype and device, shared by every block and layer: SDPA keeps the mask
    it is given for its backward, and a boolean one it converts, one float copy per call."""
    a = torch.arange(window, device=device)[:, None]
    b = torch.arange(2 * window - 1, device=device)[None]
    seen = (a <= b) & (b <= a + window - 1)
    return torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))[None, None]


def _causal(module, query, key, value, start: int, end: int, window: int | None, dropout, scaling, kwargs):
    """Causal attention of one row's tokens `[start, end)` among themselves (`query` etc. of batch 1), within
    `window` if given: one SDPA call with `is_causal`, or, for a sequence longer than the window, one call per
    block of `window` queries: the first causal, each later one over its `2·window − 1` keys with `band_mask`
    (never `len × len`)."""
    if window is None or end - start <= window:
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                        None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs)
        return out
    pieces = [_causal(module, query, key, value, start, start + window, None, dropout, scaling, kwargs)]
    band = band_mask(window, query.dtype, query.device)
    for q0, q1, k0 in window_blocks(start, end, window)[1:]:
        mask = band[:, :, :q1 - q0, :q1 - k0]
        q, k, v = query[:, :, q0:q1], key[:, :, k0:q1], value[:, :, k0:q1]
        if query.device.type == "cpu" and getattr(module, "num_key_value_groups", 1) > 1:
            # CPU's SDPA takes grouped keys beside a mask, exactly; transformers repeats them for every head
            # first, and the backward would keep those copies: 4.7 against 1.0 MiB of keys a layer, measured
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                                 enable_gqa=True).transpose(1, 2).contiguous()
        else:
            out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=False,
                                            **kwargs)
        pieces.append(out)
    return torch.cat(pieces, dim=1)


def tile_rows(heads: int, keys: int, device: torch.device = torch.device("cpu"), window: int | None = None) -> int:
    """Queries per tile of the soft-capped attention over a sequence of `keys` tokens with `heads` heads (times the
    batch where the tile spans it), under `window` if given: `qdora.models.shapes.softcap_tile_rows`, one rule with
    the planner's."""
    return softcap_tile_rows(heads, keys, device.type, window)


def capped_tile(query, key, value, mask, offset: int, window: int | None, scaling: float, softcap: float,
                dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Transformers' eager soft-capped attention (Gemma 2's `eager_attention_forward`) of one tile of queries
    `(b, H, t, d)` over its keys and values `(b, KVH, n, d)`, the keys kept grouped (never repeated per head).
    `mask`: transformers' additive mask `(b, 1, t, n)`, or None: query a, at key index `offset + a`, sees key j iff
    `j <= offset + a` and, with a window, `offset + a − j < window`. Returns `(b, t, H, d)`."""
    b, H, t, d = query.shape
    kvh, n = key.shape[1], key.shape[2]
    g = H // kvh
    scores = torch.matmul(query.reshape(b, kvh, g * t, d), key.transpose(2, 3)) * scaling
    scores = (torch.tanh(scores / softcap) * softcap).view(b, kvh, g, t, n)
    if mask is None:
        q_pos = torch.arange(offset, offset + t, device=query.device)[:, None]
        k_pos = torch.arange(n, device=query.device)[None]
        hidden = k_pos > q_pos
        if window is not None:
            hidden |= q_pos - k_pos >= window
        scores = scores.masked_fill(hidden, float("-inf"))
    else:
        scores = scores + mask[:, None]
    # eager's softmax in fp32 (at least: fp64 stays fp64, where eager's would round it to fp32)
    probs = F.softmax(scores.view(b, kvh, g * t, n), dim=-1,
                      dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, value).view(b, H, t, d).transpose(1, 2)


class CappedTiles(torch.autograd.Function):
    """`capped_tile` over a list of tiles `(b0, b1, q0, q1, k0, k1)` (rows `[b0, b1)`, queries `[q0, q1)`, keys
    `[k0, k1)`; the queries are the last `T` of the `S` keys), into one output `(B, T, H, d)`. It keeps q, k, v (and
    the mask) for the backward, which computes each tile again and takes its gradients with autograd, adding them
    into whole-size gradients of q, k and v: one tile's working set at a time. (Slicing each tile in autograd's graph
    instead would give every tile's backward a zero-filled gradient the size of the whole q, k and v.) Dropout
    replays the forward's random numbers: the backward draws them again from the forward's generator state, tile by
    tile in the same order; and the tiles compute again under the forward's autocast state."""

    @staticmethod
    def forward(ctx, query, key, value, mask, tiles, window, scaling, softcap, dropout, training):
        ctx.tiles, ctx.args = tiles, (window, scaling, softcap, dropout, training)
        ctx.state = ForwardState.capture(query, rng=bool(dropout and training))
        ctx.save_for_backward(query, key, value, mask)
        B, H, T, d = query.shape
        out = None
        for tile in tiles:
            b0, b1, q0, q1, _, _ = tile
            piece = capped_tile(*_tile_inputs(query, key, value, mask, tile), *ctx.args)
            if out is None:  # in the tiles' dtype (under autocast, not the inputs')
                out = piece.new_empty(B, T, H, d)
            out[b0:b1, q0:q1] = piece
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, mask = ctx.saved_tensors
        grads = [torch.zeros_like(t) if need else None for t, need in zip((query, key, value), ctx.needs_input_grad)]
        with ctx.state.rng():
            for tile in ctx.tiles:
                b0, b1, q0, q1, k0, k1 = tile
                q, k, v, m, offset = _tile_inputs(query, key, value, mask, tile)
                inputs = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad)]
                with ctx.state.autocast():  # the forward's autocast state, as the forward computed
                    out = capped_tile(*inputs, m, offset, *ctx.args)
                wanted = [t for t in inputs if t.requires_grad]
                got = iter(torch.autograd.grad(out, wanted, grad_out[b0:b1, q0:q1]))
                for grad, t, where in zip(grads, inputs, ((q0, q1), (k0, k1), (k0, k1))):
                    if t.requires_grad:
                        grad[b0:b1, :, where[0]:where[1]] += next(got)
        return *grads, None, None, None, None, None, None, None


def _tile_inputs(query, key, value, mask, tile):
    """One tile's queries, keys, values, rows of the mask (None without one), and `capped_tile`'s offset: the key
    index of its first query within its keys."""
    b0, b1, q0, q1, k0, k1 = tile
    rows = slice(b0, b1) if mask is None or mask.shape[0] > 1 else slice(None)
    return (query[b0:b1, :, q0:q1], key[b0:b1, :, k0:k1], value[b0:b1, :, k0:k1],
            None if mask is None else mask[rows, :, q0:q1, k0:k1], key.shape[2] - query.shape[2] + q0 - k0)


def _capped(module, query, key, value, attention_mask, position_ids, window, dropout, scaling, softcap):
    """"qdora_softcap"'s attention: `CappedTiles` over tiles of `tile_rows` queries. Given a mask, tiles of all rows
    at once over all keys, with their rows of the mask; without one, over each packed sequence of each row, within the
    window."""
    B, H, T, _ = query.shape
    S = key.shape[2]
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    if attention_mask is not None or S != T:  # a mask (or a cache without one: the queries are the last keys)
        rows = tile_rows(B * H, S, query.device)
        tiles = [(0, B, q0, min(q0 + rows, T), 0, S) for q0 in range(0, T, rows)]
    else:
        starts = [[0]] * B if position_ids is None else sequence_starts(position_ids, B)
        tiles = []
        for b, row in enumerate(starts):
            for s, e in zip(row, row[1:] + [T]):
                rows = tile_rows(H, e - s, query.device, window)
                tiles += [(b, b + 1, q0, min(q0 + rows, e), s if window is None else max(s, q0 - window + 1),
                           min(q0 + rows, e)) for q0 in range(s, e, rows)]
    return CappedTiles.apply(query, key, value, attention_mask, tiles, window, scaling, softcap, dropout,
                             module.training)


def attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
               is_causal=None, **kwargs):
    """"qdora_sdpa"'s (and "qdora_softcap"'s) attention function, as transformers' `AttentionInterface` calls it:
    given a mask, transformers' `sdpa_attention_forward`; without one, SDPA over each packed sequence of each row (one
    per row without `position_ids`), in blocks of `sliding_window` where the module has one; scores soft-capped
    (`softcap`), in tiles of queries (see the module docstring)."""
    position_ids = kwargs.pop("position_ids", None)
    window = kwargs.pop("sliding_window", None)  # the attention module's own window (None on full-attention layers)
    softcap = kwargs.pop("softcap", None)
    if softcap is not None:
        out = _capped(module, query, key, value, attention_mask, position_ids, window, dropout, scaling, softcap)
        return out, None
    T = query.shape[2]
    if attention_mask is not None or key.shape[2] != T or T == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if position_ids is None:  # no packing to find: one sequence per row
        starts = [[0]] * query.shape[0]
    else:
        starts = sequence_starts(position_ids, query.shape[0])
    if all(len(s) == 1 for s in starts) and (window is None or T <= window):  # one sequence per row: plain causal
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)
    rows = []
    for b, row in enumerate(starts):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        rows.append(torch.cat([_causal(module, q, k, v, s, e, window, dropout, scaling, kwargs)
                               for s, e in zip(row, row[1:] + [T])], dim=1))  # (1, T, heads, head_dim)
    return torch.cat(rows, dim=0), None


def register() -> None:
    """Register "qdora_sdpa" and "qdora_softcap" with transformers (once per process)."""
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, _mask)
        AttentionInterface.register(SOFTCAP_NAME, attention)
        AttentionMaskInterface.register(SOFTCAP_NAME, _eager_mask)
        _registered = True


def sliding_window(model: nn.Module) -> int | None:
    """The sliding window (tokens) of `model`'s windowed layers, or None if every layer attends to all tokens before
    it (`qdora.models.shapes.used_sliding_window`)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return (used_sliding_window(text) or None) if text is not None else None


def implementation(model: nn.Module) -> str:
    """The name `packed_sdpa` gives `model`'s attention: "qdora_softcap" for a type that soft-caps its scores,
    else "qdora_sdpa"."""
    return SOFTCAP_NAME if getattr(model.config, "model_type", None) in SOFTCAPPED else NAME


def unsupported(model: nn.Module) -> str | None:
    """Why `packed_sdpa` cannot serve `model`, or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)  # the model's own type: a multimodal wrapper's masks differ
    if model_type not in VERIFIED:
        return f"model type {model_type!r} is not one it is tested with ({', '.join(sorted(VERIFIED))})"
    if getattr(config, "use_bidirectional_attention", False):
        return "the model's attention is bidirectional (use_bidirectional_attention=True), not causal"
    own = "eager" if model_type in SOFTCAPPED else "sdpa"  # transformers runs soft-capped scores eagerly
    if getattr(config, "_attn_implementation", None) not in (own, implementation(model)):
        return f"the model's attention is {config._attn_implementation!r}, not {own!r}"
    return None


def unmasked_right_padding(model: nn.Module) -> bool:
    """Whether rows padded on the right give `model` the same loss without their attention mask, so that none is
    built: the model is causal (a token attends to tokens before it, so no real token sees the padding after it), its
    positions come from the token index (transformers' default without `position_ids`, as with the mask), and nothing
    in its loss reads the mask (no MoE router loss: `output_router_logits` off). Only the padding's own outputs, which
    the loss ignores, change. True for a `VERIFIED` type on attention that would build a `T × T` mask from it
    (SDPA, eager, and this module's); False on flash attention, whose padding mask skips the padding instead."""
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    return (getattr(config, "model_type", None) in VERIFIED
            and not getattr(config, "use_bidirectional_attention", False)
            and not getattr(config, "output_router_logits", False)
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager", NAME, SOFTCAP_NAME))


def is_right_padding(mask) -> bool:
    """Whether `mask` is a 2-D attention mask that marks only padding on the right: each row's ones, then zeros."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return False
    return bool((((mask == 0) | (mask == 1)).all() & (mask[:, 1:] <= mask[:, :-1]).all()).item())  # one host read


def unmasked_padding(model: nn.Module) -> RemovableHandle | None:
    """For a model `unmasked_right_padding` holds exact: a forward pre-hook on its decoder stack that drops an
    `attention_mask` marking only padding on the right (`is_right_padding`) from a forward without a cache, without
    `position_ids` and without the router's logits, so that no `T × T` mask is built from it; the loss and the real
    tokens' outputs are the same. A decoding step's mask (with a cache), left padding, and any mask given beside
    `position_ids` (from which transformers reads packed rows when there is no mask) stay. None for any other model
    (its masks stay). `.remove()` on the handle takes the hook off. `qdora train` and `qdora.QDoRATrainer` install
    it."""
    if not unmasked_right_padding(model):
        return None
    lm = causal_lm(model)
    return lm.get_decoder().register_forward_pre_hook(_drop_right_padding, with_kwargs=True)


def _drop_right_padding(module, args, kwargs):
    # given `position_ids`, the mask stays: without a mask transformers would read packed rows from them
    plain = all(kwargs.get(name) is None for name in ("cache", "past_key_values", "position_ids"))
    if plain and not kwargs.get("output_router_logits") and is_right_padding(kwargs.get("attention_mask")):
        return args, {**kwargs, "attention_mask": None}
    return None


def serves(model: nn.Module, packing: bool) -> bool:
    """Whether switching `model` to `packed_sdpa` takes a `T × T` mask or scores off its attention: its rows are
    packed (`packing`), it has a sliding window, or it soft-caps its scores; and `packed_sdpa` can serve it and is not
    on it already. (Plain rows of a plain model are one causal SDPA call either way.)"""
    lm = causal_lm(model)
    own = "eager" if implementation(lm) == SOFTCAP_NAME else "sdpa"
    return (bool(packing or sliding_window(lm) or own == "eager") and unsupported(lm) is None
            and getattr(lm.config, "_attn_implementation", None) == own)


def packed_sdpa(model: nn.Module) -> nn.Module:
    """Switch a transformers causal LM (or a PEFT model around one) from SDPA to SDPA over each packed sequence of
    a row, so that packed rows need no `T × T` mask, and a model with soft-capped scores (Gemma 2) from eager to the
    same in tiles of queries (see the module docstring). Exact; returns the model. A model it is not tested with, or
    one not on its SDPA (eager for soft-capped scores), is refused in one ValueError line;
    `model.set_attn_implementation("sdpa")` (or "eager") undoes it."""
    lm = causal_lm(model)
    reason = unsupported(lm)
    if reason is not None:
        raise ValueError(f"qdora.packed_sdpa: {reason}; keep transformers' attention for this model")
    register()
    lm.set_attn_implementation(implementation(lm))
    return model
