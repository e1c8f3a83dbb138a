"""Fine-tuning loop for every method (`full`, `lora`, `dora`, `qlora`, `qdora`): setup → fit.

Checkpoints hold what resuming needs to continue the same run exactly: the trainable tensors,
the optimizer state, the step and the RNG states, all as safetensors/JSON (no pickle). They are
written to a temporary folder and renamed into place. The data order is a pure function of the
seed and the step, and the learning rate a pure function of the step, so a resumed run replays
the uninterrupted one. Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qdora.config import METHODS, AdapterConfig
from qdora.safetensors_io import atomic_dir, save_file_atomic, write_text_atomic

CHECKPOINT = "checkpoint"
SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
# Fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = {"max_steps", "resume", "save_every", "log_every", "progress", "keep_adapters_every",
                      "cpu_offload"}


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
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    magnitude_only_modules: tuple[str, ...] = ()
    norm: str = "detached"
    direction: str = "lora"
    """`lora`, or `vera`: VeRA's shared frozen projections with trained scaling vectors (see AdapterConfig)."""
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_steps: int = 100
    """Optimizer steps (each of `batch_size × grad_accum` examples)."""
    batch_size: int = 8
    grad_accum: int = 1
    cutoff_len: int = 256
    warmup_steps: int = 0
    schedule: str = "linear"
    """Learning-rate decay after warmup: `linear` or `cosine` to 0 at `max_steps`, or `constant`."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 0
    save_every: int = 50
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_adapters_every: int = 0
    """Also keep the adapter of every this many steps as `adapter-step<N>/` (for `qdora analyze`); 0: never."""
    log_every: int = 1
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"
    """`adamw` (torch) or `paged_adamw_8bit` (bitsandbytes, CUDA only)."""
    train_on_prompt: bool = False
    adapter_dtype: str = "float32"
    """Adapters in fp32 by default: an optimizer step then never rounds an update away."""
    resume: bool = False
    progress: bool = True
    fsdp: bool = False
    """Shard the model over the processes of a `torchrun` job (FSDP2, `qdora.fsdp`).
    `batch_size` stays the global micro-batch, split across the ranks: the run is the same run."""
    cpu_offload: bool = False
    """With `fsdp`: keep each rank's shards of the parameters, gradients and optimizer states in CPU
    memory and step the optimizer there (FSDP2 `CPUOffloadPolicy`; `qdora plan --cpu-offload`)."""

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
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.max_grad_norm < 0:
            problems.append(f"max_grad_norm={self.max_grad_norm!r} must be >= 0 (0 disables clipping)")
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
        if problems:
            raise ValueError("invalid TrainConfig:\n  - " + "\n  - ".join(problems))
        if self.method != "full":
            self.adapter_config()  # validates the adapter fields, with their own messages

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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _make_optimizer(params, cfg: TrainConfig, device: torch.device):
    if cfg.optimizer == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ValueError("optimizer='paged_adamw_8bit' needs a CUDA device; use 'adamw' on CPU")
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # fused: one kernel over all tensors (on CPU 3.5x faster than the per-tensor loop for SmolLM2's
    # 450 adapter tensors; results differ from the loop only by fp32 rounding order). Sharded
    # (FSDP) parameters keep torch's default.
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=True if device.type in ("cpu", "cuda") and not cfg.fsdp else None)


# ---- checkpoints -----------------------------------------------------------------------------

def _optimizer_tensors(optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state dict into named tensors (by parameter name) plus JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{names[idx]}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{names[idx]}::{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _load_optimizer(optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor], meta: dict) -> None:
    by_name = {name: idx for idx, name in names.items()}
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, _, field_name = key.rpartition("::")
        state.setdefault(by_name[name], {})[field_name] = value
    groups = optimizer.state_dict()["param_groups"]
    for g, saved in zip(groups, meta["param_groups"]):
        g.update({k: v for k, v in saved.items() if k != "params"})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_states() -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    return rng


def _set_rng_states(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])


def _run_state(step: int, cfg: TrainConfig) -> dict:
    return {"step": step, "python_random": _jsonable(random.getstate()),
            "scheduler": {"schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps, "lr": cfg.lr,
                          "max_steps": cfg.max_steps, "next_lr": lr_at(step, cfg)}}


def save_checkpoint(out: Path, model, optimizer, names: dict[int, str], step: int, cfg: TrainConfig) -> Path:
    """Write `out/checkpoint` atomically: a new folder is completed, then swapped in. A sharded
    model (`cfg.fsdp`) writes a sharded checkpoint from every rank (`qdora.fsdp`)."""
    final = out / CHECKPOINT
    if cfg.fsdp:
        from qdora.fsdp import save_sharded_checkpoint
        save_sharded_checkpoint(final, model, optimizer, _run_state(step, cfg), _rng_states())
        return final
    with atomic_dir(final) as tmp:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file_atomic(trainable, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(optimizer, names)
        save_file_atomic(opt_tensors, tmp / "optimizer.safetensors")
        save_file_atomic(_rng_states(), tmp / "rng.safetensors")
        state = {**_run_state(step, cfg), "optimizer": opt_meta}
        write_text_atomic(tmp / "state.json", json.dumps(state, indent=1) + "\n")
    return final


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def find_checkpoint(out: Path) -> Path | None:
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):  # .old: a crash between the two renames
        if (out / name / "state.json").is_file():
            return out / name
    return None


def load_checkpoint(path: Path, model, optimizer, names: dict[int, str]) -> int:
    from safetensors.torch import load_file
    state = json.loads((path / "state.json").read_text())
    if state.get("sharded"):
        from qdora.fsdp import launched_distributed, load_sharded_checkpoint
        if not launched_distributed():
            raise ValueError(f"{path} is a sharded checkpoint of a --fsdp run; resume it with --fsdp under torchrun")
        rng = load_sharded_checkpoint(path, model, optimizer)
        if rng is not None:
            _set_rng_states(rng)
        random.setstate(_tupled(state["python_random"]))
        return int(state["step"])
    trainable = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in trainable)
    unknown = sorted(n for n in trainable if n not in params)
    if missing or unknown:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unknown {unknown[:3]})")
    with torch.no_grad():
        for n, t in trainable.items():
            params[n].copy_(t)
    _load_optimizer(optimizer, names, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    _set_rng_states(load_file(str(path / "rng.safetensors")))
    random.setstate(_tupled(state["python_random"]))
    return int(state["step"])


# ---- the loop ------------------------------------------------------------------------------

class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps (the step in flight completes)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nqdora train: got {signal.Signals(signum).name}; finishing this step and writing a checkpoint",
              flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _save_final(model, tokenizer, path: Path, cfg: TrainConfig, build) -> None:
    """The trained result: the whole model for `full`, else the adapter (ours, or a PEFT peer's).
    A sharded model's adapter is gathered and written by rank 0 (every rank calls this)."""
    from qdora.adapter_io import save_adapter
    if cfg.fsdp:
        from qdora.fsdp import save_adapter_gathered
        save_adapter_gathered(model, path, base_model_name_or_path=str(cfg.model))
    elif cfg.method == "full":
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    elif build is not None and hasattr(model, "peft_config"):
        model.save_pretrained(path)
    else:
        save_adapter(model, path, base_model_name_or_path=str(cfg.model))


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None,
          build: Callable[[TrainConfig, torch.device], tuple] | None = None) -> dict:
    """Run (or resume) a fine-tuning run. Returns a summary dict; `summary['interrupted']` is the
    signal number if a signal stopped it. `on_step(step, metrics)` is called after each step.
    `build(cfg, device) -> (model, tokenizer)` replaces the model setup (e.g. a PEFT peer on the
    same quantized base); by default `qdora.load_model` with the config's method and adapters."""
    from tqdm.auto import tqdm

    from qdora.data import (IGNORE_INDEX, SFTDataset, batch_order, collate, count_supervised, load_records,
                            pad_token_id)
    from qdora.loading import load_model

    out = Path(cfg.out)
    existing = find_checkpoint(out) if out.exists() else None
    if existing and not cfg.resume:
        raise FileExistsError(f"{out} already holds a checkpoint ({existing}); pass --resume to continue it "
                              "or choose another --out")
    if cfg.resume and existing:
        saved = json.loads((out / "train_config.json").read_text())
        now = cfg.to_dict()
        defaults = TrainConfig(model="", data="", out="").to_dict()  # fields newer than the saved run
        changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k, defaults[k]) != now[k])
        if changed:
            raise ValueError(f"--resume with different settings than the run in {out}: "
                             + ", ".join(f"{k}: {saved.get(k, defaults[k])!r} -> {now[k]!r}" for k in changed))
    if cfg.fsdp and build is not None:
        raise ValueError("fsdp=True builds the sharded model itself; a custom `build` is not supported with it")
    # Everything that can fail on bad input fails here, before anything is written.
    records = load_records(cfg.data)
    rank, world = 0, 1
    if cfg.fsdp:
        from qdora import fsdp
        device = fsdp.init_process_group(cpu_offload=cfg.cpu_offload)
        rank, world = fsdp.rank(), fsdp.world_size()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    main = rank == 0
    _seed_all(cfg.seed)
    adapter_cfg = cfg.adapter_config() if cfg.method != "full" else AdapterConfig(method="full")
    if cfg.fsdp:
        if adapter_cfg.quantized and fsdp.mixed_precision(device).param_dtype is not None:
            # FSDP casts what it all-gathers to bf16: the packed NF4 bytes must already be bf16.
            adapter_cfg = adapter_cfg.replace(quant_storage="bfloat16")
        model, tokenizer = fsdp.build_sharded(cfg.model, adapter_cfg, device, cpu_offload=cfg.cpu_offload,
                                              progress=cfg.progress)
        if not main:  # dropout masks differ between ranks; rank 0's stream is the single-process one
            torch.manual_seed(cfg.seed + rank)
    elif build is None:
        model, tokenizer = load_model(cfg.model, method=cfg.method, cfg=adapter_cfg, device=device,
                                      progress=cfg.progress)
    else:
        model, tokenizer = build(cfg, device)
    if tokenizer is None:
        raise ValueError(f"{cfg.model}: no tokenizer found next to the model; training needs one")
    dataset = SFTDataset(records, tokenizer, cfg.cutoff_len, cfg.train_on_prompt)
    keep = [i for i, ex in enumerate(dataset.examples) if count_supervised(ex["labels"]) > 0]
    if not keep:
        raise ValueError(f"{cfg.data}: no example has a response token within cutoff_len={cfg.cutoff_len}")
    if len(keep) < len(dataset.examples) and cfg.progress and main:
        print(f"note: {len(dataset.examples) - len(keep)} example(s) have no response token within "
              f"cutoff_len={cfg.cutoff_len} and are skipped")
    examples = [dataset.examples[i] for i in keep]
    pad = pad_token_id(tokenizer)

    prepare_for_training(model, cfg.gradient_checkpointing)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {i: n for i, (n, _) in enumerate(params)}
    optimizer = _make_optimizer([p for _, p in params], cfg, device)

    if main:
        out.mkdir(parents=True, exist_ok=True)
    start = 0
    metrics_path = out / "metrics.jsonl"
    if cfg.resume and existing:
        start = load_checkpoint(existing, model, optimizer, names)
        if metrics_path.exists() and main:  # keep the curve up to the checkpoint, drop what came after it
            lines = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
            write_text_atomic(metrics_path, "".join(line + "\n" for line in lines))
    elif main:
        write_text_atomic(out / "train_config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
        if metrics_path.exists():
            metrics_path.unlink()
    if cfg.fsdp:
        torch.distributed.barrier()  # the folder and its files exist before any rank writes into it

    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    orders: dict[int, list[list[int]]] = {}

    def micro_batch(index: int) -> tuple[dict[str, torch.Tensor], int, int]:
        """This rank's part of global micro-batch `index` (all of it in a single process), the
        number of supervised (shifted) labels in the whole micro-batch, and its token count."""
        epoch, pos = divmod(index, per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = batch_order(len(examples), cfg.batch_size, cfg.seed, epoch)
        ids = orders[epoch][pos]
        supervised = sum(count_supervised(examples[i]["labels"][1:]) for i in ids)
        tokens = sum(len(examples[i]["input_ids"]) for i in ids)
        local = ids[rank * len(ids) // world:(rank + 1) * len(ids) // world]
        if not local:  # a short last batch: run one example with no label, so collectives still match
            batch = collate([examples[ids[0]]], pad)
            batch["labels"].fill_(IGNORE_INDEX)
        else:
            batch = collate([examples[i] for i in local], pad)
        return {k: v.to(device) for k, v in batch.items()}, supervised, tokens

    def loss_of(batch: dict, supervised: int) -> torch.Tensor:
        """Token-mean loss of the global micro-batch. Sharded: this rank's sum over its tokens
        divided by the global count, times the world size (FSDP averages gradients over ranks),
        so the reduced gradient is that of the single-process loss."""
        if not cfg.fsdp:
            return model(**batch).loss
        return model(**batch, num_items_in_batch=max(1, supervised)).loss * world

    summary = {"steps": start, "interrupted": None, "out": str(out)}
    bar = tqdm(total=cfg.max_steps, initial=start, desc=f"train {cfg.method}", unit="step",
               disable=None if (cfg.progress and main) else True)
    t_start, tokens_total = time.perf_counter(), 0
    step = start
    stopped: int | None = None
    with _StopRequest() as stop, open(metrics_path, "a") if main else contextlib.nullcontext() as metrics_file:
        while step < cfg.max_steps and stopped is None:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch, supervised, batch_tokens = micro_batch(step * cfg.grad_accum + micro)
                loss = loss_of(batch, supervised) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.item() / world
                tokens += batch_tokens
            grad_norm = (_clip_grad_norm([p for _, p in params], cfg.max_grad_norm, foreach=not cfg.fsdp)
                         if cfg.max_grad_norm > 0 else float("nan"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.fsdp:  # the loss of the whole global batch
                loss_sum, = fsdp.all_reduce([loss_sum], device)
            step += 1
            elapsed = time.perf_counter() - t0
            tokens_total += tokens
            record = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                      "tokens_per_s": tokens / elapsed, "step_s": elapsed}
            if main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
            if on_step is not None:
                on_step(step, record)
            stopped = stop.signal
            if cfg.fsdp:  # a signal may reach only some ranks: all stop after the same step
                flag, = fsdp.all_reduce([float(stop.signal or 0)], device, op="max")
                stopped = stop.signal or (int(flag) if flag else None)
            if cfg.keep_adapters_every and step % cfg.keep_adapters_every == 0 and step < cfg.max_steps:
                _save_final(model, tokenizer, out / f"adapter-step{step}", cfg, build)
            if step % cfg.save_every == 0 or step == cfg.max_steps or stopped is not None:
                if main:
                    metrics_file.flush()
                save_checkpoint(out, model, optimizer, names, step, cfg)
        bar.close()
        summary.update(steps=step, interrupted=stopped,
                       seconds=time.perf_counter() - t_start, tokens=tokens_total)
    if step == cfg.max_steps:
        _save_final(model, tokenizer, out / ("model" if cfg.method == "full" else "adapter"), cfg, build)
    summary["model"], summary["tokenizer"] = model, tokenizer
    return summary


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


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float, foreach: bool = False) -> float:
    """Clip the global gradient norm; returns the norm before clipping. For sharded parameters the
    norm torch computes is a distributed tensor over the ranks' shards: its full value is taken.
    `foreach`: one kernel over all tensors (plain tensors; torch's default loops on CPU)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True if foreach else None)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.item()


def read_metrics(out: str | os.PathLike) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


__all__ = ["TrainConfig", "train", "lr_at", "read_metrics", "save_checkpoint", "load_checkpoint"]
