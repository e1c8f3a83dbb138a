r"""The planner's mixture-of-experts terms: routed experts held apart expert by expert
(`qdora.core.experts.QDoRAExperts`) and the router, beside the attention that `qdora.plan.memory` plans
as for a dense layer (E experts, k of them per token, I an expert's intermediate size, R = T·k routed
token-slots, the rest as in `qdora.plan.memory`):

Resident, per MoE layer
    experts          E × (gate_up `2I × H`, down `H × I`), each its own NF4 weight and quantization
                     state for qlora/qdora (split and quantized even when not targeted); in the storage
                     dtype otherwise (fused, as transformers holds them, when not targeted).
    router           `mlp.gate (E, H)`, not a linear layer: in the storage dtype; frozen, or with the
                     target `gate` adapted as a linear of that shape (`qdora.core.experts.AdaptedRouter`).
    adapters         targets `experts`, `experts.gate_up_proj`, `experts.down_proj`: per expert and
                     projection `A (r, in)`, `B (out, r)` (+ DoRA `m (out,)` and its fp32 norm buffer), as a
                     linear of that shape; every expert's get gradients and optimizer states (an expert
                     no token chose gets zeros: `QDoRAExperts`).

Saved for the backward, per MoE layer (measured on CPU, `tests/test_plan_moe.py`)
    router           its fp32 softmax `T·E·4`, the top-k indices `T·k·8` and, renormalising the top-k
                     weights (`ModelShape.norm_topk`), their copy and sums `T·(k + 1)·4`.
    dispatch         each routed pair's token and slot (int64, `R·16`) and its gathered weight `R·e`.
    expert MLPs      per routed pair: the gate_up output (kept whole by SiLU and the product, `2I·e`),
                     `silu(gate)` (`I·e`), the down output (kept by the routing-weight product, `H·e`)
                     and that product (kept by `index_add_`, `H·e`).
    adapters         an adapted projection keeps its input (`R·in·e`, or with dropout its dropped copy
                     and the mask), `a = x·Aᵀ` (`R·r·e`), and for DoRA fp32 g, n, m per expert that ran
                     (min(E, R) of them); its output is kept anyway (above). An adapted router keeps
                     its input `T·H·e` and the adapted weight `E·H·e` (DoRA: with the fp32 weight
                     before scaling `E·H·4` and three E-vectors).

In flight through one MoE layer's backward: the routing gradient scattered back to the tokens
(`T·H·e`; an expert's own gradients replace the saved tensors its backward frees as they are made),
beside the dense layer's residual gradients; the dequantized weight of one expert's
projection (a frozen expert whole, as bitsandbytes does; an adapted one by row blocks). The router's
load-balancing loss (`output_router_logits`, off in the presets' configs) is not counted. Not planned
(an error says so): shared experts and MoE models with dense MLP layers.

FSDP over N devices (`qdora.train.fsdp`) shards an MoE as a dense model: its unit is the whole decoder
layer, so every expert's packed NF4 data, the router and every expert's adapters are sharded 1/N and
gathered whole (all E experts, routed or not) for the layer's forward and backward, and every expert's
adapters have a gradient to reduce-scatter (zeros for an expert no token chose); each expert's
quantization state and DoRA norm buffer stay whole on every rank. The start reads each expert's
projection and quantizes it alone (`start_reads`); activations are per rank, as on one device.
"""

from __future__ import annotations

from qdora.models.shapes import ModelShape
from qdora.plan.config import EXPERTS, LINEARS, ROUTER, PlanConfig

DEFAULT_TARGETS = PlanConfig.__dataclass_fields__["target_modules"].default
"""`qdora train`'s targets: their MLP part (up_proj, down_proj) names no layer of an all-MoE model."""


