r"""`qdora plan`: predicted peak memory per device of one training step, term by term.

The model follows what this library allocates, tensor by tensor (T = batch × sequence tokens,
e = bytes of the compute dtype: 2 for bf16 on CUDA, 4 for fp32 on CPU; h hidden, i intermediate,
q = heads·head_dim, kv = kv_heads·head_dim, V vocabulary, L layers):

Resident (the whole step)
    NF4 weights      ⌈out·in/2⌉ bytes per quantized linear (`qdora.core.nf4.quantize_nf4`).
    quant state      per linear, blocks of 64: double quant keeps one uint8 absmax per block, an
                     fp32 absmax per 256 blocks, an fp32 offset, the 16-entry NF4 code and the
                     256-entry fp32 code of the second level (each layer holds its own copy).
                     Without double quant: one fp32 absmax per block and the NF4 code.
    base weights     everything not in NF4: embeddings, norms, `lm_head` (`keep_full_precision`),
                     all linears for full/lora/dora; in the storage dtype (bf16 on CUDA, fp32 on CPU).
    adapters         per adapted linear `A (r, in)`, `B (out, r)` and for DoRA `magnitude_delta (out,)`
                     in the adapter dtype (fp32 by default in `qdora train`), plus DoRA's fp32
                     `base_row_sq_norm (out,)` buffer.
    optimizer states AdamW: two tensors shaped like every trainable parameter, in its dtype
                     (in steady state they exist through the whole step); a bf16 adapter's
                     fp32 master copy and its two moments in fp32 (`qdora.core.optim.MasterWeights`).

Per phase of the step (the peak is the largest phase)
    forward end      saved activations + the loss: logits `T·V·e`, their fp32 upcast on bf16
                     (transformers' `ForCausalLMLoss` calls `logits.float()`), log-softmax `T·V·4`.
    loss backward    saved activations + log-softmax output, its gradient and the logits'
                     gradient: `3·T·V·4`.
    chunked loss     (`chunked_loss`, `qdora train`'s default; `chunked_loss_bytes`) instead of the two above,
                     with `N = b·(s − 1)` rows, `c = min(N, loss_chunk_tokens or default_chunk_tokens(V))`:
                     kept `N·h·e + N·4 + 3·N·8` (gathered supervised rows, fp32 logsumexp, labels, row
                     indices); forward end + the final norm's output `T·h·e` + one chunk's logits
                     `c·V·e` and fp32 `c·V·4` (the same tensor on fp32); loss backward + `dh (N·h·e)` +
                     one recomputed chunk as in the forward (+ `c·V·4` for `tanh` with soft-capping) +
                     `dz·W (c·h·e)`, full fine-tuning + the head's fp32 gradient `V·h·4` (+ its cast).
    layer backward   saved activations (or, with gradient checkpointing, the L checkpointed layer
                     inputs `L·T·h·e` plus one layer's recomputed activations) + the gradients in
                     flight through one layer + the dequantized base weight of its largest frozen
                     NF4 layer (bitsandbytes dequantizes it whole; FSDP's path and the adapted
                     layers go row block by row block: `block_rows × in`); of the costliest kind
                     of layer where an MoE has two (`qdora.plan.sizes`: MoE and dense layers).
    optimizer step   all gradients + AdamW's temporaries (CPU: the largest parameter twice;
                     CUDA: torch's foreach path, one copy of all trainable parameters) + the
                     fp32 gradients of the master copies of bf16 adapters.
    With gradient accumulation the gradients of the earlier micro-batches are in every phase.

Saved activations of one Llama decoder layer (autograd's saved tensors, measured on CPU with
saved-tensor hooks and derived from the code): each RMSNorm keeps its fp32 input `T·h·4`; the
attention (SDPA flash/efficient kernels, no padding mask) keeps q, k (after rotary), v, its output
and an fp32 logsumexp per head and token (soft-capped scores, Gemma 2's tiles of queries: no logsumexp, and the
attention's backward holds one tile's working set, `softcap_tile`); the MLP keeps `gate`, `silu(gate)`, `up`
(`3·T·i·e`).
A linear keeps its input only if its weight trains (full) or it has an adapter: then its input
(or, with dropout, each adapter's own dropped-out copy plus the dropout mask), `a = x·Aᵀ (T·r)`,
and for DoRA its output (`dm` is recovered from it; shared when the next op keeps it anyway: v,
gate, up). Full fine-tuning adds the normalised RMSNorm outputs (their weight trains). Biases
(Qwen2's q, k, v) are kept as loaded; a partial rotary embedding (GLM-4-MoE) keeps cos, sin of the
rotated dimensions only.

FSDP over N devices (`qdora.train.fsdp`: FSDP2 `fully_shard` per decoder layer, then the root):
parameters, gradients and optimizer states are divided by N; the quantization state and buffers
stay whole on every rank; named extra terms are the unsharded parameters of two decoder layers
(the one computing and the one prefetched), the root's unsharded embeddings/norm/`lm_head` (the
root is not resharded between forward and backward), and one layer's unsharded gradients awaiting
reduce-scatter (fp32). With CUDA mixed precision the gathered copies are bf16. With CPU offload
the sharded parameters, gradients and optimizer states leave the device (a named line says how
much CPU memory they take). The start (`MemoryPlan.start_bytes`) is predicted beside the step:
every rank streams the checkpoint layer by layer (see `plan` for its terms; validated by
`python -m qdora.eval.plan.validate --start`).

CUDA only: a CUDA context (a constant, `CUDA_CONTEXT_BYTES`) and allocator slack (a stated
fraction of the tensor peak, `ALLOCATOR_SLACK`) are reported as their own lines. Queries and keys
normalised per head or whole (Qwen3, OLMoE) keep their fp32 norm inputs. A mixture of experts
(`ModelShape.num_experts`): its attention as above, its experts, router and shared MLP (FSDP too) in
`qdora.plan.moe`; its dense layers as a dense model's; each kind of layer's sizes in `qdora.plan.sizes`.
"""

