"""The sizes `qdora.plan.memory`'s terms are written in, per kind of decoder layer, and the resident
weights each holds. A dense model has one kind of layer; an MoE its MoE layers (attention, router,
routed experts and, where it has one, the shared MLP beside them) and, where it has them, its dense
layers (attention and a dense MLP): `kinds` gives each kind present, with how many layers it has."""

from __future__ import annotations

from dataclasses import dataclass

from qdora.core.config import FLOAT_DTYPES
from qdora.models.shapes import ModelShape
from qdora.plan import moe
from qdora.plan.config import ROUTER, PlanConfig

DTYPE_BYTES = {name: dtype.itemsize for name, dtype in FLOAT_DTYPES.items()}


def nf4_bytes(out_f: int, in_f: int, double_quant: bool) -> tuple[int, int]:
    """(packed bytes, quantization-state bytes) of one NF4 weight."""
    numel = out_f * in_f
    blocks = -(-numel // 64)
    if double_quant:
        state = blocks + 4 * -(-blocks // 256) + 4 + 16 * 4 + 256 * 4
    else:
        state = 4 * blocks + 16 * 4
    return (numel + 1) // 2, state


@dataclass(frozen=True)
class Dims:
    """The sizes every term is written in (one place, the math's own symbols), for one kind of layer."""
    e: int              # compute dtype bytes
    w: int              # storage bytes of unquantized tensors: bf16 on CUDA, fp32 on CPU
    ab: int             # adapter dtype bytes
    N: int              # devices
    T: int              # tokens per micro-batch
    s: int              # sequence length
    b: int              # batch size
    h: int
    i: int              # this kind's MLP intermediate: a dense layer's, an MoE layer's shared MLP's (0: none)
    V: int
    L: int              # decoder layers of this kind
    q: int              # query width (heads × head_dim)
    kv: int             # key/value width
    lin: dict           # (out, in) of each linear of one layer of this kind (attention, MLP or shared MLP)
    mlp: str            # the prefix of its MLP's gate_proj, up_proj, down_proj ("shared_expert." for Qwen2-MoE's)
    gated: bool         # the shared MLP's output is scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE)
    experts: dict       # (out, in) of one expert's projections (MoE layers)
    E: int              # experts per MoE layer (0: a dense layer)
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


def dims(shape: ModelShape, cfg: PlanConfig, moe_layer: bool | None = None) -> Dims:
    """The sizes of one kind of layer of `shape` under `cfg`: its MoE layers (`moe_layer` None: an MoE's
    MoE layers, a dense model's layers) or its dense layers."""
    moe_layer = shape.moe if moe_layer is None else moe_layer
    direction, mag_only, _ = moe.resolve_targets(shape, cfg)
    lin = shape.linear_shapes(moe_layer)
    return Dims(e=cfg.compute_bytes, w=cfg.compute_bytes, ab=DTYPE_BYTES[cfg.adapter_dtype], N=cfg.gpus,
                T=cfg.batch_size * cfg.seq_len, s=cfg.seq_len, b=cfg.batch_size, h=shape.hidden,
                i=lin.get(("" if not moe_layer else f"{shape.shared_prefix}.") + "up_proj", (0, 0))[0],
                V=shape.vocab, L=shape.moe_layers if moe_layer else shape.layers - shape.moe_layers,
                q=shape.heads * shape.hd, kv=shape.kv_heads * shape.hd, lin=lin,
                mlp=f"{shape.shared_prefix}." if moe_layer and shape.shared_prefix else "",
                gated=moe_layer and shape.shared_gate, experts=shape.expert_shapes() if moe_layer else {},
                E=shape.num_experts if moe_layer else 0, k=shape.experts_per_token, ei=shape.moe_intermediate,
                full=cfg.method == "full", direction=direction, mag_only=mag_only)


def kinds(shape: ModelShape, cfg: PlanConfig) -> list[Dims]:
    """The sizes of each kind of layer `shape` has (MoE layers first), each with its number of layers."""
    out = [dims(shape, cfg, True)] if shape.moe_layers else []
    return out + ([dims(shape, cfg, False)] if shape.layers > shape.moe_layers else [])


@dataclass(frozen=True)
class LayerWeights:
    """Resident bytes of one decoder layer of a kind: NF4 data, quantization state, unquantized weights,
    adapters, DoRA norm buffers; what trains, and its largest trained tensor."""
    nf4: int
    qstate: int
    base: int
    adapters: int
    buffers: int
    trainable: int
    largest_trainable: int
    fixed: int
    """The layer's own buffers, never trained nor sharded (an MoE router's score-correction bias)."""

    @property
    def whole(self) -> int:
        """The layer as FSDP gathers it (its parameters: NF4 data, unquantized weights, adapters)."""
        return self.nf4 + self.base + self.adapters


def layer_weights(d: Dims, shape: ModelShape, cfg: PlanConfig) -> LayerWeights:
    nf4 = qstate = base = adapters = buffers = trainable = largest = 0
    for name, o, n, count in d.units():
        if cfg.quantized and name != ROUTER:  # the router stays in the storage dtype
            packed, st = nf4_bytes(o, n, cfg.double_quant)
            nf4 += count * packed
            qstate += count * st
        else:
            base += count * o * n * d.w
        if name in d.adapted:
            a_bytes = (cfg.r * n + o * cfg.r) * d.ab if name in d.direction else 0
            m_bytes = o * d.ab if cfg.use_dora else 0
            adapters += count * (a_bytes + m_bytes)
            buffers += count * o * 4 if cfg.use_dora else 0
            trainable += count * (a_bytes + m_bytes)
            largest = max(largest, max(cfg.r * n, o * cfg.r) * d.ab if name in d.direction else o * d.ab)
    biases = sum(d.lin[n][0] for n in shape.attention_bias)  # kept as loaded beside NF4 weights
    base += (shape.norms * d.h + shape.qk_norm_params() + biases) * d.w  # the layer's RMSNorm weights (+ q/k norms)
    if d.full:
        trainable, largest = base, max(count * o * n * d.w for _, o, n, count in d.units())
    fixed = d.E * d.w if d.E and shape.router_groups else 0
    return LayerWeights(nf4, qstate, base, adapters, buffers, trainable, largest, fixed)


@dataclass(frozen=True)
class Weights:
    """Resident weights, whole model, and each kind of layer's (the FSDP unit is one decoder layer)."""
    nf4: int
    qstate: int
    base: int
    adapters: int
    buffers: int
    trainable: int
    largest_trainable: int
    embed: int
    head: int
    root: int
    fixed: int
    """Buffers never trained nor sharded: rotary inv_freq and its original copy (fp32), routers' biases."""
    layers: tuple
    """`(Dims, LayerWeights)` of each kind of layer."""

    @property
    def unit(self) -> LayerWeights:
        """The largest decoder layer: what FSDP gathers at once."""
        return max((lw for _, lw in self.layers), key=lambda lw: lw.whole)

    @property
    def trainable_layer(self) -> int:
        """The trained bytes of the decoder layer with the most."""
        return max(lw.trainable for _, lw in self.layers)


def weights(ds: list[Dims], shape: ModelShape, cfg: PlanConfig) -> Weights:
    per = tuple((d, layer_weights(d, shape, cfg)) for d in ds)
    total = {attr: sum(d.L * getattr(lw, attr) for d, lw in per)
             for attr in ("nf4", "qstate", "base", "adapters", "buffers", "trainable", "fixed")}
    w, h, V = ds[0].w, shape.hidden, shape.vocab
    embed = V * h * w
    head = 0 if shape.tied_embeddings else V * h * w
    root = embed + head + h * w               # embeddings, lm_head (full precision), final norm
    base = total["base"] + root
    if ds[0].full:
        trainable = base                      # every weight trains, in its storage dtype
        largest = max(embed, *(lw.largest_trainable for _, lw in per))
    else:
        trainable, largest = total["trainable"], max(lw.largest_trainable for _, lw in per)
    rope = 2 * (shape.rd // 2) * 4            # inv_freq and its original copy (fp32)
    return Weights(nf4=total["nf4"], qstate=total["qstate"], base=base, adapters=total["adapters"],
                   buffers=total["buffers"], trainable=trainable, largest_trainable=largest, embed=embed, head=head,
                   root=root, fixed=rope + total["fixed"], layers=per)
