"""`TrainConfig`: the settings of one fine-tuning run, each written once (a field with its default
and docstring; `qdora train`'s options and `--config` keys come from them, `qdora.options`), and
the learning-rate schedule they define."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import ClassVar

from qdora.core.config import METHODS, AdapterConfig, Problems
from qdora.core.loss import LOSS_KERNELS
from qdora.core.preference import DPO_LOSSES, OBJECTIVES, check_beta, check_gamma
from qdora.data.records import FORMATS

SCHEDULES = ("linear", "cosine", "constant")
REPORTERS = ("tensorboard", "csv")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
ADAPTER_FORMATS = ("qdora", "peft")


DEFAULT_MAX_STEPS = 100


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run. Every field is checked in `__post_init__`."""

    model: str
    """A transformers checkpoint folder or a .gguf file."""
    data: str
    """Training data: a .json, .jsonl, .parquet or .arrow file, or a datasets save_to_disk folder, of chat
    (messages), prompt/completion, text, Alpaca/LLM-Adapters or GSM8K records (see --format)."""
    out: str
    """Output folder: metrics.jsonl, checkpoint/, adapter/ (or model/ for `full`)."""
    format: str = "auto"
    """Record format: auto (detected from each record's fields), chat, prompt-completion, text, alpaca or gsm8k."""
    chat_template: str = ""
    """A Jinja chat template file for chat records (default: the tokenizer's own)."""
    packing: bool = False
    """Pack several examples into each row of up to cutoff_len tokens (no attention across them)."""
    val_data: str = ""
    """Validation data (same formats as data)."""
    val_split: float = 0.0
    """Hold out this fraction of data for validation instead (e.g. 0.05; seeded by seed)."""
    eval_every: int = 0
    """Validation loss every this many steps (0: at the end only); needs val_data or val_split."""
    keep_best: bool = False
    """Keep the adapter of the step with the lowest validation loss as adapter-best/."""
    report_to: tuple[str, ...] = ()
    """Also log to (comma-separated): tensorboard (out/tensorboard; needs the tensorboard package), csv
    (out/metrics.csv)."""
    progress_seconds: float = 30.0
    """Without a terminal (a log file, CI): a plain progress line at most this often (seconds), and at
    the first and last step."""
    method: str = "qdora"
    """What is trained: full, lora, dora, qlora or qdora."""
    r: int = 16
    """Rank of the direction update B·A."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r)·B·A."""
    dropout: float = 0.05
    """Dropout on the adapter's input (0 disables it)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    """Linear modules that get an adapter (comma-separated: exact name, dotted suffix or re:<regex>); on an
    MoE, `experts` (or `experts.gate_up_proj`, `experts.down_proj`) and the router `gate` too."""
    magnitude_only_modules: tuple[str, ...] = ()
    """Linear modules that train only the magnitude m (comma-separated)."""
    keep_full_precision: tuple[str, ...] = ("lm_head",)
    """qlora, qdora: linear modules without an adapter that stay as loaded instead of NF4 (comma-separated,
    matched as target_modules; e.g. lm_head,experts keeps an MoE's experts)."""
    norm: str = "detached"
    """Row norm in the backward: detached (the DoRA paper's §4.3) or exact."""
    direction: str = "lora"
    """Direction update: trained B·A (lora), or VeRA's shared random projections with trained scaling
    vectors (vera: alpha unused; use a large r, e.g. 256, and a higher lr)."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_steps: int = DEFAULT_MAX_STEPS
    """Optimizer steps (each of batch_size × grad_accum examples)."""
    epochs: float = 0.0
    """Passes over the training examples instead of max_steps: max_steps becomes the steps they take
    (rounded up), counted once the data is read (after packing). 0: max_steps decides."""
    batch_size: int = 8
    """Examples per micro-batch (with fsdp: the global micro-batch, split across the processes)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    cutoff_len: int = 256
    """Tokens per example (with packing: per row); longer examples are cut to it, counted and reported."""
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
    chunked_loss: bool = True
    """Compute the LM head and the cross-entropy over chunks of tokens, never the whole tokens × vocabulary
    logits (exact: qdora.chunked_loss); --no-chunked-loss forms the whole logits, as transformers does."""
    loss_chunk_tokens: int = 0
    """Tokens per chunk of the chunked loss; 0: as many as make a chunk's fp32 logits 256 MiB (523 tokens
    at Llama 3's 128,256-token vocabulary, 1,365 at SmolLM2's 49,152)."""
    loss_kernel: str = "torch"
    """Who computes the chunked loss: torch (qdora's own, every device), or on CUDA liger (liger-kernel's
    fused linear cross-entropy) or cce (Apple's Cut Cross-Entropy): pip install qdora[loss-kernels]."""
    offload_activations: bool = False
    """Keep each decoder layer's checkpointed input in pinned host memory, copied asynchronously and fetched
    back ahead of its backward (qdora.offload_activations; needs gradient checkpointing, not with --fsdp).
    Saves GPU memory; on CPU it saves nothing and only runs the path."""
    tiled_mlp: bool = False
    """Compute each decoder layer's MLP (or MoE block) over tiles of tokens, forward and backward
    (qdora.tiled_mlp): its working set is one tile's; the MLP's forward runs once more per step."""
    tiled_layers: bool = False
    """--tiled-mlp and every other per-token part of each decoder layer tiled the same way: its norms, the
    attention's projections that train (qdora.tiled_layers); each tiled part's forward runs once more per step."""
    mlp_tile_tokens: int = 0
    """Tokens per tile of --tiled-mlp or --tiled-layers; 0: the model's hidden size."""
    optimizer: str = "adamw"
    """adamw (torch) or paged_adamw_8bit (bitsandbytes, CUDA only)."""
    train_on_prompt: bool = False
    """Also supervise the prompt tokens."""
    objective: str = "sft"
    """sft (supervised, the default); dpo (preference pairs against a reference: the same model with every
    adapter off, magnitude included; a frozen copy for full); simpo (preference pairs, no reference). dpo
    and simpo need data of prompt, chosen, rejected pairs (text or chat messages)."""
    beta: float = 0.1
    """dpo, simpo: the inverse temperature β (typical: DPO 0.1, SimPO 2.0)."""
    dpo_loss: str = "sigmoid"
    """dpo: sigmoid (the DPO paper's) or ipo (IPO's squared loss on per-token log-ratios)."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin γ."""
    precompute_reference: bool = False
    """dpo: compute every pair's reference log-probabilities once before training (saved in
    reference_logps.json, reused on --resume) instead of a reference forward per step."""
    adapter_format: str = "qdora"
    """Format of the saved adapters: qdora (ours) or peft (PeftModel.from_pretrained reads it)."""
    adapter_dtype: str = "float32"
    """Dtype the adapters are stored in. bfloat16 trains fp32 master copies (qdora.core.optim.MasterWeights),
    which costs 2 bytes per adapter parameter more than float32."""
    resume: bool = False
    """Continue the run in out from its checkpoint."""
    progress: bool = True
    """A progress bar (off a terminal: a line every progress_seconds) and loading messages. Notes and
    warnings about the data and the run print either way."""
    fsdp: bool = False
    """Shard the model over the processes of a torchrun job (FSDP2, qdora.train.fsdp; run as
    `torchrun ... -m qdora.cli -- train ...`). batch_size stays the global micro-batch, split across
    the ranks: the run is the same run."""
    cpu_offload: bool = False
    """With fsdp: keep each rank's shards of the parameters, gradients and optimizer states in CPU
    memory and step the optimizer there (FSDP2 CPUOffloadPolicy; see qdora plan --cpu-offload)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "format": ("auto", *FORMATS),
        "method": METHODS, "norm": ("detached", "exact"), "direction": ("lora", "vera"), "schedule": SCHEDULES,
        "optimizer": OPTIMIZERS, "adapter_format": ADAPTER_FORMATS, "adapter_dtype": ("float32", "bfloat16"),
        "objective": OBJECTIVES, "dpo_loss": DPO_LOSSES, "loss_kernel": LOSS_KERNELS}
    """The values a string field may take (the command line offers them as choices)."""
    PATHS: ClassVar[tuple[str, ...]] = ("model", "data", "val_data", "chat_template", "out")
    """The fields that are paths, relative to the folder the run was started in (`absolute_paths`)."""

    def __post_init__(self):
        p = Problems("TrainConfig")
        p.choice("method", self.method, METHODS)
        for name in ("max_steps", "batch_size", "grad_accum", "cutoff_len", "save_every", "log_every"):
            p.positive_int(name, getattr(self, name))
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            p.add(f"warmup_steps={self.warmup_steps!r} must be >= 0")
        p.number("lr", self.lr, hint="typical: 1e-4 to 2e-4 for adapters")
        p.number("epochs", self.epochs, inclusive=True, hint="0: max_steps decides")
        if self.epochs and self.max_steps != DEFAULT_MAX_STEPS:
            p.add(f"epochs={self.epochs!r} and max_steps={self.max_steps!r} both given; give one (epochs sets "
                  "max_steps)")
        p.number("weight_decay", self.weight_decay, inclusive=True)
        p.number("max_grad_norm", self.max_grad_norm, inclusive=True, hint="0 disables clipping")
        p.choice("schedule", self.schedule, SCHEDULES)
        p.choice("format", self.format, ("auto", *FORMATS))
        if self.val_data and self.val_split:
            p.add("val_data and val_split both given; hold out a split or pass a file, not both")
        if not (isinstance(self.val_split, (int, float)) and 0 <= self.val_split < 1):
            p.add(f"val_split={self.val_split!r} must be in [0, 1) (e.g. 0.05; 0: none)")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            p.add(f"eval_every={self.eval_every!r} must be an integer >= 0 (0: at the end only)")
        if (self.eval_every or self.keep_best) and not (self.val_data or self.val_split):
            p.add("eval_every and keep_best need validation data: pass --val-data FILE or --val-split 0.05")
        unknown = [r for r in self.report_to if r not in REPORTERS]
        if unknown:
            p.add(f"report_to={unknown} unknown; use {', '.join(REPORTERS)} (comma-separated)")
        p.number("progress_seconds", self.progress_seconds, inclusive=True, hint="0: a line every step")
        p.choice("optimizer", self.optimizer, OPTIMIZERS)
        p.loss_chunks(self.chunked_loss, self.loss_chunk_tokens)
        if p.choice("loss_kernel", self.loss_kernel, LOSS_KERNELS) and self.loss_kernel != "torch":
            if not self.chunked_loss:
                p.add(f"loss_kernel={self.loss_kernel!r} computes the chunked loss, which --no-chunked-loss turns "
                      "off; give one of them")
            if self.loss_chunk_tokens:
                p.add(f"loss_chunk_tokens={self.loss_chunk_tokens} sizes qdora's own chunks; "
                      f"loss_kernel={self.loss_kernel!r} sizes its own: give one of them")
        p.long_sequence(self.cutoff_len, "cutoff_len", loss_chunk_tokens=self.loss_chunk_tokens,
                        offload_activations=self.offload_activations,
                        gradient_checkpointing=self.gradient_checkpointing,
                        tiled_mlp=self.tiled_mlp or self.tiled_layers,
                        mlp_tile_tokens=self.mlp_tile_tokens, sharded=self.fsdp)
        if p.choice("objective", self.objective, OBJECTIVES) and self.objective != "sft":
            p.choice("dpo_loss", self.dpo_loss, DPO_LOSSES)
            try:
                check_beta(self.beta, "beta")
                check_gamma(self.simpo_gamma)
            except ValueError as err:
                p.include(err)
            if self.packing:
                p.add(f"objective={self.objective!r} compares two whole replies: packing is not supported with it "
                      "(drop --packing)")
            if self.fsdp:
                p.add(f"objective={self.objective!r} is not supported with --fsdp yet; train on one process")
            if self.train_on_prompt:
                p.add(f"train_on_prompt=True is an sft option; objective={self.objective!r} scores the replies")
        if self.precompute_reference and self.objective != "dpo":
            p.add("precompute_reference=True needs objective='dpo' (the only objective with a reference)")
        if self.fsdp and self.method == "full":
            p.add("fsdp=True trains adapters; method='full' is not supported with --fsdp")
        if self.fsdp and self.direction != "lora":
            p.add(f"direction={self.direction!r} is not supported with --fsdp (VeRA's projections are "
                  "shared across layers, which FSDP shards separately); use direction='lora'")
        if self.cpu_offload and not self.fsdp:
            p.add("cpu_offload=True is an FSDP option: add --fsdp (and launch with torchrun)")
        if self.fsdp and self.adapter_dtype == "bfloat16":
            p.add("adapter_dtype='bfloat16' is not supported with --fsdp: FSDP keeps the fp32 shards and casts "
                  "them to bf16 for the compute on CUDA; use adapter_dtype='float32'")
        if self.fsdp and self.optimizer != "adamw":
            p.add(f"optimizer={self.optimizer!r} cannot step sharded parameters; use 'adamw' with --fsdp")
        if p.choice("adapter_format", self.adapter_format, ADAPTER_FORMATS) and self.adapter_format == "peft":
            if self.method == "full":
                p.add("adapter_format='peft' needs an adapter method; method='full' saves the whole model")
            if self.direction != "lora":
                p.add(f"adapter_format='peft' cannot hold direction={self.direction!r} (PEFT has no DoRA "
                      "with a VeRA direction); use adapter_format='qdora'")
            if self.magnitude_only_modules:
                p.add("adapter_format='peft' cannot hold magnitude-only modules; use adapter_format='qdora'")
        if self.method != "full" and self.method in METHODS:
            try:  # the adapter fields, with AdapterConfig's own messages, in the same list
                self.adapter_config()
            except (ValueError, TypeError) as err:
                p.include(err)
        p.raise_if_any()

    def for_examples(self, count: int) -> TrainConfig:
        """This config for `count` training examples (rows, once packed): with `epochs`, max_steps
        set to the steps they take and epochs to 0 (the run then records its steps)."""
        if not self.epochs:
            return self
        micro_batches = math.ceil(count / self.batch_size)
        return dataclasses.replace(self, epochs=0.0, max_steps=max(1, math.ceil(self.epochs * micro_batches
                                                                                / self.grad_accum)))

    def adapter_config(self) -> AdapterConfig:
        """The adapter this run trains: every field named as an `AdapterConfig` field is one (an
        adapter setting reaches `qdora train` by adding it here under its name), the seed seeds
        VeRA's projections."""
        return AdapterConfig.of(self, projection_seed=self.seed)

    def absolute_paths(self) -> TrainConfig:
        """This config with its `PATHS` made absolute against the current folder (those not given stay
        empty), as a run saves it in train_config.json: `--config RUN/train_config.json` then
        re-launches the run from any folder."""
        return dataclasses.replace(self, **{name: os.path.abspath(getattr(self, name))
                                            for name in self.PATHS if getattr(self, name)})

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