def check(shape: ModelShape, cfg: PlanConfig) -> None:
    """Raise, naming the value and the fix, where `shape` and `cfg` are outside what is planned."""
    named = sorted((set(cfg.target_modules) | set(cfg.magnitude_only_modules)) & {*EXPERTS, ROUTER})
    if named and not shape.moe and cfg.method != "full":
        raise ValueError(f"target(s) {', '.join(named)}: {shape.name} has no experts (a dense model); drop them")
    if not shape.moe:
        return
    if ROUTER in cfg.target_modules and ROUTER not in cfg.magnitude_only_modules and cfg.method != "full" \
            and cfg.r > min(shape.num_experts, shape.hidden):
        raise ValueError(f"r={cfg.r} exceeds the router gate ({shape.num_experts}x{shape.hidden}); use "
                         f"r <= {min(shape.num_experts, shape.hidden)} or leave gate out")
    if shape.shared_experts:
        raise ValueError(f"{shape.name}: shared_experts={shape.shared_experts}; the planner models routed experts "
                         "only (shared experts, as in Qwen2-MoE or DeepSeek, are not planned)")
    if shape.dense_layers:
        raise ValueError(f"{shape.name}: dense MLP layers {list(shape.dense_layers)} beside the MoE layers; the "
                         "planner models MoE models whose every layer is routed")


def resolve_targets(shape: ModelShape, cfg: PlanConfig) -> tuple[frozenset, frozenset, tuple[str, ...]]:
    """`(direction, magnitude-only, notes)`: the adapted names of one decoder layer. On an MoE (no dense
    MLP) the dense MLP names (gate_proj, up_proj, down_proj) name nothing: left out with a note when they
    come from the default targets or `all` (as `add_adapters`' all-linear leaves the experts out), an
    error when named explicitly (as `add_adapters` raises)."""
    if cfg.method == "full":
        return frozenset(), frozenset(), ()
    targets, mag = set(cfg.target_modules), set(cfg.magnitude_only_modules)
    notes: tuple[str, ...] = ()
    mlp = sorted((targets | mag) - set(shape.linear_shapes()) - {*EXPERTS, ROUTER}, key=LINEARS.index)
    if shape.moe and mlp:
        if tuple(cfg.target_modules) in (DEFAULT_TARGETS, LINEARS) and not mag & set(mlp):
            kept = [t for t in cfg.target_modules if t not in mlp]
            notes = (f"{', '.join(mlp)} name no layer of {shape.name} (its MLPs are {shape.num_experts} routed "
                     f"experts, which a bare projection name does not name): planned for {','.join(kept)} "
                     "with the experts frozen in NF4; qdora train needs these targets named (--target-modules "
                     f"{','.join(kept)}), or add experts to adapt them",)
            targets -= set(mlp)
        else:
            raise ValueError(f"target(s) {', '.join(mlp)} name no layer of {shape.name}: its MLPs are "
                             f"{shape.num_experts} routed experts (target them as experts, experts.gate_up_proj "
                             f"or experts.down_proj); drop {', '.join(mlp)}")
    return frozenset(targets - mag), frozenset(mag), notes


def start_reads(d, cfg: PlanConfig) -> list[tuple[int, int]]:
    """`(elements, bytes read)` of each weight the FSDP start reads in a decoder layer: a dense linear, or
    an expert's projection, quantized alone (`qdora.models.loading.CheckpointModel.place_expert`). Bytes
    read, in the storage dtype (the checkpoint's assumed the same): on CUDA the weight copied to the
    device; on a CPU device a dense weight or an expert's down_proj stays a view of the mapped file,
    but an expert's gate_up is built from its gate and up halves (one tensor each per expert, as
    transformers 5 and the hub checkpoints store them), copied and joined in host memory: twice its size."""
    cuda = cfg.device == "cuda"
    out = [(o * n, o * n * d.w if cuda else 0) for o, n in d.lin.values()]
    for name, (o, n) in d.experts.items():
        out.append((o * n, o * n * d.w * (1 if cuda else 2 if name == "experts.gate_up_proj" else 0)))
    return out


def built_on_meta(d, cfg: PlanConfig) -> int:
    """Bytes the FSDP start allocates on a CPU device before it reads anything: the model is built on
    the meta device (accelerate's `init_empty_weights`), but each of an MoE's fused expert parameters
    (the largest, gate_up `E × 2I × H`) is first made whole in host memory, in the config's dtype (taken
    as the storage dtype: exact for an fp32 checkpoint, twice a bf16 one's), and moved to meta as it is
    registered (measured: a CPU start's peak when the experts are many and small). On CUDA it is host
    memory: 0."""
    return d.E * 2 * d.ei * d.h * d.w if d.E and cfg.device == "cpu" else 0


