"""`qdora plan`'s setting (`PlanConfig`, built from an `AdapterConfig` or field by field) and result
(`MemoryPlan`, term by term). The model of each term is in `qdora.plan.memory`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from qdora.core.config import DORA_METHODS, METHODS, QUANTIZED_METHODS, AdapterConfig, Problems
from qdora.models.shapes import ModelShape

GIB = 1 << 30
CARDS_GB = (16, 24, 48, 80)
"""Card sizes checked by `fits` (GB as sold: 24 GB cards hold 24 GiB)."""

CUDA_CONTEXT_BYTES = GIB // 2
"""CUDA context and kernel images outside PyTorch's allocator: ~0.3-0.6 GiB on recent drivers."""

ALLOCATOR_SLACK = 0.10
"""Reserved-but-unallocated memory of PyTorch's caching allocator, as a fraction of the tensor peak
(Answer.AI's FSDP+QLoRA benchmarks report 9.16 GiB allocated vs 10.22 GiB reserved for Llama-2-7B LoRA)."""

FIT_MARGIN = 0.20
"""The share of a card `fits` keeps free: the plan (with context and slack) fell short of the memory
PyTorch reserved in published runs by up to 18.5% (docs/planner.md, against published figures), so a
plan above 80% of a card is "tight", not "yes"."""

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""Fused projections (Phi-3) and the linears they stand for. A fused target is planned as its parts:
the same weights, activations and B rows; the parts' separate A (r × hidden each, and their T × r
products) are counted where the fused layer has one, an over-estimate of O(r · (hidden + T))."""
EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
"""An MoE's expert projections as targets (`qdora.models.moe`): each expert's own adapter. `experts`
names both; a bare `gate_up_proj`/`down_proj` names linear layers only (the dense MLP), as in `add_adapters`."""
ROUTER = "gate"
"""An MoE's router `mlp.gate (E, H)` as a target (`qdora.core.experts.AdaptedRouter`)."""
SHARED = ("shared_expert_gate", *(f"{m}.{p}" for m in ("shared_expert", "shared_experts")
                                  for p in ("gate_proj", "up_proj", "down_proj")))
"""An MoE layer's shared MLP as targets that name it alone: Qwen2-MoE's `shared_expert.<proj>` and its gate
`shared_expert_gate (1, H)`, DeepSeek-V3's and GLM-4-MoE's `shared_experts.<proj>`. A bare `gate_proj`,
`up_proj`, `down_proj` names the shared MLP's linears and the dense layers' (a dotted suffix, as in add_adapters)."""
ALL_LINEAR = "all-linear"
"""`all` or `all-linear` as a target (PEFT's all-linear, as in add_adapters): every linear layer of every decoder
layer (attention, dense MLP, shared MLP and its gate), not the experts nor the router; with others beside it
(`all-linear,experts`)."""
DEVICES = ("cuda", "cpu")


