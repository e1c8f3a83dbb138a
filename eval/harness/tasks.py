"""The held-out tasks of `qdora eval`: their test files (bundled, or an LLM-Adapters data folder)
and every figure the harness reports for a model on them."""

from __future__ import annotations

import math
from pathlib import Path

from qdora.data.examples import DEMO_DATA, Record, load_records
from qdora.data.scoring import (
    Choice,
    continuation_logprobs,
    llm_adapters_choice,
    score_chat_choices,
    score_multiple_choice,
)
from qdora.eval.harness.answers import generation_accuracy, math_accuracy

TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
         "gsm8k")


def test_records(task: str, data_dir: str | None, items: int) -> list[Record]:
    if data_dir is None:
        bundled = {"ARC-Easy": "arc_easy_test.json", "gsm8k": "gsm8k_test.jsonl"}
        if task not in bundled:
            raise ValueError(f"task {task!r} needs --data-dir (a folder with <task>/test.json); only "
                             f"{' and '.join(bundled)} are bundled")
        path = DEMO_DATA / bundled[task]
    else:
        path = Path(data_dir) / task / ("test.jsonl" if task == "gsm8k" else "test.json")
    return load_records(path)[:items]


def record_choice(record: Record) -> Choice:
    """The question and options of an LLM-Adapters multiple-choice record (as `load_records` read it)."""
    instruction = record.prompt.split("### Instruction:\n", 1)[-1].split("\n\n### Response:")[0]
    return llm_adapters_choice({"instruction": instruction, "answer": record.label}, record.source)


def score_tasks(model, tok, tests: dict[str, list[Record]], generate: bool = False,
                math_max_new_tokens: int = 256, chat: bool = False) -> dict:
    """Every held-out task's figures for `model` as it is now. `chat`: multiple-choice items are
    scored as `qdora demo` scores them (each option's text as the chat reply, per character;
    `acc_loglik`), with the NLL of the correct reply (`answer_nll`)."""
    out = {}
    for task, records in tests.items():
        if chat and task != "gsm8k":
            items = [record_choice(r) for r in records]
            scores = score_chat_choices(model, tok, items)
            accuracy = sum(p == i.answer for p, i in zip(scores.predictions, items)) / len(items)
            out[task] = {"items": len(items), "acc_loglik": accuracy, "answer_nll": scores.answer_nll,
                         "answer_ppl": math.exp(scores.answer_nll), "predictions": scores.predictions,
                         "answers": [i.answer for i in items], "answer_logp": scores.answer_logp,
                         "answer_tokens": scores.answer_tokens}
            continue
        if task == "gsm8k":  # not multiple choice: exact match of the final number, and answer NLL
            nll = continuation_logprobs(model, tok, [(r.prompt, r.response) for r in records], add_eos=True)
            answer_nll = -sum(lp for lp, _ in nll) / sum(n for _, n in nll)
            entry = {"items": len(records), "answer_nll": answer_nll, "answer_ppl": math.exp(answer_nll)}
            if generate:
                entry["acc_generate"] = math_accuracy(model, tok, records, math_max_new_tokens)
            out[task] = entry
            continue
        scores = score_multiple_choice(model, tok, records)
        entry = {"items": len(records), "acc_loglik": scores.accuracy, "answer_nll": scores.answer_nll,
                 "answer_ppl": math.exp(scores.answer_nll), "predictions": scores.predictions}
        if generate:
            entry["acc_generate"] = generation_accuracy(model, tok, records)
        out[task] = entry
    return out
