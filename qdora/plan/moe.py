r"""The planner's mixture-of-experts terms: routed experts held apart expert by expert
(`qdora.core.experts.QDoRAExperts`) and the router, beside the attention that `qdora.plan.memory` plans
as for a dense layer (E experts, k of them per token, I an expert's intermediate size, R = T·k routed
token-slots, the rest as in `qdora.plan.memory`):

Resident, per MoE layer
    experts          E × (gate_up `2I × H`, down `H × I`), each its own NF4 weight and quantization
                     state for qlora/qdora (split and quantized even when not targeted); in the storage
                     dtype otherwise (fused, as transformers holds them, when not targeted).
    router           `mlp.gate (E, H)`, not a linear layer: in the storage dtype; frozen, or with the
                     target `gate` adapted as a linear of that shape (`qdora.core.experts.AdaptedRouter`);
                     a sigmoid router (DeepSeek-V3, GLM-4-MoE) also its score-correction bias `(E,)`.
    shared MLP       Qwen2-MoE's `shared_expert` (with `shared_expert_gate (1, H)`), DeepSeek-V3's and
                     GLM-4-MoE's `shared_experts`: linear layers, planned as a dense MLP of their own
                     intermediate size (`qdora.plan.memory`); a bare gate_proj, up_proj, down_proj and
                     `all` adapt them, as `add_adapters` does. An MoE's dense layers (`ModelShape.dense_layers`)
                     are planned as a dense model's, each kind of layer on its own (`qdora.plan.sizes`).
    adapters         targets `experts`, `experts.gate_up_proj`, `experts.down_proj`: per expert and
                     projection `A (r, in)`, `B (out, r)` (+ DoRA `m (out,)` and its fp32 norm buffer), as a
                     linear of that shape; every expert's get gradients and optimizer states (an expert
                     no token chose gets zeros: `QDoRAExperts`).

Saved for the backward, per MoE layer (measured on CPU, `tests/test_plan_moe.py`)
    router           its fp32 softmax `T·E·4`, the top-k indices `T·k·8` and, renormalising the top-k
                     weights (`ModelShape.norm_topk`), their copy and sums `T·(k + 1)·4`. A sigmoid router
                     (`ModelShape.router_groups`) keeps its fp32 sigmoid in place of the softmax (what it
                     saves to choose the groups and mask the rest is freed within its forward: only indices
                     leave it); on bf16, its frozen weight's fp32 copy `E·H·4`.
    dispatch         each routed pair's token and slot (int64, `R·16`) and its gathered weight `R·e`
                     (a sigmoid router's: fp32, `R·4`).
    expert MLPs      per routed pair: the gate_up output (kept whole by SiLU and the product, `2I·e`),
                     `silu(gate)` (`I·e`), the down output (kept by the routing-weight product, `H·e`)
                     and that product (kept by `index_add_`, `H·e`).
    adapters         an adapted projection keeps its input (`R·in·e`, or with dropout its dropped copy
                     and the mask), `a = x·Aᵀ` (`R·r·e`), and for DoRA fp32 g, n, m per expert that ran
                     (min(E, R) of them); its output is kept anyway (above). An adapted router keeps
                     its input `T·H·e` (the same tensor a shared MLP's adapted gate/up keeps without
                     dropout: counted once) and the adapted weight `E·H·e` (a sigmoid router: both fp32;
                     DoRA: with the fp32 weight before scaling `E·H·4` and three E-vectors; magnitude only:
                     n, and on bf16 the weight's fp32 copy).
    shared MLP       as a dense MLP (`qdora.plan.memory`); Qwen2-MoE's gate keeps its sigmoid `T·e` and the
                     shared MLP's output `T·H·e` (which an adapted DoRA down_proj keeps anyway).

In flight through one MoE layer's backward: the routing gradient scattered back to the tokens
(`T·H·e`; an expert's own gradients replace the saved tensors its backward frees as they are made),
beside the dense layer's residual gradients; the dequantized weight of one expert's
projection (a frozen expert whole, as bitsandbytes does; an adapted one by row blocks). The router's
load-balancing loss (`output_router_logits`, off in the presets' configs) is not counted. Not planned
(an error says so): DeepSeek-V2/V3's multi-head latent attention (its MoE layers are read from its config).

FSDP over N devices (`qdora.train.fsdp`) shards an MoE as a dense model: its unit is the whole decoder
layer, so every expert's packed NF4 data, the router and every expert's adapters are sharded 1/N and
gathered whole (all E experts, routed or not) for the layer's forward and backward, and every expert's
adapters have a gradient to reduce-scatter (zeros for an expert no token chose); each expert's
quantization state and DoRA norm buffer stay whole on every rank. The start reads each expert's
projection and quantizes it alone (`start_reads`); activations are per rank, as on one device.
"""

