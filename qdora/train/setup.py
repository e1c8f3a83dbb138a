"""Everything a training run does before its first step, each stage once: check the input
(`qdora.train.preflight`), read and tokenize the data (`qdora.train.run_data`), load and adapt the model
(sharded over the job with FSDP), make the optimizer, then start the run folder or resume its
checkpoint. The result is a `Run`, which `qdora.train.loop` steps."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import bitsandbytes as bnb
import torch

from qdora.core.config import AdapterConfig
from qdora.core.loss import check_loss_kernel
from qdora.core.optim import MasterWeights, needs_master_weights
from qdora.core.safetensors_io import write_text_atomic
from qdora.data.chat import set_chat_template
from qdora.data.examples import pad_token_id
from qdora.models import packed_attention
from qdora.models.adapter_io import save_adapter
from qdora.models.head_loss import chunked_loss
from qdora.models.loading import load_model, load_tokenizer
from qdora.models.offload import offload_activations
from qdora.models.tiled_mlp import tiled_layers, tiled_mlp
from qdora.train import allocator, fsdp
from qdora.train.checkpoint import CHECKPOINT, load_checkpoint
from qdora.train.config import TrainConfig
from qdora.train.fsdp import save_adapter_gathered
from qdora.train.preference import Objective, pair_examples, read_pairs
from qdora.train.preflight import check_run, fingerprints
from qdora.train.run_data import examples, read_records
from qdora.train.run_log import check_reporters, trim_csv, write_header


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, cfg: TrainConfig, device: torch.device):
    """AdamW (or bitsandbytes' paged 8-bit AdamW), over fp32 master copies of bf16 adapters
    (`qdora.core.optim.MasterWeights`), so that no step is rounded away. A full fine-tune steps the
    model's weights in their own dtype (bf16 on CUDA, as torchtune's full recipes do): master
    copies of every weight would cost 4 more bytes per parameter (`qdora plan`)."""
    if cfg.optimizer == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ValueError("optimizer='paged_adamw_8bit' needs a CUDA device; use 'adamw' on CPU")
        optimizer = bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        # fused: one kernel over all tensors (on CPU 3.5x faster than the per-tensor loop for SmolLM2's
        # 450 adapter tensors; results differ from the loop only by fp32 rounding order). Sharded
        # (FSDP) parameters keep torch's default.
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=True if device.type in ("cpu", "cuda") and not cfg.fsdp else None)
    return MasterWeights(optimizer) if cfg.method != "full" and needs_master_weights(params) else optimizer


def save_result(model, tokenizer, path: Path, cfg: TrainConfig, build) -> None:
    """The trained result: the whole model for `full`, else the adapter (ours or PEFT's, as
    `cfg.adapter_format` says; a PEFT peer's own). A sharded model's adapter is gathered and
    written by rank 0 (every rank calls this)."""
    if cfg.fsdp:
        save_adapter_gathered(model, path, format=cfg.adapter_format, base_model_name_or_path=str(cfg.model))
    elif cfg.method == "full":
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    elif build is not None and hasattr(model, "peft_config"):
        model.save_pretrained(path)
    else:
        save_adapter(model, path, format=cfg.adapter_format, base_model_name_or_path=str(cfg.model))


@dataclass
class Run:
    """What a run's steps need, set up once by `setup_run`: the model and its optimizer, the examples,
    this process's place in the job, and where the run stands (the step to start from, totals, the
    last checkpoint)."""
    cfg: TrainConfig
    model: object
    tokenizer: object
    optimizer: torch.optim.Optimizer
    params: list[tuple[str, torch.Tensor]]
    examples: list[dict]
    pad: int
    device: torch.device
    rank: int
    world: int
    build: Callable | None
    val: list[dict] = dataclasses.field(default_factory=list)
    """Validation examples (never packed)."""
    start: int = 0
    totals: dict = dataclasses.field(default_factory=lambda: {"tokens": 0, "seconds": 0.0})
    saved_step: int | None = None
    objective: object = None
    """A preference objective's loss and reference (`qdora.train.preference.Objective`); None for sft."""
    val_metrics: dict = dataclasses.field(default_factory=dict)
    """The last validation's metrics besides its loss (preference objectives: rewards, accuracy)."""

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def names(self) -> dict[int, str]:
        return {i: n for i, (n, _) in enumerate(self.params)}

    def saved_note(self) -> str:
        if self.saved_step is None:
            return "No checkpoint was written before it."
        return f"The checkpoint of step {self.saved_step} in {self.out / CHECKPOINT} is kept as it was."


