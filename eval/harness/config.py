"""The settings of a `qdora eval` comparison (`HarnessConfig`), the methods it knows, the
`TrainConfig` of each of its runs, and whether a kept run was made with the same settings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from qdora.core.config import Problems
from qdora.eval.harness.sweep import RunKey
from qdora.train.config import TrainConfig

METHODS = {
    # name: (qdora method, extra TrainConfig fields, PEFT peer?); "half_rank" and "vera" are resolved
    # by `run_one` (DoRA†: r/2 and alpha/2; VeRA: --vera-r, --vera-lr)
    "full": ("full", {}, None),
    "lora": ("lora", {}, None),
    "dora": ("dora", {}, None),
    "qlora": ("qlora", {}, None),
    "qdora": ("qdora", {}, None),
    "dora-half": ("dora", {"half_rank": True}, None),
    "qdora-magonly": ("qdora", {"target_modules": ("q_proj", "k_proj", "v_proj"),
                                "magnitude_only_modules": ("o_proj", "gate_proj", "up_proj", "down_proj")}, None),
    "dora-vera": ("dora", {"vera": True}, None),
    "qdora-vera": ("qdora", {"vera": True}, None),
    "peft-qdora": ("qdora", {}, True),
    "peft-qlora": ("qlora", {}, False),
}


@dataclass(frozen=True)
class HarnessConfig:
    model: str
    train_data: str
    out: str
    methods: tuple[str, ...] = ("full", "qlora", "qdora", "qdora-vera")
    tasks: tuple[str, ...] = ("gsm8k",)
    data_dir: str | None = None
    """Folder with `<task>/test.json` (LLM-Adapters layout) and `gsm8k/test.jsonl`; default: the bundled
    ARC-Easy and GSM8K slices (100 test items each)."""
    seeds: int = 3
    max_steps: int = 20
    batch_size: int = 2
    lr: float = 5e-4
    """Learning rate of the adapter methods (LoRA/DoRA families and PEFT's)."""
    full_lr: float = 5e-5
    """Learning rate of `full` (every weight moves: a tenth of the adapters' rate)."""
    vera_lr: float = 5e-3
    """Learning rate of the VeRA-direction methods (only scaling vectors train: ten times the adapters')."""
    vera_r: int = 256
    """Rank of VeRA's shared projections (VeRA's parameters per layer are r + out, so its r is large)."""
    isolate: bool = True
    """Run each (method, seed) in a fresh subprocess, so peak memory is per run and nothing leaks across."""
    analyze: bool = True
    """Keep seed 0's checkpoints at 1/3, 2/3 and the end of training (every `eval_every` steps with
    `eval_every`), and compute ΔM/ΔD of their q_proj
    and v_proj weights (`qdora analyze`): `delta_md.csv`, `delta_md.png`, slopes in `results.json`."""
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    cutoff_len: int = 256
    eval_items: int = 50
    warmup_steps: int | None = None
    """Default: a tenth of max_steps."""
    generate: bool = False
    """Also score by generation + answer extraction (LLM-Adapters' way; slow on CPU, `--generate`)."""
    math_max_new_tokens: int = 256
    """Generation length for GSM8K solutions."""
    eval_every: int = 0
    """Also score the held-out tasks every this many steps during training (a learning curve per run,
    `curve` in results.json; 0: at the end only)."""
    chat: bool = False
    """Train on the multiple-choice training records as chat (the question from the user, the correct
    option's text as the reply, the model's chat template) and score each option's text as the reply,
    per character, as `qdora demo` does: the scoring that separates at small scale."""
    resume: bool = False
    """Keep the runs a previous invocation with the same --out finished (their rows in runs/), if
    they were made with the same settings; continue an interrupted run from its last checkpoint
    (written every `eval_every` steps, or a sixth of the run, and on Ctrl-C); run the rest."""
    r_sweep: tuple[int, ...] = ()
    """A rank sweep (`--r 2,4,8`): every method at each of these ranks (needs `alpha_per_r`)."""
    lr_sweep: tuple[float, ...] = ()
    """A learning-rate sweep (`--lr 1e-4,3e-4`): every method at each of these rates."""
    alpha_per_r: float | None = None
    """`--alpha 2r`: each run's alpha is this times its rank (the scale alpha/r the same at every rank)."""

    objective: str = "sft"
    """sft; dpo or simpo: train on preference pairs made from the multiple-choice training records (the correct
    option chosen, another rejected; needs `chat`), report the held-out pairs' reward accuracy and margin
    (pairs made from the first task's test items) beside the task's scores."""
    beta: float = 0.1
    """dpo, simpo: β."""

    @property
    def sweep(self) -> bool:
        return bool(self.r_sweep or self.lr_sweep)

    def __post_init__(self):
        p = Problems("eval setting")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            p.add(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
        for name in ("seeds", "max_steps", "batch_size", "eval_items", "r", "cutoff_len"):
            p.positive_int(name, getattr(self, name))
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            p.add(f"eval_every={self.eval_every!r} must be an integer >= 0 (0: at the end only)")
        for name in ("lr", "full_lr", "vera_lr"):
            p.number(name, getattr(self, name), hint="learning rates must be positive")
        for rank in self.r_sweep:
            p.positive_int("r_sweep", rank)
        for rate in self.lr_sweep:
            p.number("lr_sweep", rate, hint="learning rates must be positive")
        if self.alpha_per_r is not None:
            p.number("alpha_per_r", self.alpha_per_r, hint="e.g. --alpha 2r")
        if self.r_sweep and self.alpha_per_r is None:
            p.add(f"a rank sweep (r {list(self.r_sweep)}) needs alpha as a multiple of r, e.g. --alpha 2r, so "
                  "that the scale alpha/r is the same at every rank")
        if p.choice("objective", self.objective, ("sft", "dpo", "simpo")) and self.objective != "sft":
            if not self.chat:
                p.add(f"objective={self.objective!r} makes its pairs from multiple-choice records: add --chat "
                      "(and --tasks ARC-Easy or another multiple-choice task)")
            if "gsm8k" in self.tasks:
                p.add(f"objective={self.objective!r} needs multiple-choice tasks (the held-out pairs come from them), "
                      "not gsm8k")
            p.number("beta", self.beta, hint="typical: DPO 0.1")
        unswept = [m for m in self.methods if m in METHODS and METHODS[m][0] == "full" or METHODS[m][1].get("vera")]
        if self.sweep and unswept:
            p.add(f"{unswept} cannot be swept over rank or learning rate (full has no rank and its own --full-lr; "
                  "*-vera have --vera-r and --vera-lr); sweep the LoRA/DoRA methods only")
        p.raise_if_any()


PAIRS_FILE, VAL_PAIRS_FILE = "train_pairs.jsonl", "val_pairs.jsonl"
"""A preference comparison's pairs: from the training records, and held out from the first task's test items."""


def run_config(hc: HarnessConfig, key: RunKey, resume: bool = False) -> tuple[TrainConfig, bool | None]:
    """The `TrainConfig` of run `key` (and its PEFT peer: None, or whether it is PEFT's DoRA)."""
    base_method, extra, peer = METHODS[key.method]
    extra = dict(extra)
    r = hc.r if key.r is None else key.r
    alpha = hc.alpha if hc.alpha_per_r is None else hc.alpha_per_r * r
    lr = key.lr if key.lr is not None else hc.full_lr if base_method == "full" else hc.lr
    if extra.pop("half_rank", False):
        r, alpha = max(1, r // 2), alpha / 2
    if extra.pop("vera", False):
        r, lr, extra["direction"] = hc.vera_r, hc.vera_lr, "vera"
    data = str(Path(hc.out) / "train_chat.jsonl") if hc.chat else hc.train_data
    preference = {}
    if hc.objective != "sft":
        data = str(Path(hc.out) / PAIRS_FILE)
        preference = dict(objective=hc.objective, beta=hc.beta, val_data=str(Path(hc.out) / VAL_PAIRS_FILE))
    analyzed = key.seed == 0 and hc.analyze and not hc.sweep
    cfg = TrainConfig(model=hc.model, data=data, out=str(Path(hc.out) / "runs" / key.name), method=base_method,
                      r=r, alpha=alpha, dropout=hc.dropout, lr=lr, max_steps=hc.max_steps, batch_size=hc.batch_size,
                      cutoff_len=hc.cutoff_len, seed=key.seed,
                      warmup_steps=hc.warmup_steps if hc.warmup_steps is not None else max(1, hc.max_steps // 10),
                      # a checkpoint at every point of the learning curve (or every sixth of the run), so
                      # that an interrupted run resumes where its curve stops
                      save_every=hc.eval_every or max(1, hc.max_steps // 6), progress=False, resume=resume,
                      # intermediate checkpoints for the ΔM/ΔD analysis: seed 0 only (a full model is large)
                      # (every eval_every steps when there is a learning curve)
                      keep_adapters_every=(hc.eval_every or max(1, hc.max_steps // 3)) if analyzed else 0,
                      **preference, **extra)
    return cfg, peer


# What makes two runs of the same name the same: their training (the data by content, not by
# path), except where it is written and how often it is saved, and how they are scored.
_SCORING = ("tasks", "data_dir", "eval_items", "eval_every", "generate", "math_max_new_tokens", "chat")
_NOT_COMPARED = ("out", "data", "resume", "save_every", "keep_adapters_every", "progress")


def data_digest(path: str | Path) -> str:
    """SHA-256 of a training file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def different_settings(spec: dict, hc: HarnessConfig, key: RunKey, digest: str | None = None) -> list[str]:
    """The settings in which the run a spec file describes differs from run `key` of `hc` (empty:
    the same run); `digest`: this invocation's `data_digest` of its training data, compared with the
    spec's. Fields the spec's version did not have take their defaults."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()
              if k in HarnessConfig.__dataclass_fields__}
    old = HarnessConfig(**fields)
    was, now = run_config(old, key)[0].to_dict(), run_config(hc, key)[0].to_dict()
    out = [f"{k}: {was.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(was) | set(now))
           if k not in _NOT_COMPARED and was.get(k) != now.get(k)]
    out += [f"{k}: {getattr(old, k)!r} then, {getattr(hc, k)!r} now" for k in _SCORING
            if getattr(old, k) != getattr(hc, k)]
    if digest and spec.get("data_sha256") and spec["data_sha256"] != digest:
        out.append(f"the training data: {hc.train_data} is not the data the run was trained on")
    return out