from __future__ import annotations

from qdora.models.shapes import ModelShape
from qdora.plan.config import ALL_LINEAR, EXPERTS, LINEARS, ROUTER, PlanConfig

DEFAULT_TARGETS = PlanConfig.__dataclass_fields__["target_modules"].default
"""`qdora train`'s targets: their MLP part (up_proj, down_proj) names no layer of an all-MoE model."""


def check(shape: ModelShape, cfg: PlanConfig) -> None:
    """Raise, naming the value and the fix, where `shape` and `cfg` are outside what is planned."""
    shape.attention_shapes()  # raises for attention the planner does not model (DeepSeek-V3's latent attention)
    named = sorted((set(cfg.target_modules) | set(cfg.magnitude_only_modules)) & {*EXPERTS, ROUTER})
    if named and not shape.moe and cfg.method != "full":
        raise ValueError(f"target(s) {', '.join(named)}: {shape.name} has no experts (a dense model); drop them")
    if not shape.moe:
        return
    if ROUTER in cfg.target_modules and ROUTER not in cfg.magnitude_only_modules and cfg.method != "full" \
            and cfg.r > min(shape.num_experts, shape.hidden):
        raise ValueError(f"r={cfg.r} exceeds the router gate ({shape.num_experts}x{shape.hidden}); use "
                         f"r <= {min(shape.num_experts, shape.hidden)} or leave gate out")


def _named(shape: ModelShape, target: str) -> set[str]:
    """The names (`ModelShape.linear_shapes`, `expert_shapes`, the router) `target` names, as `add_adapters`
    matches them: a linear by its name or dotted suffix, the experts and the router by their own names."""
    linears = shape.linear_names()
    out = {n for n in linears if n == target or n.endswith("." + target)}
    return out | ({target} & (set(shape.expert_shapes()) | ({ROUTER} if shape.moe else set())))


def resolve_targets(shape: ModelShape, cfg: PlanConfig) -> tuple[frozenset, frozenset, tuple[str, ...]]:
    """`(direction, magnitude-only, notes)`: the adapted names of the decoder layers (`ModelShape.linear_shapes`
    of each kind of layer, the experts' projections, the router). A bare gate_proj, up_proj, down_proj names
    the dense layers' MLP and the MoE layers' shared MLP; on an MoE with neither they name nothing: left out
    with a note when they come from the default targets, an error when named explicitly (as `add_adapters`
    raises). `all-linear` names every linear layer (not the experts nor the router, as `add_adapters`' all-linear)
    but those that cannot take the rank (Qwen2-MoE's one-row `shared_expert_gate`), left frozen with a note. A
    target no layer has is an error; so is a rank above the smaller side of a linear named explicitly."""
    if cfg.method == "full":
        return frozenset(), frozenset(), ()
    targets, mag = set(cfg.target_modules) - {ALL_LINEAR}, set(cfg.magnitude_only_modules)
    notes: tuple[str, ...] = ()
    missing = {t for t in targets | mag if not _named(shape, t)}
    mlp = sorted(missing & set(LINEARS), key=LINEARS.index)
    if shape.moe and mlp:
        if tuple(cfg.target_modules) == DEFAULT_TARGETS and not mag & set(mlp):
            kept = [t for t in cfg.target_modules if t not in missing]
            notes = (f"{', '.join(mlp)} name no layer of {shape.name} (its MLPs are {shape.num_experts} routed "
                     f"experts, which a bare projection name does not name): planned for {','.join(kept)} "
                     "with the experts frozen in NF4; qdora train needs these targets named (--target-modules "
                     f"{','.join(kept)}), or add experts to adapt them",)
            targets -= set(mlp)
            missing -= set(mlp)
        else:
            raise ValueError(f"target(s) {', '.join(mlp)} name no layer of {shape.name}: its MLPs are "
                             f"{shape.num_experts} routed experts (target them as experts, experts.gate_up_proj "
                             f"or experts.down_proj); drop {', '.join(mlp)}")
    if missing:
        raise ValueError(f"target(s) {', '.join(sorted(missing))} name no layer of {shape.name} (its linears: "
                         f"{', '.join(sorted(shape.linear_names()))}); drop them")
    mag_names = set().union(*(_named(shape, t) for t in mag))
    direction = set().union(*(_named(shape, t) for t in targets)) - mag_names
    shapes = {**shape.linear_shapes(True), **shape.linear_shapes(False), **shape.expert_shapes()}
    for name in sorted(direction - {ROUTER}):  # named explicitly: add_adapters refuses a rank it cannot take
        o, n = shapes[name]
        if cfg.r > min(o, n):
            raise ValueError(f"r={cfg.r} exceeds {name} ({o}x{n}) of {shape.name}; use r <= {min(o, n)} or leave "
                             f"{name} out")
    if ALL_LINEAR in cfg.target_modules:  # every linear layer (not the experts nor the router)
        wildcard = shape.linear_names() - direction - mag_names
        left = sorted(n for n in wildcard if cfg.r > min(shapes[n]))  # left frozen, as add_adapters does
        direction |= wildcard - set(left)
        if left:
            notes += (f"all-linear leaves {', '.join(left)} frozen: it cannot take r={cfg.r} "
                      f"({'; '.join(f'{n} {shapes[n][0]}x{shapes[n][1]}' for n in left)}); a smaller r adapts it",)
    return frozenset(direction), frozenset(mag_names), notes


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


