"""Answers from generated text, scored as LLM-Adapters scores them: the first answer label found in
the output for multiple choice, the final number for math."""

from __future__ import annotations

import re

import torch

from qdora.data.examples import Record
from qdora.data.scoring import answer_options

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
    texts = greedy_answers(model, tokenizer, records, max_new_tokens)
    return sum(extract_answer(t, answer_options(r) or []) == r.label for t, r in zip(texts, records)) / len(records)