def _load(cfg: TrainConfig, build, device: torch.device, rank: int):
    """The model and tokenizer: sharded over the job (`fsdp`), built by `build`, or `load_model`."""
    adapter_cfg = cfg.adapter_config() if cfg.method != "full" else AdapterConfig(method="full")
    if cfg.fsdp:
        if adapter_cfg.quantized and fsdp.mixed_precision(device).param_dtype is not None:
            # FSDP casts what it all-gathers to bf16: the packed NF4 bytes must already be bf16.
            adapter_cfg = adapter_cfg.replace(quant_storage="bfloat16")
        model, tokenizer = fsdp.build_sharded(cfg.model, adapter_cfg, device, cpu_offload=cfg.cpu_offload,
                                              progress=cfg.progress)
        if rank != 0:  # dropout masks differ between ranks; rank 0's stream is the single-process one
            torch.manual_seed(cfg.seed + rank)
    elif build is None:
        model, tokenizer = load_model(cfg.model, method=cfg.method, cfg=adapter_cfg, device=device,
                                      progress=cfg.progress)
    else:
        model, tokenizer = build(cfg, device)
    return model, tokenizer


def setup_run(cfg: TrainConfig, build) -> Run:
    """Check, load, adapt, distribute: everything before the first step, each stage once. Every
    check of the input runs before the model is loaded (the data's tokenizing too); the run folder
    is written last."""
    if cfg.fsdp and build is not None:
        raise ValueError("fsdp=True builds the sharded model itself; a custom `build` is not supported with it")
    existing = check_run(cfg)
    check_reporters(cfg)
    records = read_records(cfg) if cfg.objective == "sft" else read_pairs(cfg)
    rank, world = 0, 1
    if cfg.fsdp:
        device = fsdp.init_process_group(cpu_offload=cfg.cpu_offload)
        rank, world = fsdp.rank(), fsdp.world_size()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.loss_kernel != "torch":
        check_loss_kernel(cfg.loss_kernel, "loss_kernel")
        if device.type != "cuda":
            raise ValueError(f"loss_kernel={cfg.loss_kernel!r} runs on CUDA; this run is on {device.type}: "
                             "use --loss-kernel torch")
    # the tokenizer first: the data is tokenized (and checked) before the model is loaded
    folder = fsdp.resolve_shared(cfg.model, device, cfg.progress and rank == 0) if cfg.fsdp else cfg.model
    tokenizer = load_tokenizer(folder, progress=cfg.progress and rank == 0)
    if tokenizer is None:
        raise ValueError(f"{cfg.model}: no tokenizer found next to the model; training needs one")
    if cfg.objective == "sft":
        data = examples(cfg, records, tokenizer, progress=cfg.progress and rank == 0)
    else:
        if cfg.chat_template:
            set_chat_template(tokenizer, cfg.chat_template)
        data = pair_examples(cfg, records, tokenizer)
    # notes about the data and the model print with or without --no-progress (which turns off bars and
    # messages), and go to the run log (run.log) when the run folder is written
    header = data.notes()
    if cfg.packing:
        header.append(f"packing: {data.examples} examples in {len(data.rows)} rows of up to {cfg.cutoff_len} tokens")
    for line in header:
        if rank == 0:
            print(line)
    if cfg.epochs:
        epochs, cfg = cfg.epochs, cfg.for_examples(len(data.rows))
        if rank == 0:
            print(f"{epochs:g} epoch(s) of {len(data.rows)} {'rows' if cfg.packing else 'examples'}: {cfg.max_steps} "
                  f"steps of {cfg.batch_size} x {cfg.grad_accum}")
    _seed_all(cfg.seed)
    model, model_tokenizer = _load(cfg, build, device, rank)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    attention = getattr(config, '_attn_implementation', None) or 'unknown'
    attention = training_attention(model, cfg.packing) or attention
    unmasked = packed_attention.unmasked_padding(model) is not None  # the hook stays for the run
    padded = cfg.objective != "sft" or cfg.batch_size > 1  # rows of one batch padded to the longest
    loaded = [f"attention: {attention}",
              None if not unmasked or not padded else
              "padding: rows padded on the right go to the model without an attention mask (causal attention never "
              "lets a token see the padding after it; no tokens × tokens mask is built from it)",
              f"host allocator: {allocator.loaded()}",
              data.positions_note(getattr(text_config, "max_position_embeddings", None))]
    loaded = [line for line in loaded if line]
    for line in loaded:
        if rank == 0:
            print(line)
    header += loaded
    prepare_for_training(model, cfg.gradient_checkpointing)
    if cfg.chunked_loss:  # the loss without the whole logits (the model's own loss where it cannot be exact)
        chunked_loss(model, cfg.loss_chunk_tokens or None, kernel=cfg.loss_kernel)
    long_sequence_options(model, cfg)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer([p for _, p in params], cfg, device)
    run = Run(cfg, model, model_tokenizer or tokenizer, optimizer, params, data.rows, pad_token_id(tokenizer),
               device, rank, world, build, val=data.val)
    if cfg.objective != "sft":
        run.objective = Objective(run)
    _start_or_resume(run, existing)
    if run.objective is not None and cfg.precompute_reference:
        run.objective.precompute(run.out, run.main)
    if run.main:
        write_header(run.out, header, run.start)
    return run


