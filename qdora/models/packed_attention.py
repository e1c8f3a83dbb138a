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

Models: the types whose attention passes `position_ids` (and a window, if it has one) through to the attention
function (`VERIFIED`, each tested against its own SDPA with the mask in `tests/test_packed_attention.py`, windowed
too where the type has windows); another, or a multimodal model around one, is refused in one line. Gemma 2 is
not among them: its attention soft-caps its scores, which SDPA cannot.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qdora.models.shapes import used_sliding_window

NAME = "qdora_sdpa"
"""The attention implementation's name in transformers' registries (and `model.config._attn_implementation`)."""
VERIFIED = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "olmoe", "olmo2", "phi3", "gemma",
                      "gemma3_text"})
"""Model types whose attention forwards `position_ids`, and its `sliding_window` where it has one, to the attention
function (read in transformers 5.25)."""

_registered = False


def _mask(*, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """No mask where the rows need only causality within each packed sequence (the attention splits them); else
    transformers' own SDPA mask."""
    plain = (q_length == kv_length and not isinstance(q_offset, torch.Tensor) and q_offset == 0
             and not isinstance(kv_offset, torch.Tensor) and kv_offset == 0)
    if plain and (attention_mask is None or bool(attention_mask[:, -kv_length:].all())):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def sequence_starts(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the token index where each packed sequence starts (0 first): where `position_ids` does not go up
    by one from the token before."""
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


def attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
               is_causal=None, **kwargs):
    """"qdora_sdpa"'s attention function, as transformers' `AttentionInterface` calls it: given a mask, transformers'
    `sdpa_attention_forward`; without one, SDPA over each packed sequence of each row (one per row without
    `position_ids`), in blocks of `sliding_window` where the module has one (see the module docstring)."""
    position_ids = kwargs.pop("position_ids", None)
    window = kwargs.pop("sliding_window", None)  # the attention module's own window (None on full-attention layers)
    T = query.shape[2]
    if attention_mask is not None or key.shape[2] != T or T == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if position_ids is None:  # no packing to find: one sequence per row
        starts = [[0]] * query.shape[0]
    else:
        starts = sequence_starts(position_ids.expand(query.shape[0], -1) if position_ids.shape[0] == 1
                                 else position_ids)
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
    """Register "qdora_sdpa" with transformers (once per process)."""
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, _mask)
        _registered = True


def sliding_window(model: nn.Module) -> int | None:
    """The sliding window (tokens) of `model`'s windowed layers, or None if every layer attends to all tokens before
    it (`qdora.models.shapes.used_sliding_window`)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return (used_sliding_window(text) or None) if text is not None else None


def unsupported(model: nn.Module) -> str | None:
    """Why `packed_sdpa` cannot serve `model`, or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)  # the model's own type: a multimodal wrapper's masks differ
    if model_type not in VERIFIED:
        return f"model type {model_type!r} is not one it is tested with ({', '.join(sorted(VERIFIED))})"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return f"the model's attention is {config._attn_implementation!r}, not 'sdpa'"
    return None


def packed_sdpa(model: nn.Module) -> nn.Module:
    """Switch a transformers causal LM (or a PEFT model around one) from SDPA to SDPA over each packed sequence of
    a row, so that packed rows need no `T × T` mask (see the module docstring). Exact; returns the model. A model it
    is not tested with, or one not on SDPA, is refused in one ValueError line; `model.set_attn_implementation("sdpa")`
    undoes it."""
    lm = model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model
    reason = unsupported(lm)
    if reason is not None:
        raise ValueError(f"qdora.packed_sdpa: {reason}; keep transformers' attention for this model")
    register()
    lm.set_attn_implementation(NAME)
    return model
