"""A `MemoryPlan` for people (a table, term by term, with the phases and what fits) and for programs
(a JSON-able dict)."""

from __future__ import annotations

import dataclasses

from qdora.plan.config import FIT_MARGIN
from qdora.plan.memory import (
    CARDS_GB,
    GIB,
    MAX_SEQ_CARDS_GB,
    TERM_LABELS,
    TERMS,
    MemoryPlan,
    PlanConfig,
    at_length,
    longest_sequence,
    plan,
)


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def format_plan(p: MemoryPlan, cards=CARDS_GB) -> str:
    c, m = p.config, p.model
    targets = "all weights" if c.method == "full" else ",".join(c.target_modules) + \
        (f" (+ magnitude only: {','.join(c.magnitude_only_modules)})" if c.magnitude_only_modules else "")
    sharding = ("s (FSDP, CPU offload)" if c.cpu_offload else "s (FSDP)") if c.fsdp else ""
    layers = f"intermediate {m.intermediate}, {m.layers} layers"
    if m.moe:
        layers = (f"{m.moe_layers} MoE layers of {m.num_experts} experts (intermediate {m.moe_intermediate}, "
                  f"top-{m.experts_per_token} per token"
                  + (f"; a shared MLP of intermediate {m.shared_intermediate}" if m.shared_intermediate else "") + ")"
                  + (f", {len(m.dense_layers)} dense (intermediate {m.intermediate})" if m.dense_layers else ""))
    lines = [
        f"{m.name}: {m.params() / 1e9:.2f}B parameters (hidden {m.hidden}, {layers}, "
        f"{m.heads} heads / {m.kv_heads} kv, vocab {m.vocab}"
        f"{', tied embeddings' if m.tied_embeddings else ''}"
        f"{f', a {m.sliding_window:,}-token sliding window' if m.sliding_window else ''}"
        f"{', soft-capped attention (in tiles of queries)' if m.softcap_attention else ''})",
        f"{c.method}" + ("" if c.method == "full" else f" r={c.r} on {targets}, dropout {c.dropout}")
        + f"; batch {c.batch_size} x {c.seq_len} tokens"
        + ("" if c.objective == "sft" else f" ({c.objective}: {c.batch_size} pair(s), {2 * c.batch_size} sequences"
           + (", the reference's forward" if c.objective == "dpo" and not c.precompute_reference else "")
           + (", reference precomputed" if c.precompute_reference else "") + ")")
        + (f", {c.grad_accum} micro-batches per step" if c.grad_accum > 1 else "") + "; gradient checkpointing "
        f"{'on' if c.gradient_checkpointing else 'off'}; {c.optimizer}; "
        f"{c.gpus} {'GPU' if c.device == 'cuda' else 'CPU process'}{sharding}; "
        f"{'bf16' if c.device == 'cuda' else 'fp32'} compute",
        *(f"note: {n}" for n in p.notes),
        "",
        f"predicted peak per {'GPU' if c.device == 'cuda' else 'process'}, at the {p.peak_phase} phase:",
        "",
        "| term | GiB |", "|---|---:|",
    ]
    for k in TERMS:
        if c.device == "cpu" and k in ("cuda_context", "allocator_slack"):
            continue
        if k == "fsdp_buffers" and not c.fsdp:
            continue
        lines.append(f"| {TERM_LABELS[k]} | {_gib(p.terms[k]).strip()} |")
    lines.append(f"| **total** | **{_gib(p.total_bytes).strip()}** |")
    if p.details:
        lines += [""] + [f"  {k}: {_gib(v).strip()} GiB" for k, v in p.details.items()]
    lines += ["", "phases (tensor bytes): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in p.phases.items()) + " GiB"]
    if p.start_bytes:
        lines.append(f"start, per GPU (reads, quantizes and shards the checkpoint one layer at a time): "
                     f"{p.start_bytes / GIB:.2f} GiB of tensors"
                     + (f", {p.start_total_bytes / GIB:.2f} GiB with context and slack" if c.device == "cuda" else "")
                     + (" -- more than the training step" if p.start_total_bytes > p.total_bytes else ""))
    if c.device == "cuda":
        lines.append("fits: " + "  ".join(f"{gb} GB {p.verdict(gb)}" for gb in cards))
        if any(p.verdict(gb) == "tight" for gb in cards):
            lines.append(f"tight: the plan is within {FIT_MARGIN:.0%} of the card, inside its own error (it fell up "
                         "to 18.5% short of what published runs reserved; docs/planner.md): it may not fit")
    return "\n".join(lines)


def plan_to_dict(p: MemoryPlan) -> dict:
    return {"model": dataclasses.asdict(p.model), "config": dataclasses.asdict(p.config), "terms": p.terms,
            "total_bytes": p.total_bytes, "peak_phase": p.peak_phase, "phases": p.phases, "details": p.details,
            "start_bytes": p.start_bytes, "start_total_bytes": p.start_total_bytes, "notes": list(p.notes),
            "fits": {str(gb): p.verdict(gb) for gb in CARDS_GB}}




def _setting(c: PlanConfig) -> str:
    named = (("chunked loss", c.chunked_loss), ("offloaded activations", c.offload_activations),
             ("tiled layers", c.tiled_layers), ("tiled MLP", c.tiled_mlp and not c.tiled_layers))
    options = [name for name, on in named if on]
    targets = "all weights" if c.method == "full" else f"r={c.r} on {','.join(c.target_modules)}, dropout {c.dropout}"
    return (f"{c.method} {targets}; batch {c.batch_size}; {c.optimizer}; gradient checkpointing "
            f"{'on' if c.gradient_checkpointing else 'off'}; " + (", ".join(options) or "none of the long-sequence "
                                                                   "options (--chunked-loss, --offload-activations, "
                                                                   "--tiled-mlp, --tiled-layers)"))


def longest_table(shape, c: PlanConfig, cards=MAX_SEQ_CARDS_GB) -> list[dict]:
    """For each card: the longest sequence that fits with the planner's margin and within the card, and at the
    latter, the step's peak phase and (offloaded activations) the host memory the run needs."""
    rows = []
    for gb in cards:
        safe, edge = longest_sequence(shape, c, gb, margin=True), longest_sequence(shape, c, gb, margin=False)
        at = plan(shape, at_length(c, edge)) if edge else None
        host = sum(v for k, v in at.details.items() if k.startswith("offloaded activations")) if at else 0
        rows.append({"card_gb": gb, "longest_with_margin": safe, "longest": edge,
                     "peak_phase": at.peak_phase if at else None, "host_bytes": host})
    return rows


def format_longest(shape, c: PlanConfig, rows: list[dict]) -> str:
    lines = [f"{shape.name}: the longest sequence per GPU, {_setting(c)}; bf16 compute" if c.device == "cuda" else
             f"{shape.name}: the longest sequence, {_setting(c)}",
             "", "| card | longest, with the planner's 20% margin | longest within the card | peak phase there | "
                 "host memory there |", "|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['card_gb']} GB | {r['longest_with_margin']:,} | {r['longest']:,} | "
                     f"{r['peak_phase'] or 'the weights alone do not fit'} | "
                     + (f"{r['host_bytes'] / GIB:.1f} GiB |" if r["host_bytes"] else "- |"))
    lines += ["", f"(a card of N GB holds N GiB; the margin is the planner's own error against published runs, "
                  f"up to {FIT_MARGIN:.0%}: docs/planner.md)"]
    return "\n".join(lines)
