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

One difference, by design: transformers looks for packed sequences only without a KV cache, so a forward with a
cache and restarting `position_ids` (not a training call; `qdora train` runs without one) attends across them
there, and within each sequence here.

`qdora train --packing` switches an SDPA model to it (the run log's `attention:` line says so).

Models: the types whose attention passes `position_ids` through to the attention function and has no
sliding window (`VERIFIED`, each tested against its own SDPA with the mask in `tests/test_packed_attention.py`);
another is refused in one line.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "qdora_sdpa"
"""The attention implementation's name in transformers' registries (and `model.config._attn_implementation`)."""
VERIFIED = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "olmoe"})
"""Model types whose attention forwards `position_ids` to the attention function (read in transformers 5.25)."""

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


def _attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
               is_causal=None, **kwargs):
    position_ids = kwargs.pop("position_ids", None)
    T = query.shape[2]
    if attention_mask is not None or position_ids is None or key.shape[2] != T or T == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    starts = sequence_starts(position_ids.expand(query.shape[0], -1) if position_ids.shape[0] == 1
                             else position_ids)
    if all(len(s) == 1 for s in starts):  # one sequence per row: plain causal attention
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)
    rows = []
    for b, row in enumerate(starts):
        pieces = []
        for s, e in zip(row, row[1:] + [T]):
            out, _ = sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                            value[b:b + 1, :, s:e], None, dropout=dropout, scaling=scaling,
                                            is_causal=True, **kwargs)
            pieces.append(out)  # (1, e - s, heads, head_dim)
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def register() -> None:
    """Register "qdora_sdpa" with transformers (once per process)."""
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, _mask)
        _registered = True


def unsupported(model: nn.Module) -> str | None:
    """Why `packed_sdpa` cannot serve `model`, or None."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    if model_type not in VERIFIED:
        return f"model type {model_type!r} is not one it is tested with ({', '.join(sorted(VERIFIED))})"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return f"the model's attention is {config._attn_implementation!r}, not 'sdpa'"
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True) or "sliding_attention" in (getattr(text, "layer_types",
                                                                                               None) or ()):
        return f"the model attends in a sliding window ({window} tokens), which the mask carries"
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