# ---- the setting ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanConfig:
    """One training setting to plan for. Defaults are `qdora train`'s."""

    method: str = "qdora"
    """What is trained: full, lora, dora, qlora or qdora."""
    r: int = 16
    """Rank of the direction update B·A."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    """Decoder-layer linears with a direction adapter, comma-separated from q_proj, k_proj, v_proj,
    o_proj, gate_proj, up_proj, down_proj (fused: qkv_proj, gate_up_proj), or all; an MoE's experts:
    experts, experts.gate_up_proj, experts.down_proj (`all` does not include them, as in add_adapters);
    its router: gate; its shared MLP alone: shared_expert.<proj>, shared_experts.<proj>, shared_expert_gate
    (a bare gate_proj, up_proj, down_proj names the shared MLP's linears and the dense layers').
    On an MoE without dense MLP layers or shared experts the default's up_proj, down_proj name nothing and
    are left out."""
    magnitude_only_modules: tuple[str, ...] = ()
    """Linears that train only the magnitude m (comma-separated)."""
    dropout: float = 0.05
    """Dropout on the adapter's input (its mask is kept for the backward)."""
    batch_size: int = 1
    """Examples per micro-batch per device."""
    seq_len: int = 2048
    """Tokens per example."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: above 1, gradients stay allocated through every phase."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward."""
    gpus: int = 1
    """Devices; above 1 the model is sharded with FSDP."""
    cpu_offload: bool = False
    """FSDP CPU offload (FSDP2 CPUOffloadPolicy): sharded parameters, gradients and optimizer
    states live in CPU memory; the GPU holds the gathered layers, activations and the rest."""
    device: str = "cuda"
    """cuda (bf16 compute and storage) or cpu (fp32 compute and storage, as this library's CPU path)."""
    adapter_dtype: str = "float32"
    """Dtype the adapters are stored and trained in."""
    optimizer: str = "adamw"
    """adamw (torch) or paged_adamw_8bit (bitsandbytes; counted as resident)."""
    norm: str = "detached"
    """Row norm in the backward: detached or exact (keeps P = W0·Aᵀ per layer)."""
    double_quant: bool = True
    """NF4 with double quantization of the block scales."""
    block_rows: int = 1024
    """Rows of a base weight dequantized at once."""
    chunked_loss: bool = False
    """Plan the LM head and the cross-entropy over chunks of tokens (qdora.chunked_loss; `qdora train`'s
    default): no whole tokens × vocabulary logits. Off by default here, so that the documented figures stay
    the whole-logits ones: pass --chunked-loss to plan a qdora train run (a run's train_config.json sets it)."""
    loss_chunk_tokens: int = 0
    """Tokens per chunk of the chunked loss; 0: as many as make a chunk's fp32 logits 256 MiB (523 tokens
    at Llama 3's 128,256-token vocabulary, 1,365 at SmolLM2's 49,152)."""

    offload_activations: bool = False
    """Checkpointed layer inputs in pinned host memory (qdora.offload_activations): the GPU keeps two of them
    (the layer computing and the one being copied or prefetched); the host memory they take is printed beside.
    On a CPU device it saves nothing (host and device are one memory)."""
    tiled_mlp: bool = False
    """Each decoder layer's MLP (or MoE block) computed over tiles of tokens, forward and backward
    (qdora.tiled_mlp): its working set is one tile's, not the sequence's."""
    tiled_layers: bool = False
    """The tiled MLP and every other per-token part of each decoder layer tiled the same way: its norms, the
    attention's projections that train (qdora.tiled_layers): a layer keeps its input, each tiled part's
    input and the attention's own tensors."""
    mlp_tile_tokens: int = 0
    """Tokens per tile of the tiled MLP (and of the tiled layers); 0: the model's hidden size."""
    objective: str = "sft"
    """sft; dpo or simpo: each example is a pair, 2·batch_size sequences of seq_len (the prompt and the longer
    reply); dpo adds the reference's forward (no gradient) after the policy's, or nothing with
    precompute_reference; full fine-tuning's live reference is a frozen copy of the model."""
    precompute_reference: bool = False
    """dpo: the reference log-probabilities computed once before training (no reference forward per step)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "method": METHODS, "device": DEVICES, "adapter_dtype": ("float32", "bfloat16"),
        "optimizer": ("adamw", "paged_adamw_8bit"), "norm": ("detached", "exact"),
        "objective": ("sft", "dpo", "simpo")}
    """The values a string field may take (the command line offers them as choices)."""

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(t for t in self.target_modules.split(",") if t))
        object.__setattr__(self, "target_modules",
                           tuple(ALL_LINEAR if t == "all" else t for t in self.target_modules))
        if isinstance(self.magnitude_only_modules, str):
            object.__setattr__(self, "magnitude_only_modules",
                               tuple(t for t in self.magnitude_only_modules.split(",") if t))
        for attr in ("target_modules", "magnitude_only_modules"):  # fused projections, experts: their parts
            names = tuple(dict.fromkeys(part for t in getattr(self, attr)
                                        for part in (EXPERTS if t == "experts" else FUSED.get(t, (t,)))))
            object.__setattr__(self, attr, names)
        p = Problems("plan setting")
        p.choice("method", self.method, METHODS)
        for name in ("batch_size", "seq_len", "grad_accum", "gpus"):
            p.positive_int(name, getattr(self, name))
        if self.method != "full":
            known = LINEARS + EXPERTS + (ROUTER,) + SHARED
            unknown = [t for t in self.target_modules if t not in (*known, ALL_LINEAR)] + \
                [t for t in self.magnitude_only_modules if t not in known]
            if unknown:  # the planner counts the linears of a decoder layer by name
                names = ", ".join(LINEARS + tuple(FUSED) + ("experts",) + EXPERTS + (ROUTER,) + SHARED)
                p.add(f"unknown target module(s) {unknown}; use names from {names} or 'all'")
        try:  # the adapter's fields, with AdapterConfig's own checks and messages
            object.__setattr__(self, "adapter_dtype", self.adapter_config().adapter_dtype)
        except (ValueError, TypeError) as err:
            p.include(err)
        p.choice("device", self.device, DEVICES, use="'cuda' or 'cpu'")
        if p.choice("optimizer", self.optimizer, ("adamw", "paged_adamw_8bit"), use="adamw or paged_adamw_8bit") \
                and self.optimizer == "paged_adamw_8bit" and self.device != "cuda":
            p.add("optimizer='paged_adamw_8bit' needs device='cuda'")
        p.loss_chunks(self.chunked_loss, self.loss_chunk_tokens)
        p.long_sequence(self.seq_len, "seq_len", loss_chunk_tokens=self.loss_chunk_tokens,
                        offload_activations=self.offload_activations,
                        gradient_checkpointing=self.gradient_checkpointing,
                        tiled_mlp=self.tiled_mlp or self.tiled_layers,
                        mlp_tile_tokens=self.mlp_tile_tokens, sharded=self.fsdp)
        p.choice("objective", self.objective, ("sft", "dpo", "simpo"))
        if self.precompute_reference and self.objective != "dpo":
            p.add("precompute_reference needs objective='dpo' (the only objective with a reference)")
        if self.cpu_offload and self.gpus < 2:
            p.add("cpu_offload is an FSDP option: use gpus >= 2")
        p.raise_if_any()

    def adapter_config(self) -> AdapterConfig:
        """The adapter this setting trains (its fields checked by `AdapterConfig`)."""
        return AdapterConfig.of(self)

    @classmethod
    def from_adapter(cls, adapter: AdapterConfig, **setting) -> "PlanConfig":
        """The plan setting for `adapter` (its method, rank, targets, norm, dtype, NF4 and block
        settings), with the rest (batch, sequence, devices, ...) from `setting`."""
        unknown = sorted(set(setting) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown plan setting(s) {unknown}")
        return cls(**{name: getattr(adapter, name) for name in AdapterConfig.shared_fields(cls)}, **setting)

    @property
    def quantized(self) -> bool:
        return self.method in QUANTIZED_METHODS

    @property
    def use_dora(self) -> bool:
        return self.method in DORA_METHODS

    @property
    def compute_bytes(self) -> int:
        return 2 if self.device == "cuda" else 4

    @property
    def fsdp(self) -> bool:
        return self.gpus > 1

    def replace(self, **changes) -> "PlanConfig":
        return dataclasses.replace(self, **changes)


# ---- the result ----------------------------------------------------------------------------

TERMS = ("nf4_weights", "quant_state", "base_weights", "adapters", "gradients", "optimizer_states",
         "activations", "logits_loss", "temporaries", "fsdp_buffers", "cuda_context", "allocator_slack")
TERM_LABELS = {
    "nf4_weights": "NF4 weights (packed)", "quant_state": "quantization state", "base_weights":
    "base weights not in NF4", "adapters": "adapters (+ DoRA norm buffer)", "gradients": "gradients",
    "optimizer_states": "optimizer states", "activations": "activations saved for backward",
    "logits_loss": "logits / loss", "temporaries": "temporaries", "fsdp_buffers": "FSDP unsharded buffers",
    "cuda_context": "CUDA context (constant)", "allocator_slack": "allocator slack",
}


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak bytes per device, by term, at the step's peak phase."""

    model: ModelShape
    config: PlanConfig
    terms: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    """Tensor bytes at the peak of each phase (resident included)."""
    details: dict[str, int] = field(default_factory=dict)
    """Named parts of the terms (e.g. the FSDP buffers one by one)."""
    start_bytes: int = 0
    """FSDP only: a rank's tensor bytes on its device while the run starts (`qdora.train.fsdp.build_sharded`:
    every rank reads, quantizes and shards the checkpoint one decoder layer at a time, the root
    last). The training step's terms do not include it; `fits` checks both."""
    notes: tuple[str, ...] = ()
    """What the plan assumed beyond the setting (e.g. targets an MoE has no layer for)."""

    @property
    def tensor_bytes(self) -> int:
        return sum(v for k, v in self.terms.items() if k not in ("cuda_context", "allocator_slack"))

    @property
    def total_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def start_total_bytes(self) -> int:
        """`start_bytes` with the CUDA context and allocator slack the step's total counts too."""
        if not self.start_bytes:
            return 0
        extra = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * self.start_bytes) if self.config.device == "cuda" else 0
        return self.start_bytes + extra

    def verdict(self, card_gb: float) -> str:
        """"yes": the training step and (with FSDP) the start fit `card_gb` with `FIT_MARGIN` to
        spare; "tight": they fit, but within the planner's measured error; "no"."""
        peak = max(self.total_bytes, self.start_total_bytes)
        return "yes" if peak <= (1 - FIT_MARGIN) * card_gb * GIB else "tight" if peak <= card_gb * GIB else "no"

    def fits(self, card_gb: float) -> bool:
        """`verdict` is "yes": it fits `card_gb` with the margin the planner's error needs."""
        return self.verdict(card_gb) == "yes"