def _start_or_resume(run: Run, existing: Path | None) -> None:
    """A new run writes its settings; a resumed one loads its checkpoint and keeps its metrics up to it."""
    cfg, out = run.cfg, run.out
    metrics_path = out / "metrics.jsonl"
    if run.main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.resume and existing:
        saved = load_checkpoint(existing, run.model, run.optimizer, run.names, sharded=cfg.fsdp)
        run.start = run.saved_step = int(saved["step"])
        run.totals.update(saved.get("totals", {}))
        if metrics_path.exists() and run.main:  # keep the curve up to the checkpoint, drop what came after it
            lines = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= run.start]
            write_text_atomic(metrics_path, "".join(line + "\n" for line in lines))
            trim_csv(out / "metrics.csv", run.start, cfg.objective)
    elif run.main:
        write_text_atomic(out / "train_config.json",
                          json.dumps({**cfg.absolute_paths().to_dict(), "fingerprints": fingerprints(cfg)},
                                     indent=1) + "\n")
        for stale in (metrics_path, out / "metrics.csv"):
            stale.unlink(missing_ok=True)
    if cfg.fsdp:
        torch.distributed.barrier()  # the folder and its files exist before any rank writes into it


def training_attention(model, packing: bool) -> str | None:
    """Switch a model to `qdora.packed_sdpa` where its attention would be `T × T`: packed rows or a sliding window on
    SDPA (with or without packing), or soft-capped scores on eager (Gemma 2, always). Returns the run log's name for
    the attention then, else None."""
    if not packed_attention.serves(model, packing):
        return None
    window = packed_attention.sliding_window(model)
    capped = packed_attention.implementation(model) == packed_attention.SOFTCAP_NAME
    packed_attention.packed_sdpa(model)
    how = ["over each packed sequence"] if packing else []
    how += [f"in blocks of the {window}-token sliding window"] if window and not capped else []
    how += [f"within the {window}-token sliding window on its windowed layers"] if window and capped else []
    if capped:
        return (f"{packed_attention.SOFTCAP_NAME} (eager soft-capped scores in tiles of queries, each recomputed in "
                f"the backward{''.join(', ' + h for h in how)}; no tokens × tokens scores or mask)")
    return f"{packed_attention.NAME} (SDPA {', '.join(how)}; no tokens × tokens mask)"


def long_sequence_options(model, cfg) -> None:
    """The tiled MLP (or tiled layers) and the offloaded activations, as the run's settings ask. With offloading, the
    embeddings' output no longer needs a gradient of its own (transformers asks for one so that reentrant checkpointing
    sees a graph; the offloading checkpoint takes the layer's parameters as its inputs instead): otherwise that
    output, and later its gradient, would stay on the device through the backward, one checkpoint more."""
    if cfg.tiled_layers:
        tiled_layers(model, cfg.mlp_tile_tokens or None)
    elif cfg.tiled_mlp:
        tiled_mlp(model, cfg.mlp_tile_tokens or None)
    if cfg.offload_activations:
        offload_activations(model)
        if callable(getattr(model, "disable_input_require_grads", None)):
            model.disable_input_require_grads()


def prepare_for_training(model, gradient_checkpointing: bool = True) -> None:
    """Train mode, no KV cache, and (non-reentrant) gradient checkpointing as `qdora train` runs a
    transformers model; the benchmarks and the planner's validation use it to run the same step."""
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()