def saved(d, shape: ModelShape, cfg: PlanConfig) -> int:
    """Bytes autograd keeps for one MoE layer's router and experts (`d`: `qdora.plan.memory`'s sizes)."""
    if not d.E:
        return 0
    e, T, R, E, k, h, i = d.e, d.T, d.T * d.k, d.E, d.k, d.h, d.ei
    ran = min(E, R)
    out = T * E * 4 + T * k * 8 + (T * (k + 1) * 4 if shape.norm_topk else 0)  # router: softmax, top-k, norm
    out += R * 16 + R * e                                    # dispatch: token, slot; gathered weights
    out += R * (3 * i + 2 * h) * e                           # gate_up output, silu(gate), down output, weighted
    for name, (o, n) in d.experts.items():
        if name in d.direction:
            out += R * n * (e + 1) if cfg.dropout > 0 else R * n * e
            out += R * cfg.r * e
        if cfg.use_dora and name in d.adapted:
            out += ran * 3 * o * 4
            if cfg.norm == "exact" and name in d.direction:
                out += ran * o * cfg.r * 4
    if ROUTER in d.adapted:  # its input, the adapted weight; DoRA: the weight before scaling, 1/n, the scale
        out += T * h * e + E * h * e
        if cfg.use_dora:
            out += (E * h * 4 if ROUTER in d.direction or e != 4 else 0) + 3 * E * 4
    return out


def in_flight(d) -> int:
    """Gradients in flight through one MoE layer's experts, beyond the dense layer's residual: the
    routing gradient scattered back to the tokens (an expert's own gradients replace the tensors its
    backward frees, as they are made)."""
    return d.T * d.h * d.e if d.E else 0


def expert_details(shape: ModelShape, cfg: PlanConfig, d, nf4_bytes) -> dict[str, int]:
    """The experts' share of the resident terms, whole model, as named lines of the report. With FSDP
    each line is one rank's: the sharded tensors (NF4 data, weights, router, adapters) 1/N, in CPU
    memory with offload; the quantization state and DoRA's norm buffers whole."""
    if not d.E:
        return {}
    w = {"nf4": 0, "state": 0, "adapters": 0, "buffers": 0}
    for name, (o, n) in d.experts.items():
        if cfg.quantized:
            packed, st = nf4_bytes(o, n, cfg.double_quant)
            w["nf4"], w["state"] = w["nf4"] + packed, w["state"] + st
        if name in d.adapted:
            w["adapters"] += ((cfg.r * (n + o) if name in d.direction else 0) + (o if cfg.use_dora else 0)) * d.ab
            w["buffers"] += o * 4 if cfg.use_dora else 0
    n_all, where = d.E * d.L, f"experts: {d.E} × {d.L} layers"
    shard = (lambda x: -(-x // d.N)) if cfg.fsdp else (lambda x: x)  # noqa: E731
    part = "" if not cfg.fsdp else f", 1/{d.N} {'in CPU memory' if cfg.cpu_offload else 'per rank'}"
    if cfg.quantized:
        out = {f"{where}, NF4 weights (packed){part}": shard(n_all * w["nf4"]),
               f"{where}, quantization state": n_all * w["state"]}
    else:
        weights = n_all * sum(o * n for o, n in d.experts.values()) * d.w
        out = {f"{where}, {'trained' if d.full else 'frozen'} weights{part}": shard(weights)}
    kind = "trained" if d.full else "adapted" if ROUTER in d.adapted else "frozen"
    out[f"router: {d.L} layers × {d.E} × {d.h}, {kind}{part}"] = shard(d.L * d.E * d.h * d.w)
    if w["adapters"] and cfg.fsdp:
        out[f"{where}, adapters{part}"] = shard(n_all * w["adapters"])
        if w["buffers"]:
            out[f"{where}, DoRA norm buffers"] = n_all * w["buffers"]
    elif w["adapters"]:
        out[f"{where}, adapters (+ DoRA norm buffers)"] = n_all * (w["adapters"] + w["buffers"])
    return out
