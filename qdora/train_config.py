"""`TrainConfig`: the settings of one fine-tuning run, each written once (a field with its default
and docstring; `qdora train`'s options and `--config` keys come from them, `qdora.options`), and
the learning-rate schedule they define."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from qdora.config import METHODS, AdapterConfig

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
ADAPTER_FORMATS = ("qdora", "peft")


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run. Every field is checked in `__post_init__`."""

    model: str
    """A transformers checkpoint folder or a .gguf file."""
    data: str
    """Training data: JSON/JSONL in the Alpaca/LLM-Adapters or GSM8K format."""
    out: str
    """Output folder: metrics.jsonl, checkpoint/, adapter/ (or model/ for `full`)."""
    method: str = "qdora"
    """What is trained: full, lora, dora, qlora or qdora."""
    r: int = 16
    """Rank of the direction update B·A."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r)·B·A."""
    dropout: float = 0.05
    """Dropout on the adapter's input (0 disables it)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    """Linear modules that get an adapter (comma-separated: exact name, dotted suffix or re:<regex>)."""
    magnitude_only_modules: tuple[str, ...] = ()
    """Linear modules that train only the magnitude m (comma-separated)."""
    norm: str = "detached"
    """Row norm in the backward: detached (the DoRA paper's §4.3) or exact."""
    direction: str = "lora"
    """Direction update: trained B·A (lora), or VeRA's shared random projections with trained scaling
    vectors (vera: alpha unused; use a large r, e.g. 256, and a higher lr)."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_steps: int = 100
    """Optimizer steps (each of batch_size × grad_accum examples)."""
    batch_size: int = 8
    """Examples per micro-batch (with fsdp: the global micro-batch, split across the processes)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    cutoff_len: int = 256
    """Tokens per example; longer ones are truncated."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warmup."""
    schedule: str = "linear"
    """Learning-rate decay after warmup: linear or cosine to 0 at max_steps, or constant."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 0
    """Seed of the adapters' initialization, the data order and dropout."""
    save_every: int = 50
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_adapters_every: int = 0
    """Also keep the adapter of every this many steps as adapter-step<N>/ (for qdora analyze); 0: never."""
    log_every: int = 1
    """Write a line to metrics.jsonl every this many steps."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward (non-reentrant): less memory, more compute."""
    optimizer: str = "adamw"
    """adamw (torch) or paged_adamw_8bit (bitsandbytes, CUDA only)."""
    train_on_prompt: bool = False
    """Also supervise the prompt tokens."""
    adapter_format: str = "qdora"
    """Format of the saved adapters: qdora (ours) or peft (PeftModel.from_pretrained reads it)."""
    adapter_dtype: str = "float32"
    """Dtype the adapters are stored and trained in; fp32 never rounds an optimizer update away."""
    resume: bool = False
    """Continue the run in out from its checkpoint."""
    progress: bool = True
    """A progress bar and notes."""
    fsdp: bool = False
    """Shard the model over the processes of a torchrun job (FSDP2, qdora.fsdp; run as
    `torchrun ... -m qdora.cli -- train ...`). batch_size stays the global micro-batch, split across
    the ranks: the run is the same run."""
    cpu_offload: bool = False
    """With fsdp: keep each rank's shards of the parameters, gradients and optimizer states in CPU
    memory and step the optimizer there (FSDP2 CPUOffloadPolicy; see qdora plan --cpu-offload)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "method": METHODS, "norm": ("detached", "exact"), "direction": ("lora", "vera"), "schedule": SCHEDULES,
        "optimizer": OPTIMIZERS, "adapter_format": ADAPTER_FORMATS, "adapter_dtype": ("float32", "bfloat16")}
    """The values a string field may take (the command line offers them as choices)."""

    def __post_init__(self):
        problems = []
        if self.method not in METHODS:
            problems.append(f"method={self.method!r} is unknown; use one of {', '.join(METHODS)}")
        for name in ("max_steps", "batch_size", "grad_accum", "cutoff_len", "save_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps!r} must be >= 0")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr={self.lr!r} must be a positive number (typical: 1e-4 to 2e-4 for adapters)")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            problems.append(f"weight_decay={self.weight_decay!r} must be a number >= 0")
        if not (isinstance(self.max_grad_norm, (int, float)) and math.isfinite(self.max_grad_norm)
                and self.max_grad_norm >= 0):
            problems.append(f"max_grad_norm={self.max_grad_norm!r} must be a number >= 0 (0 disables clipping)")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        if self.fsdp and self.method == "full":
            problems.append("fsdp=True trains adapters; method='full' is not supported with --fsdp")
        if self.fsdp and self.direction != "lora":
            problems.append(f"direction={self.direction!r} is not supported with --fsdp (VeRA's projections are "
                            "shared across layers, which FSDP shards separately); use direction='lora'")
        if self.cpu_offload and not self.fsdp:
            problems.append("cpu_offload=True is an FSDP option: add --fsdp (and launch with torchrun)")
        if self.fsdp and self.optimizer != "adamw":
            problems.append(f"optimizer={self.optimizer!r} cannot step sharded parameters; use 'adamw' with --fsdp")
        if self.adapter_format not in ADAPTER_FORMATS:
            problems.append(f"adapter_format={self.adapter_format!r} is unknown; use one of "
                            f"{', '.join(ADAPTER_FORMATS)}")
        elif self.adapter_format == "peft":
            if self.method == "full":
                problems.append("adapter_format='peft' needs an adapter method; method='full' saves the whole model")
            if self.direction != "lora":
                problems.append(f"adapter_format='peft' cannot hold direction={self.direction!r} (PEFT has no DoRA "
                                "with a VeRA direction); use adapter_format='qdora'")
            if self.magnitude_only_modules:
                problems.append("adapter_format='peft' cannot hold magnitude-only modules; use adapter_format='qdora'")
        if self.method != "full" and self.method in METHODS:
            try:  # the adapter fields, with AdapterConfig's own messages, in the same list
                self.adapter_config()
            except (ValueError, TypeError) as err:
                lines = [ln.strip().removeprefix("- ") for ln in str(err).splitlines()[1:] if ln.strip()]
                problems += lines or [str(err)]
        if problems:
            raise ValueError("invalid TrainConfig:\n  - " + "\n  - ".join(problems))

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(method=self.method, r=self.r, alpha=self.alpha, dropout=self.dropout,
                             target_modules=tuple(self.target_modules),
                             magnitude_only_modules=tuple(self.magnitude_only_modules), norm=self.norm,
                             adapter_dtype=self.adapter_dtype, direction=self.direction,
                             projection_seed=self.seed)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