from __future__ import annotations

import dataclasses

from qdora.models import shapes
from qdora.models.shapes import PRESETS, ModelShape, resolve_model, shape_from_config  # noqa: F401  (also from here)
from qdora.plan import moe
from qdora.plan.config import (  # noqa: F401  (the setting and result, also from here)
    ALLOCATOR_SLACK,
    CARDS_GB,
    CUDA_CONTEXT_BYTES,
    DEVICES,
    FUSED,
    GIB,
    LINEARS,
    ROUTER,
    TERM_LABELS,
    TERMS,
    MemoryPlan,
    PlanConfig,
)
from qdora.plan.sizes import Dims, Weights, dims, kinds, nf4_bytes, weights  # noqa: F401  (dims: also from here)

QUANT_CHUNK = 1 << 20
"""`qdora.core.nf4.QUANT_CHUNK`: elements the quantizer converts at once."""
CHECKSUM_CHUNK = 1 << 18
"""`qdora.train.fsdp.CHECKSUM_CHUNK`: int32 words the start's checksum sums at once."""


# ---- the model -----------------------------------------------------------------------------

def _checksum_bytes(largest: int) -> int:
    """The start's checksum temporary (`qdora.train.fsdp._checksum`): one chunk of int32 words summed as
    int64, for a group whose largest tensor has `largest` bytes."""
    return 8 * min(CHECKSUM_CHUNK, largest // 4)


def _trained_elements(d: Dims, wt: Weights) -> tuple[int, int]:
    """(trainable elements, bytes each)."""
    size = d.w if d.full else d.ab
    return wt.trainable // size, size


def _optimizer_states(d: Dims, wt: Weights, cfg: PlanConfig) -> int:
    """AdamW's two moments per trained element in its dtype, or bitsandbytes' 8-bit blockwise states
    (uint8 per element and an fp32 absmax per 256, twice); for a bf16 parameter, an fp32 master copy
    (`qdora.core.optim.MasterWeights`), whose moments are fp32."""
    n_el, size = _trained_elements(d, wt)
    master = 4 * n_el if size < 4 and not d.full else 0
    if cfg.optimizer == "adamw":
        return master + 2 * n_el * (4 if master else size)
    return master + 2 * (n_el + 4 * -(-n_el // 256))


def _fsdp_start(wt: Weights, cfg: PlanConfig) -> int:
    """The start (`qdora.train.fsdp.build_sharded`), on every rank: the quantization states and norm
    buffers (kept whole) of the layers read so far, plus this rank's shards of them (none on the
    device with CPU offload), plus the group being read, whole, and what reading it costs:
    - a decoder layer (of each kind, read last): while a weight is quantized (the costliest, last), the
      weight as read (`moe.start_reads`: copied to the GPU; on a CPU device a view of the memory-mapped
      file, but an MoE expert's gate_up joined from copied halves) and the quantizer's tensors (measured:
      ~10 bytes per element up to one chunk; beyond, the packed chunks and their concatenation,
      9/8 byte per element, plus ~7.25 bytes per element of one chunk); or, once complete, its
      checksum's temporary or its new shards;
    - last, the root (embeddings, final norm, head): its checksum's temporary or new shards;
    or, before any of it, an MoE's experts built whole for a moment on a CPU device (`moe.built_on_meta`)."""
    N = cfg.gpus
    shard = {id(lw): 0 if cfg.cpu_offload else -(-lw.whole // N) for _, lw in wt.layers}
    shards = sum(d.L * shard[id(lw)] for d, lw in wt.layers)
    layer = 0
    for d, lw in wt.layers:
        reads = moe.start_reads(d, cfg)
        n_max = max(n for n, _ in reads)
        quantizing = 0
        if cfg.quantized:  # the layer without its adapters and DoRA norm buffers: made once it is read
            quantizing = lw.nf4 + lw.base - lw.buffers + max(read - (n + 1) // 2 + (
                10 * n + n // 16 if n <= QUANT_CHUNK else 9 * n // 8 + 29 * QUANT_CHUNK // 4) for n, read in reads)
        layer_largest = (n_max + 1) // 2 if cfg.quantized else n_max * d.w
        layer_done = lw.whole + max(_checksum_bytes(layer_largest), -(-lw.whole // N))
        layer = max(layer, shards - shard[id(lw)] + max(quantizing, layer_done))
    root_done = wt.root + max(_checksum_bytes(max(wt.embed, wt.head)), -(-wt.root // N))
    return max(*(moe.built_on_meta(d, cfg) for d, _ in wt.layers),
               wt.qstate + wt.buffers + wt.fixed + max(layer, shards + root_done))


def _fsdp_buffers(d: Dims, wt: Weights, cfg: PlanConfig) -> dict[str, int]:
    """What FSDP holds beside the shards while a step computes (its unit: the largest decoder layer)."""
    g_ab = 2 if cfg.device == "cuda" else d.ab    # CUDA mixed precision gathers in bf16 (packed NF4 is bf16)
    unit = wt.unit
    return {"fsdp: 2 decoder layers unsharded (computing + prefetched)":
                2 * (unit.nf4 + unit.base + unit.adapters * g_ab // d.ab),
            "fsdp: root unsharded (embeddings, final norm, lm_head)": wt.root,
            "fsdp: one layer's gradients before reduce-scatter (fp32)":
                wt.trainable_layer * 4 // (d.w if d.full else d.ab)}


def _kept_input(d: Dims, cfg: PlanConfig, names: tuple[str, ...], width: int) -> int:
    """Bytes a group of linears sharing one input keeps of it (with dropout, each adapter its own dropped
    copy and its bool mask: `qdora.core.dropout` on CPU, torch on CUDA)."""
    names = tuple(n for n in names if n in d.lin)
    with_a = [n for n in names if n in d.direction]
    if d.full:
        return d.T * width * d.e if names else 0
    if not with_a:
        return 0
    return len(with_a) * d.T * width * (d.e + 1) if cfg.dropout > 0 else d.T * width * d.e


def _adapter_saved(d: Dims, cfg: PlanConfig, name: str) -> int:
    """What linear `name`'s adapter keeps beyond its input."""
    if name not in d.adapted:
        return 0
    o, _ = d.lin[name]
    out = d.T * cfg.r * d.e if name in d.direction else 0               # a = x·Aᵀ
    if cfg.use_dora:
        out += 3 * o * 4                                                # g, n, m (fp32 vectors)
        # output kept for dm (v, gate, up: kept anyway by the next op; a gated shared MLP's down: by the gate)
        if name.rpartition(".")[2] in ("q_proj", "k_proj", "o_proj", "down_proj", "shared_expert_gate") \
                and not (d.gated and name == f"{d.mlp}down_proj"):
            out += d.T * o * d.e
        if cfg.norm == "exact" and name in d.direction:
            out += o * cfg.r * 4                                        # P = W0·Aᵀ
    return out


def mlp_saved(d: Dims, shape: ModelShape, cfg: PlanConfig) -> int:
    """Bytes autograd keeps for one layer's `mlp` of kind `d`: a dense MLP, or an MoE block (router, experts
    and the shared MLP: gate, silu, up of each MLP, and Qwen2-MoE's gate's sigmoid and the output it scales)."""
    T, h, i, e, p = d.T, d.h, d.i, d.e, d.mlp
    mlp = 3 * T * i * e + (T * e + T * h * e if d.gated else 0)
    return (mlp + _kept_input(d, cfg, (f"{p}gate_proj", f"{p}up_proj", "shared_expert_gate"), h)
            + _kept_input(d, cfg, (f"{p}down_proj",), i) + moe.saved(d, shape, cfg)
            + sum(_adapter_saved(d, cfg, n) for n in d.lin if n not in shape.attention_shapes()))


def _trains(d: Dims, names: tuple[str, ...]) -> bool:
    """Whether any of these linears of layer kind `d` has a trainable tensor (adapter, magnitude or weight)."""
    return any(n in d.lin and (d.full or n in d.adapted) for n in names)


def tiled_layer_saved(d: Dims, shape: ModelShape, cfg: PlanConfig) -> int:
    """`layer_saved` with tiled layers (`qdora.tiled_layers`): each norm keeps its input `T·h·e` (the first, the
    layer's input: under gradient checkpointing the checkpoint itself, counted with the checkpoints), the q/k/v
    projections their shared input where one trains, the q/k norms their inputs; the attention its own tensors
    (q, k after the rotary embedding, v, its output, the logsumexp), o's input being that output (SDPA's and
    flash attention's output is laid out token-major, and the reshape before o is a view: measured on CPU's
    saved tensors); the MLP its input."""
    e, T, h, q, kv = d.e, d.T, d.h, d.q, d.kv
    attn = attention_kept(d, shape)
    if shape.qk_norm:
        attn += T * (q + kv) * e
    norms = (shape.norms - 1 if cfg.gradient_checkpointing else shape.norms) * T * h * e
    return norms + attn + (T * h * e if _trains(d, ("q_proj", "k_proj", "v_proj")) else 0) + T * h * e


def attention_kept(d: Dims, shape: ModelShape) -> int:
    """What one layer's attention keeps for its backward: q, k (after the rotary embedding), v and its output, and
    SDPA's fp32 logsumexp per head and token (the soft-capped attention's tiles keep none: their backward computes
    them again)."""
    return d.T * (2 * d.q + 2 * d.kv) * d.e + (0 if shape.softcap_attention else d.b * shape.heads * d.s * 4)


def softcap_tile(d: Dims, shape: ModelShape, cfg: PlanConfig) -> int:
    """What the soft-capped attention's largest tile (`qdora.models.shapes.softcap_tile_rows`; on a full-attention
    layer, `rows × heads × s` scores) holds at the peak of its backward: 16 bytes a score in fp32 (four fp32
    copies), 14 in bf16 (two fp32: the softmax and its gradient; three bf16), measured on CPU (the slope of the
    backward's peak over 4 to 64 MiB tiles); 0 where the scores are not soft-capped."""
    if not shape.softcap_attention:
        return 0
    scores = min(d.s, shapes.softcap_tile_rows(shape.heads, d.s, cfg.device)) * shape.heads * d.s
    return scores * (16 if d.e == 4 else 8 + 3 * d.e)


def layer_saved(d: Dims, shape: ModelShape, cfg: PlanConfig) -> int:
    """Bytes autograd keeps for one decoder layer of kind `d`, gradient checkpointing off: its RMSNorms (two,
    Gemma's four), its attention, its `mlp` (`mlp_saved`; tiled, its input); with tiled layers `tiled_layer_saved`."""
    if layer_tile(d, shape, cfg):
        return tiled_layer_saved(d, shape, cfg)
    e, T, h, q, kv = d.e, d.T, d.h, d.q, d.kv
    norm_saved = T * h * 4 + T * 4 + (T * h * e if d.full else 0)
    attn_saved = attention_kept(d, shape)
    if shape.qk_norm:  # fp32 inputs (on CPU, DoRA's kept q/k outputs themselves) and a 1/rms per row
        rows = T * (shape.heads + shape.kv_heads) if shape.qk_norm == "head" else 2 * T
        attn_saved += rows * 4 + sum(T * w * 4 for name, w in (("q_proj", q), ("k_proj", kv))
                                     if not (e == 4 and cfg.use_dora and name in d.adapted))
    # Gemma's norms after the attention and after the MLP: their inputs are o's and down's outputs, which DoRA in
    # fp32 keeps itself (on CPU, as the q/k norms above; measured on the saved tensors)
    post = sum(norm_saved - (T * h * 4 if e == 4 and cfg.use_dora and name in d.adapted else 0)
               for name in ("o_proj", "down_proj")[:shape.norms - 2])
    return (2 * norm_saved + post + attn_saved + _kept_input(d, cfg, ("q_proj", "k_proj", "v_proj"), h)
            + _kept_input(d, cfg, ("o_proj",), q) + sum(_adapter_saved(d, cfg, n) for n in shape.attention_shapes())
            + _tiled_mlp_saved(d, shape, cfg))


def mlp_tile(d: Dims, shape: ModelShape, cfg: PlanConfig) -> int:
    """Tokens per tile of the tiled MLP (`qdora.tiled_mlp`, `qdora.tiled_layers`: `mlp_tile_tokens`, or the hidden
    size), or 0 where the MLP runs whole (not tiled, or a micro-batch no longer than one tile: it then runs
    untiled)."""
    tile = cfg.mlp_tile_tokens or shape.hidden
    return tile if (cfg.tiled_mlp or cfg.tiled_layers) and d.T > tile else 0


def layer_tile(d: Dims, shape: ModelShape, cfg: PlanConfig) -> int:
    """Tokens per tile of the tiled layers (`qdora.tiled_layers`), or 0 where they run whole (as `mlp_tile`)."""
    return mlp_tile(d, shape, cfg) if cfg.tiled_layers else 0


def tiled(d: Dims, tokens: int) -> Dims:
    """The sizes of one tile of `tokens` tokens of layer kind `d` (a tile is one row of tokens)."""
    return dataclasses.replace(d, T=tokens, s=tokens, b=1)


def _tiled_mlp_saved(d: Dims, shape: ModelShape, cfg: PlanConfig) -> int:
    """What one layer's MLP keeps for the backward: its saved activations (`mlp_saved`), or tiled, the
    input its tiles are recomputed from (`T·h·e`)."""
    return d.T * d.h * d.e if mlp_tile(d, shape, cfg) else mlp_saved(d, shape, cfg)


def checkpoints_on_device(shape: ModelShape, cfg: PlanConfig) -> int:
    """Checkpointed layer inputs on the device at once: every layer's, or with offloaded activations on CUDA
    two (the layer computing, and the one whose copy to or from the host is in flight). On a CPU device the
    host copies are the checkpoints, and the layer backward holds two more (`_layer_backward`)."""
    if cfg.offload_activations and cfg.device == "cuda":
        return min(2, shape.layers)
    return shape.layers


def _activations(ds: list[Dims], shape: ModelShape, cfg: PlanConfig) -> tuple[int, int, list[int], int]:
    """Activations saved for the backward: `(body, head_saved, per_layer, lsm)` — the decoder stack's (with
    gradient checkpointing its layer inputs on the device: `checkpoints_on_device`), the final norm's, one
    layer's of each kind (recomputed under gradient checkpointing), the log-softmax."""
    d = ds[0]
    e, T, h = d.e, d.T, d.h
    saved = [layer_saved(k, shape, cfg) for k in ds]
    shared = 2 * d.s * shape.rd * e                                     # rotary cos, sin
    W = shape.sliding_window
    if W and d.s > W and not shape.softcap_attention:  # the windowed layers' shared band mask (`band_mask`)
        shared += W * (2 * W - 1) * e
    # final norm (tiled with the layers: its input) (+ lm_head input)
    head_saved = (T * h * e if layer_tile(d, shape, cfg) else T * h * 4 + T * 4) + (2 * T * h * e if d.full else 0)
    lsm = T * d.V * 4
    if cfg.gradient_checkpointing:
        return checkpoints_on_device(shape, cfg) * T * h * e + shared, head_saved, saved, lsm
    # the first layer's input RMSNorm saves nothing when the embeddings are frozen
    body = sum(k.L * s for k, s in zip(ds, saved))
    first = 0 if d.full else T * h * e if layer_tile(d, shape, cfg) else T * h * 4 + T * 4
    return body - first + shared, head_saved, saved, lsm


def chunked_loss_bytes(d: Dims, shape: ModelShape, cfg: PlanConfig) -> tuple[int, int]:
    """`(forward, backward)`: what the chunked loss (`qdora.chunked_loss`, `qdora.core.loss`) adds to the saved
    activations at the end of the forward and at the peak of its own backward. `N = b·(s − 1)` rows predict
    a label (all supervised at most), `c = min(N, loss_chunk_tokens or default_chunk_tokens(V))`.
    Kept from the forward to its backward: the supervised rows of the hidden states gathered `N·h·e`, the
    fp32 logsumexp `N·4`, their labels `N·8` and the gather's two int64 row indices `2·N·8`. Forward: the
    final norm's output `T·h·e` (held while the loss runs; already counted for full fine-tuning) and one
    chunk's logits in the compute dtype and their fp32 upcast `c·V·(e + 4)` (`c·V·4` on fp32: the same tensor),
    the logsumexp's temporaries in place. Backward: `dh (N·h·e)`, one chunk's recomputed logits as above
    (softmax and dz in their fp32 storage; with soft-capping `p` beside `tanh`, `c·V·4` more), its
    `dz·W (c·h·e)`; full fine-tuning adds the head's fp32 weight gradient `V·h·4` (and its cast to `e`)."""
    from qdora.core.loss import default_chunk_tokens  # imports torch: only when a chunked loss is planned

    e, V, H, T = d.e, d.V, d.h, d.T
    N = d.b * (d.s - 1)
    c = max(1, min(N, cfg.loss_chunk_tokens or default_chunk_tokens(V)))
    logits = c * V * 4 + (c * V * e if e != 4 else 0)
    kept = N * H * e + N * 4 + N * 8 + 2 * N * 8
    forward = kept + (0 if d.full else T * H * e) + logits
    backward = kept + N * H * e + logits + c * H * e
    if shape.softcap_logits:
        backward += c * V * 4
    if d.full:  # (the norm's output, the head's input counted in the saved activations, is no longer kept)
        backward += V * H * 4 + (V * H * e if e != 4 else 0) - T * H * e
    return forward, backward


def _dequantized_block(d: Dims, cfg: PlanConfig) -> int:
    """The largest dequantized weight of a layer of kind `d` alive at once in its backward."""
    shapes = {**d.lin, **d.experts}
    frozen_nf4 = [n for n in shapes if n not in d.adapted] if cfg.quantized else []
    if frozen_nf4 and not cfg.fsdp:      # bitsandbytes' Linear4bit dequantizes the whole weight
        return max(shapes[n][0] * shapes[n][1] for n in frozen_nf4) * d.e
    if cfg.quantized:                    # row blocks (adapted layers; frozen ones under FSDP)
        return max(min(cfg.block_rows, o) * n for o, n in shapes.values()) * d.e
    return 0


def _layer_backward(ds: list[Dims], saved: list[int], shape: ModelShape, cfg: PlanConfig) -> tuple[int, int]:
    """`(recomputed activations, temporaries)` of the costliest layer's backward, over the kinds of layer:
    its recomputed activations under gradient checkpointing, the gradients in flight through its MLP (a
    dense one: gate, silu, up) or MoE block (`moe.in_flight`) and its residual, its dequantized weight."""
    out = []
    for d, kept in zip(ds, saved):
        flight = 3 * d.T * d.h * d.e
        tile = mlp_tile(d, shape, cfg)
        if tile:  # the residual's gradient, beside one tile's MLP recomputed and its backward and the input gradient
            # the tiles fill, or the attention's backward (the gradients of its output, q, k and v; the MLP's and
            # the second norm's inputs, counted as kept, are freed by then), the larger; measured on CPU
            t = tiled(d, tile)
            norm2 = d.T * d.h * d.e if layer_tile(d, shape, cfg) else d.T * d.h * 4 + d.T * 4
            flight = d.T * d.h * d.e + max(d.T * d.h * d.e + mlp_saved(t, shape, cfg)
                                           + (moe.in_flight(t, shape, cfg) if d.E else 3 * t.T * t.i * t.e),
                                           d.T * (2 * d.q + 2 * d.kv) * d.e - d.T * d.h * d.e - norm2
                                           + softcap_tile(d, shape, cfg))
        elif d.E:
            flight += moe.in_flight(d, shape, cfg)
        else:  # a dense MLP's backward: two `T·i` gradients in flight while gate, silu, up are still kept,
            # the residual's gradients no longer (measured on CPU's live tensors at the peak)
            flight = max(flight, 2 * d.T * d.i * d.e)
        if shape.softcap_attention and not tile:  # the attention's backward, the MLP's kept tensors freed by then:
            # the gradients of its output, q, k and v, and one tile of scores recomputed
            flight = max(flight, d.T * (2 * d.q + 2 * d.kv) * d.e + softcap_tile(d, shape, cfg)
                         - _tiled_mlp_saved(d, shape, cfg))
        if cfg.offload_activations and cfg.device == "cpu":  # beside the host copies (the checkpoints), the
            kept += 2 * d.T * d.h * d.e                      # input fetched back and the one prefetched
        out.append((kept if cfg.gradient_checkpointing else 0, flight + _dequantized_block(d, cfg)))
    return max(out, key=sum)


def plan(model: ModelShape | str, cfg: PlanConfig | None = None) -> MemoryPlan:
    """Predict the peak memory per device of one training step (forward, backward, clip, optimizer):
    each term by its own function, then the four phases of a step, the peak the largest."""
    shape = resolve_model(model) if isinstance(model, str) else model
    cfg = cfg or PlanConfig()
    asked = cfg
    if cfg.objective != "sft":  # a pair is two sequences, the chosen and the rejected reply after the prompt
        cfg = cfg.replace(batch_size=2 * cfg.batch_size)
    moe.check(shape, cfg)
    ds = kinds(shape, cfg)
    d = ds[0]                                             # (an MoE's MoE layers: the experts' terms)
    wt = weights(ds, shape, cfg)
    nf4, base, adapters = wt.nf4, wt.base, wt.adapters
    opt_states = _optimizer_states(d, wt, cfg)
    grads_total = wt.trainable
    details: dict[str, int] = moe.expert_details(shape, cfg, d, nf4_bytes)
    fsdp_buf = start = 0
    if cfg.fsdp:  # parameters, gradients, optimizer states sharded; quant state and buffers whole
        start = _fsdp_start(wt, cfg)
        nf4, base, adapters = -(-nf4 // d.N), -(-base // d.N), -(-adapters // d.N)
        grads_total, opt_states = -(-wt.trainable // d.N), -(-opt_states // d.N)
        details.update(buffers := _fsdp_buffers(d, wt, cfg))
        fsdp_buf = sum(buffers.values())  # (not the experts' lines: parts of the resident terms)
        if cfg.cpu_offload:
            details["cpu offload: sharded parameters, gradients, optimizer states in CPU memory"] = \
                nf4 + base + adapters + grads_total + opt_states
            nf4 = base = adapters = grads_total = opt_states = 0
    if cfg.offload_activations and cfg.device == "cuda":
        details["offloaded activations: checkpointed layer inputs in pinned host memory (not on the GPU)"] = \
            shape.layers * d.T * d.h * d.e
    adapters += wt.buffers
    live_reference = cfg.objective == "dpo" and not cfg.precompute_reference
    if live_reference and d.full:  # full fine-tuning's reference: a frozen copy of the model before training
        details["dpo reference: a frozen copy of the model"] = base + wt.fixed
        base += base + wt.fixed
    resident = nf4 + wt.qstate + base + adapters + opt_states + wt.fixed

    body, head_saved, saved, lsm = _activations(ds, shape, cfg)
    recompute, layer_tmp = _layer_backward(ds, saved, shape, cfg)
    opt_tmp = 2 * wt.largest_trainable if cfg.device == "cpu" else grads_total  # 0 with offload: CPU steps
    n_el, size = _trained_elements(d, wt)
    if size < 4 and not d.full:  # the master copies' fp32 gradients, made for the step
        opt_tmp += 4 * (-(-n_el // d.N) if cfg.fsdp else n_el)
    grads_head = (wt.root - (0 if shape.tied_embeddings else wt.embed)) if d.full else 0
    grads_head = -(-grads_head // d.N) if cfg.fsdp else grads_head
    grad_layer = -(-wt.trainable_layer // d.N) if cfg.fsdp else wt.trainable_layer
    if cfg.cpu_offload:
        grads_head = grad_layer = 0
    kept_grads = grads_total if cfg.grad_accum > 1 else 0   # accumulated over the earlier micro-batches

    logits_fwd = d.T * d.V * d.e + (d.T * d.V * 4 if d.e != 4 else 0) + lsm
    logits_bwd = 3 * lsm
    if cfg.chunked_loss:
        logits_fwd, logits_bwd = chunked_loss_bytes(d, shape, cfg)
    phase_parts = {
        "forward end (loss)": {"activations": body + head_saved, "logits_loss": logits_fwd,
                               "gradients": kept_grads},
        "loss backward": {"activations": body + head_saved, "logits_loss": logits_bwd, "gradients": kept_grads},
        "layer backward": {"activations": body + recompute, "temporaries": layer_tmp,
                           "gradients": kept_grads or grads_head + grad_layer},
        "optimizer step": {"gradients": grads_total, "temporaries": opt_tmp},
    }
    fsdp_in_phase = {"forward end (loss)": True, "loss backward": True, "layer backward": True,
                     "optimizer step": False}
    if live_reference:  # after the policy's forward, its saved activations kept: the reference's forward
        # under no_grad, one layer's working set at a time (as a recomputed layer) and its chunked head
        ref_fwd = chunked_loss_bytes(d, shape, cfg)[0] if cfg.chunked_loss else logits_fwd
        phase_parts["reference forward"] = {"activations": body + head_saved, "temporaries": recompute + ref_fwd,
                                            "gradients": kept_grads}
        fsdp_in_phase["reference forward"] = True
    phases = {name: resident + sum(parts.values()) + (fsdp_buf if fsdp_in_phase[name] else 0)
              for name, parts in phase_parts.items()}
    peak_phase = max(phases, key=phases.get)
    at_peak = phase_parts[peak_phase]
    terms = {
        "nf4_weights": nf4, "quant_state": wt.qstate, "base_weights": base + wt.fixed,
        "adapters": adapters, "gradients": at_peak.get("gradients", 0), "optimizer_states": opt_states,
        "activations": at_peak.get("activations", 0), "logits_loss": at_peak.get("logits_loss", 0),
        "temporaries": at_peak.get("temporaries", 0),
        "fsdp_buffers": fsdp_buf if fsdp_in_phase[peak_phase] else 0,
        "cuda_context": 0, "allocator_slack": 0,
    }
    if cfg.device == "cuda":
        terms["cuda_context"] = CUDA_CONTEXT_BYTES
        terms["allocator_slack"] = int(ALLOCATOR_SLACK * phases[peak_phase])
    return MemoryPlan(shape, asked, terms, peak_phase, phases, details, start, moe.resolve_targets(shape, cfg)[2])


MAX_SEQ_CARDS_GB = (8, 12, 16, 24, 40, 48, 80)
"""Card sizes `qdora plan --max-seq-len` answers for (GB as sold: a 24 GB card holds 24 GiB)."""
SEARCH_LIMIT = 1 << 24
"""The longest sequence `longest_sequence` considers (16M tokens)."""


def at_length(cfg: PlanConfig, seq_len: int) -> PlanConfig:
    """`cfg` at `seq_len` tokens, its loss chunk and MLP tile no longer than the sequence (a chunk or tile
    of the whole sequence is the shorter sequence's own)."""
    return cfg.replace(seq_len=seq_len, loss_chunk_tokens=min(cfg.loss_chunk_tokens, seq_len),
                       mlp_tile_tokens=min(cfg.mlp_tile_tokens, seq_len))


def longest_sequence(model: ModelShape | str, cfg: PlanConfig, card_gb: float, margin: bool = True) -> int:
    """The longest `seq_len` (at `cfg`'s batch size and every other setting) whose plan fits a `card_gb` card:
    with `margin`, with the planner's `FIT_MARGIN` to spare (`MemoryPlan.verdict` "yes"), else within the card
    ("tight" too). 0 if not even one token fits. Binary search: the plan grows with the sequence."""
    shape = resolve_model(model) if isinstance(model, str) else model
    ok = ("yes",) if margin else ("yes", "tight")

    def fits(n: int) -> bool:
        return plan(shape, at_length(cfg, n)).verdict(card_gb) in ok

    if not fits(1):
        return 0
    lo, hi = 1, SEARCH_LIMIT
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


__all__ = ["ModelShape", "PRESETS", "PlanConfig", "MemoryPlan", "plan", "resolve_model", "shape_from_config",
           "CARDS_GB", "MAX_SEQ_CARDS_GB", "longest_sequence"]
