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
    layer backward   saved activations (or, with gradient checkpointing, the L checkpointed layer
                     inputs `L·T·h·e` plus one layer's recomputed activations) + the gradients in
                     flight through one layer + the dequantized base weight of the largest frozen
                     NF4 layer (bitsandbytes dequantizes it whole; FSDP's path and the adapted
                     layers go row block by row block: `block_rows × in`).
    optimizer step   all gradients + AdamW's temporaries (CPU: the largest parameter twice;
                     CUDA: torch's foreach path, one copy of all trainable parameters) + the
                     fp32 gradients of the master copies of bf16 adapters.
    With gradient accumulation the gradients of the earlier micro-batches are in every phase.

Saved activations of one Llama decoder layer (autograd's saved tensors, measured on CPU with
saved-tensor hooks and derived from the code): each RMSNorm keeps its fp32 input `T·h·4`; the
attention (SDPA flash/efficient kernels, no padding mask) keeps q, k (after rotary), v, its output
and an fp32 logsumexp per head and token; the MLP keeps `gate`, `silu(gate)`, `up` (`3·T·i·e`).
A linear keeps its input only if its weight trains (full) or it has an adapter: then its input
(or, with dropout, each adapter's own dropped-out copy plus the dropout mask), `a = x·Aᵀ (T·r)`,
and for DoRA its output (`dm` is recovered from it; shared when the next op keeps it anyway: v,
gate, up). Full fine-tuning adds the normalised RMSNorm outputs (their weight trains).

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
(`ModelShape.num_experts`): its attention as above, its experts and router (FSDP too) in `qdora.plan.moe`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qdora.core.config import FLOAT_DTYPES
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

QUANT_CHUNK = 1 << 20
"""`qdora.core.nf4.QUANT_CHUNK`: elements the quantizer converts at once."""
CHECKSUM_CHUNK = 1 << 18
"""`qdora.train.fsdp.CHECKSUM_CHUNK`: int32 words the start's checksum sums at once."""
_DTYPE_BYTES = {name: dtype.itemsize for name, dtype in FLOAT_DTYPES.items()}


# ---- the model -----------------------------------------------------------------------------

def _checksum_bytes(largest: int) -> int:
    """The start's checksum temporary (`qdora.train.fsdp._checksum`): one chunk of int32 words summed as
    int64, for a group whose largest tensor has `largest` bytes."""
    return 8 * min(CHECKSUM_CHUNK, largest // 4)


def _nf4_bytes(out_f: int, in_f: int, double_quant: bool) -> tuple[int, int]:
    """(packed bytes, quantization-state bytes) of one NF4 weight."""
    numel = out_f * in_f
    blocks = -(-numel // 64)
    if double_quant:
        state = blocks + 4 * -(-blocks // 256) + 4 + 16 * 4 + 256 * 4
    else:
        state = 4 * blocks + 16 * 4
    return (numel + 1) // 2, state


@dataclass(frozen=True)
class _Dims:
    """The sizes every term is written in (one place, the math's own symbols)."""
    e: int              # compute dtype bytes
    w: int              # storage bytes of unquantized tensors: bf16 on CUDA, fp32 on CPU
    ab: int             # adapter dtype bytes
    N: int              # devices
    T: int              # tokens per micro-batch
    s: int              # sequence length
    b: int              # batch size
    h: int
    i: int
    V: int
    L: int
    q: int              # query width (heads × head_dim)
    kv: int             # key/value width
    lin: dict           # (out, in) of each linear of one layer (of an MoE layer: the attention's)
    experts: dict       # (out, in) of one expert's projections (MoE)
    E: int              # experts per MoE layer (0: dense)
    k: int              # experts per token
    ei: int             # an expert's intermediate size
    full: bool
    direction: frozenset
    mag_only: frozenset

    @property
    def adapted(self) -> frozenset:
        return self.direction | self.mag_only

    def units(self) -> list[tuple[str, int, int, int]]:
        """`(name, out, in, how many)` of the weights of one decoder layer: linears, experts, router."""
        return ([(n, o, i, 1) for n, (o, i) in self.lin.items()] + [(n, o, i, self.E) for n, (o, i) in
                                                                    self.experts.items()]
                + ([(ROUTER, self.E, self.h, 1)] if self.E else []))


def dims(shape: ModelShape, cfg: PlanConfig) -> _Dims:
    """The sizes every term of `shape` under `cfg` is written in."""
    direction, mag_only, _ = moe.resolve_targets(shape, cfg)
    return _Dims(e=cfg.compute_bytes, w=cfg.compute_bytes, ab=_DTYPE_BYTES[cfg.adapter_dtype], N=cfg.gpus,
                 T=cfg.batch_size * cfg.seq_len, s=cfg.seq_len, b=cfg.batch_size, h=shape.hidden,
                 i=0 if shape.moe else shape.intermediate, V=shape.vocab, L=shape.layers, q=shape.heads * shape.hd,
                 kv=shape.kv_heads * shape.hd, lin=shape.linear_shapes(), experts=shape.expert_shapes(),
                 E=shape.num_experts, k=shape.experts_per_token, ei=shape.moe_intermediate,
                 full=cfg.method == "full", direction=direction, mag_only=mag_only)


@dataclass
class _Weights:
    """Resident weights, whole model (and one decoder layer, the FSDP unit): NF4 data, quantization
    state, unquantized weights, adapters, the DoRA norm buffers, and what trains."""
    nf4: int
    qstate: int
    base: int
    adapters: int
    buffers: int
    nf4_layer: int
    base_layer: int
    adapters_layer: int
    trainable: int
    trainable_layer: int
    largest_trainable: int
    embed: int
    head: int
    root: int
    rope: int


def _weights(d: _Dims, shape: ModelShape, cfg: PlanConfig) -> _Weights:
    nf4 = qstate = base = adapters = buffers = 0
    trainable_layer = largest_trainable = 0
    for name, o, n, count in d.units():
        if cfg.quantized and name != ROUTER:  # the router stays in the storage dtype
            packed, st = _nf4_bytes(o, n, cfg.double_quant)
            nf4 += count * packed
            qstate += count * st
        else:
            base += count * o * n * d.w
        if name in d.adapted:
            a_bytes = (cfg.r * n + o * cfg.r) * d.ab if name in d.direction else 0
            m_bytes = o * d.ab if cfg.use_dora else 0
            adapters += count * (a_bytes + m_bytes)
            buffers += count * o * 4 if cfg.use_dora else 0
            trainable_layer += count * (a_bytes + m_bytes)
            largest_trainable = max(largest_trainable,
                                    max(cfg.r * n, o * cfg.r) * d.ab if name in d.direction else o * d.ab)
    base += (2 * d.h + shape.qk_norm_params()) * d.w  # the layer's RMSNorm weights (+ q/k norms)
    nf4_l, base_l, adapt_l = nf4, base, adapters
    embed = d.V * d.h * d.w
    head = 0 if shape.tied_embeddings else d.V * d.h * d.w
    root = embed + head + d.h * d.w               # embeddings, lm_head (full precision), final norm
    base = d.L * base + root
    if d.full:
        trainable = base                          # every weight trains, in its storage dtype
        trainable_layer = base_l
        largest_trainable = max(embed, *(count * o * n * d.w for _, o, n, count in d.units()))
    else:
        trainable = d.L * trainable_layer
    return _Weights(nf4=d.L * nf4, qstate=d.L * qstate, base=base, adapters=d.L * adapters, buffers=d.L * buffers,
                    nf4_layer=nf4_l, base_layer=base_l, adapters_layer=adapt_l, trainable=trainable,
                    trainable_layer=trainable_layer, largest_trainable=largest_trainable, embed=embed, head=head,
                    root=root, rope=2 * (shape.hd // 2) * 4)  # rope: inv_freq and its original copy (fp32)


def _trained_elements(d: _Dims, wt: _Weights) -> tuple[int, int]:
    """(trainable elements, bytes each)."""
    size = d.w if d.full else d.ab
    return wt.trainable // size, size


def _optimizer_states(d: _Dims, wt: _Weights, cfg: PlanConfig) -> int:
    """AdamW's two moments per trained element in its dtype, or bitsandbytes' 8-bit blockwise states
    (uint8 per element and an fp32 absmax per 256, twice); for a bf16 parameter, an fp32 master copy
    (`qdora.core.optim.MasterWeights`), whose moments are fp32."""
    n_el, size = _trained_elements(d, wt)
    master = 4 * n_el if size < 4 and not d.full else 0
    if cfg.optimizer == "adamw":
        return master + 2 * n_el * (4 if master else size)
    return master + 2 * (n_el + 4 * -(-n_el // 256))


def _fsdp_start(d: _Dims, wt: _Weights, cfg: PlanConfig) -> int:
    """The start (`qdora.train.fsdp.build_sharded`), on every rank: the quantization states and norm
    buffers (kept whole) of the layers read so far, plus this rank's shards of them (none on the
    device with CPU offload), plus the group being read, whole, and what reading it costs:
    - a decoder layer: while a weight is quantized (the costliest, last), the weight as read
      (`moe.start_reads`: copied to the GPU; on a CPU device a view of the memory-mapped file, but an
      MoE expert's gate_up joined from copied halves) and the quantizer's tensors (measured:
      ~10 bytes per element up to one chunk; beyond, the packed chunks and their concatenation,
      9/8 byte per element, plus ~7.25 bytes per element of one chunk); or, once complete, its
      checksum's temporary or its new shards;
    - last, the root (embeddings, final norm, head): its checksum's temporary or new shards;
    or, before any of it, an MoE's experts built whole for a moment on a CPU device (`moe.built_on_meta`)."""
    reads = moe.start_reads(d, cfg)
    n_max = max(n for n, _ in reads)
    layer_whole = wt.nf4_layer + wt.base_layer + wt.adapters_layer
    layer_shard = 0 if cfg.cpu_offload else -(-layer_whole // d.N)
    quantizing = 0
    if cfg.quantized:  # the layer without its adapters and DoRA norm buffers: made once it is read
        quantizing = wt.nf4_layer + wt.base_layer - wt.buffers // d.L + max(read - (n + 1) // 2 + (
            10 * n + n // 16 if n <= QUANT_CHUNK else 9 * n // 8 + 29 * QUANT_CHUNK // 4) for n, read in reads)
    layer_largest = (n_max + 1) // 2 if cfg.quantized else n_max * d.w
    layer_done = layer_whole + max(_checksum_bytes(layer_largest), -(-layer_whole // d.N))
    root_done = wt.root + max(_checksum_bytes(max(wt.embed, wt.head)), -(-wt.root // d.N))
    return max(moe.built_on_meta(d, cfg), wt.qstate + wt.buffers + wt.rope + max(
        (d.L - 1) * layer_shard + max(quantizing, layer_done), d.L * layer_shard + root_done))


def _fsdp_buffers(d: _Dims, wt: _Weights, cfg: PlanConfig) -> dict[str, int]:
    """What FSDP holds beside the shards while a step computes."""
    g_ab = 2 if cfg.device == "cuda" else d.ab    # CUDA mixed precision gathers in bf16 (packed NF4 is bf16)
    layer_unsharded = wt.nf4_layer + wt.base_layer + wt.adapters_layer * g_ab // d.ab
    return {"fsdp: 2 decoder layers unsharded (computing + prefetched)": 2 * layer_unsharded,
            "fsdp: root unsharded (embeddings, final norm, lm_head)": wt.root,
            "fsdp: one layer's gradients before reduce-scatter (fp32)":
                wt.trainable_layer * 4 // (d.w if d.full else d.ab)}


def _activations(d: _Dims, shape: ModelShape, cfg: PlanConfig) -> tuple[int, int, int, int]:
    """Activations saved for the backward: `(body, head_saved, recompute, lsm)` — the decoder stack's,
    the final norm's, one layer's recomputed under gradient checkpointing, the log-softmax."""
    e, T, h, i, q, kv = d.e, d.T, d.h, d.i, d.q, d.kv
    mask_b = 1                                     # dropout mask: bool (`qdora.core.dropout` on CPU, torch on CUDA)
    dp = cfg.dropout > 0

    def keeps_input(names: tuple[str, ...], width: int) -> int:
        """Bytes a group of linears sharing one input keeps of it."""
        if d.full:
            return T * width * e
        with_a = [n for n in names if n in d.direction]
        if not with_a:
            return 0
        return len(with_a) * T * width * (e + mask_b) if dp else T * width * e

    def adapter_saved(name: str) -> int:
        if name not in d.adapted:
            return 0
        o, _ = d.lin[name]
        out = T * cfg.r * e if name in d.direction else 0               # a = x·Aᵀ
        if cfg.use_dora:
            out += 3 * o * 4                                            # g, n, m (fp32 vectors)
            if name in ("q_proj", "k_proj", "o_proj", "down_proj"):     # output kept for dm
                out += T * o * e
            if cfg.norm == "exact" and name in d.direction:
                out += o * cfg.r * 4                                    # P = W0·Aᵀ
        return out

    norm_saved = T * h * 4 + T * 4 + (T * h * e if d.full else 0)
    attn_saved = T * (2 * q + 2 * kv) * e + d.b * shape.heads * d.s * 4
    if shape.qk_norm:  # fp32 inputs (on CPU, DoRA's kept q/k outputs themselves) and a 1/rms per row
        rows = T * (shape.heads + shape.kv_heads) if shape.qk_norm == "head" else 2 * T
        attn_saved += rows * 4 + sum(T * w * 4 for name, w in (("q_proj", q), ("k_proj", kv))
                                     if not (e == 4 and cfg.use_dora and name in d.adapted))
    mlp_saved = 3 * T * i * e
    layer_saved = (2 * norm_saved + attn_saved + mlp_saved
                   + keeps_input(("q_proj", "k_proj", "v_proj"), h) + keeps_input(("o_proj",), q)
                   + keeps_input(("gate_proj", "up_proj"), h) + keeps_input(("down_proj",), i)
                   + sum(adapter_saved(n) for n in d.lin) + moe.saved(d, shape, cfg))
    shared = 2 * d.s * shape.hd * e                                     # rotary cos, sin
    head_saved = T * h * 4 + T * 4 + (2 * T * h * e if d.full else 0)   # final norm (+ lm_head input)
    lsm = T * d.V * 4
    if cfg.gradient_checkpointing:
        return d.L * T * h * e + shared, head_saved, layer_saved, lsm
    # the first layer's input RMSNorm saves nothing when the embeddings are frozen
    return d.L * layer_saved - (0 if d.full else T * h * 4 + T * 4) + shared, head_saved, 0, lsm


def _dequantized_block(d: _Dims, cfg: PlanConfig) -> int:
    """The largest dequantized weight alive at once in the backward."""
    shapes = {**d.lin, **d.experts}
    frozen_nf4 = [n for n in shapes if n not in d.adapted] if cfg.quantized else []
    if frozen_nf4 and not cfg.fsdp:      # bitsandbytes' Linear4bit dequantizes the whole weight
        return max(shapes[n][0] * shapes[n][1] for n in frozen_nf4) * d.e
    if cfg.quantized:                    # row blocks (adapted layers; frozen ones under FSDP)
        return max(min(cfg.block_rows, o) * n for o, n in shapes.values()) * d.e
    return 0


def plan(model: ModelShape | str, cfg: PlanConfig | None = None) -> MemoryPlan:
    """Predict the peak memory per device of one training step (forward, backward, clip, optimizer):
    each term by its own function, then the four phases of a step, the peak the largest."""
    shape = resolve_model(model) if isinstance(model, str) else model
    cfg = cfg or PlanConfig()
    moe.check(shape, cfg)
    d = dims(shape, cfg)
    wt = _weights(d, shape, cfg)
    nf4, base, adapters = wt.nf4, wt.base, wt.adapters
    opt_states = _optimizer_states(d, wt, cfg)
    grads_total = wt.trainable
    details: dict[str, int] = moe.expert_details(shape, cfg, d, _nf4_bytes)
    fsdp_buf = start = 0
    if cfg.fsdp:  # parameters, gradients, optimizer states sharded; quant state and buffers whole
        start = _fsdp_start(d, wt, cfg)
        nf4, base, adapters = -(-nf4 // d.N), -(-base // d.N), -(-adapters // d.N)
        grads_total, opt_states = -(-wt.trainable // d.N), -(-opt_states // d.N)
        details.update(buffers := _fsdp_buffers(d, wt, cfg))
        fsdp_buf = sum(buffers.values())  # (not the experts' lines: parts of the resident terms)
        if cfg.cpu_offload:
            details["cpu offload: sharded parameters, gradients, optimizer states in CPU memory"] = \
                nf4 + base + adapters + grads_total + opt_states
            nf4 = base = adapters = grads_total = opt_states = 0
    adapters += wt.buffers
    resident = nf4 + wt.qstate + base + adapters + opt_states + wt.rope

    body, head_saved, recompute, lsm = _activations(d, shape, cfg)
    in_flight = 3 * d.T * d.i * d.e + 3 * d.T * d.h * d.e + moe.in_flight(d)  # through the MLP + residual
    deq = _dequantized_block(d, cfg)
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
    phase_parts = {
        "forward end (loss)": {"activations": body + head_saved, "logits_loss": logits_fwd,
                               "gradients": kept_grads},
        "loss backward": {"activations": body + head_saved, "logits_loss": 3 * lsm, "gradients": kept_grads},
        "layer backward": {"activations": body + recompute, "temporaries": in_flight + deq,
                           "gradients": kept_grads or grads_head + grad_layer},
        "optimizer step": {"gradients": grads_total, "temporaries": opt_tmp},
    }
    fsdp_in_phase = {"forward end (loss)": True, "loss backward": True, "layer backward": True,
                     "optimizer step": False}
    phases = {name: resident + sum(parts.values()) + (fsdp_buf if fsdp_in_phase[name] else 0)
              for name, parts in phase_parts.items()}
    peak_phase = max(phases, key=phases.get)
    at_peak = phase_parts[peak_phase]
    terms = {
        "nf4_weights": nf4, "quant_state": wt.qstate, "base_weights": base + wt.rope,
        "adapters": adapters, "gradients": at_peak.get("gradients", 0), "optimizer_states": opt_states,
        "activations": at_peak.get("activations", 0), "logits_loss": at_peak.get("logits_loss", 0),
        "temporaries": at_peak.get("temporaries", 0),
        "fsdp_buffers": fsdp_buf if fsdp_in_phase[peak_phase] else 0,
        "cuda_context": 0, "allocator_slack": 0,
    }
    if cfg.device == "cuda":
        terms["cuda_context"] = CUDA_CONTEXT_BYTES
        terms["allocator_slack"] = int(ALLOCATOR_SLACK * phases[peak_phase])
    return MemoryPlan(shape, cfg, terms, peak_phase, phases, details, start, moe.resolve_targets(shape, cfg)[2])


__all__ = ["ModelShape", "PRESETS", "PlanConfig", "MemoryPlan", "plan", "resolve_model", "shape_from_config",
           "CARDS_GB"]