def _experts_saved(d, cfg: PlanConfig, re: int) -> int:
    """Bytes autograd keeps for one MoE layer's dispatch and expert MLPs (`re`: the routing weights' bytes)."""
    e, R, E, h, i = d.e, d.T * d.k, d.E, d.h, d.ei
    out = R * 16 + R * re                                    # dispatch: token, slot; gathered weights
    out += R * (3 * i + 2 * h) * e                           # gate_up output, silu(gate), down output, weighted
    for name, (o, n) in d.experts.items():
        if name in d.direction:
            out += R * n * (e + 1) if cfg.dropout > 0 else R * n * e
            out += R * cfg.r * e
        if cfg.use_dora and name in d.adapted:
            out += min(E, R) * 3 * o * 4                     # g, n, m of each expert that ran
            if cfg.norm == "exact" and name in d.direction:
                out += min(E, R) * o * cfg.r * 4
    return out


def saved(d, shape: ModelShape, cfg: PlanConfig) -> int:
    """Bytes autograd keeps for one MoE layer's router and experts (`d`: `qdora.plan.sizes.Dims`)."""
    if not d.E:
        return 0
    e, T, E, k, h = d.e, d.T, d.E, d.k, d.h
    re = 4 if shape.router_groups else e                     # a sigmoid router computes in fp32
    out = T * E * 4 + T * k * 8 + (T * (k + 1) * 4 if shape.norm_topk else 0)  # router: scores, top-k, norm
    out += _experts_saved(d, cfg, re)
    # the layer's input: kept by the shared MLP's adapted linears (no dropout) or, trained, by all of them
    shared = [n for n in (f"{d.mlp}gate_proj", f"{d.mlp}up_proj", "shared_expert_gate") if n in d.lin]
    input_kept = (d.full and shared) or (cfg.dropout == 0 and any(n in d.direction for n in shared))
    if d.full and not shared:                               # the trained router keeps it
        out += T * h * e
    if ROUTER in d.adapted:  # its input, the adapted weight; DoRA: the weight before scaling, 1/n, the scale
        out += (0 if input_kept and re == e else T * h * re) + E * h * re
        if cfg.use_dora:  # (magnitude only: the fp32 weight, a copy on bf16, and n)
            out += E * h * 4 + 3 * E * 4 if ROUTER in d.direction else (E * h * 4 if e != 4 else 0) + E * 4
    elif shape.router_groups and e != 4 and not d.full:      # the frozen weight's fp32 copy
        out += E * h * 4
    return out


def in_flight(d, shape: ModelShape, cfg: PlanConfig) -> int:
    """Gradients in flight through one MoE layer's experts and shared MLP, beyond the residual's: the
    routing gradient scattered back to the tokens (an expert's own gradients replace the tensors its
    backward frees, as they are made) and the shared MLP's (gate, silu, up: `3·T·i·e`, as a dense MLP's).
    A shared MLP computed before the experts (Qwen2-MoE's) is differentiated after them, once their
    saved tensors are freed; one computed after them (DeepSeek-V3's, GLM-4-MoE's) while they are held."""
    if not d.E:
        return 0
    route, mlp = d.T * d.h * d.e, 3 * d.T * d.i * d.e
    if d.gated:
        return route + max(0, mlp - _experts_saved(d, cfg, 4 if shape.router_groups else d.e))
    return route + mlp


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
