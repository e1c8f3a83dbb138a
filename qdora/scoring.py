"""Scoring a causal LM on held-out items: option log-likelihood accuracy and answer NLL.

A continuation is scored as the sum of its tokens' log-probabilities given the prompt, tokenized
the way training tokenizes (prompt with the tokenizer's special tokens, continuation without),
so the scores are comparable with the training loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qdora.data import Record, pad_token_id

_ANSWER_FORMAT = re.compile(r"Answer format:\s*([A-Za-z0-9_/ ]+)\s*$")


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8,
                          add_eos: bool = False) -> list[tuple[float, int]]:
    """For each (prompt, continuation): (sum of log p(continuation tokens | prompt), token count)."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    seqs = []
    for prompt, cont in pairs:
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        c_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if add_eos and tokenizer.eos_token_id is not None:
            c_ids = c_ids + [tokenizer.eos_token_id]
        seqs.append((p_ids, c_ids))
    results: list[tuple[float, int]] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, c) in enumerate(chunk):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, :len(p) + len(c)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        targets = ids[:, 1:].to(device)
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for i, (p, c) in enumerate(chunk):
            # continuation token j sits at position len(p)+j, predicted from position len(p)+j-1
            span = token_logp[i, len(p) - 1:len(p) - 1 + len(c)]
            results.append((span.sum().item(), len(c)))
    return results


def answer_options(record: Record) -> list[str] | None:
    """The LLM-Adapters answer labels of a multiple-choice record (`answer1/answer2/...`, `true/false`)."""
    match = _ANSWER_FORMAT.search(record.prompt.split("### Response:")[0].strip().split("\n\n### Input:")[0])
    if not match:
        return None
    return [o.strip() for o in match.group(1).split("/") if o.strip()]


@dataclass
class Scores:
    accuracy: float
    """Fraction of items whose correct option has the highest log-likelihood."""
    answer_nll: float
    """Mean negative log-likelihood per token of the correct response (with EOS)."""
    items: int
    predictions: list[str]

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.answer_nll).exp())


def score_multiple_choice(model, tokenizer, records: list[Record], batch_size: int = 8) -> Scores:
    """Option log-likelihood accuracy (`the correct answer is <option>` for each option) and the
    NLL of the reference response, over LLM-Adapters-style records."""
    was_training = model.training
    model.eval()
    try:
        pairs, owners = [], []
        for idx, rec in enumerate(records):
            options = answer_options(rec)
            if not options or rec.label is None:
                raise ValueError(f"{rec.source}: not a multiple-choice record with an answer label")
            for opt in options:
                pairs.append((rec.prompt, f"the correct answer is {opt}"))
                owners.append((idx, opt))
        scores = continuation_logprobs(model, tokenizer, pairs, batch_size)
        best: dict[int, tuple[float, str]] = {}
        for (idx, opt), (lp, _) in zip(owners, scores):
            if idx not in best or lp > best[idx][0]:
                best[idx] = (lp, opt)
        predictions = [best[i][1] for i in range(len(records))]
        correct = sum(p == r.label for p, r in zip(predictions, records))
        nll = continuation_logprobs(model, tokenizer, [(r.prompt, r.response) for r in records], batch_size,
                                    add_eos=True)
        total_lp = sum(lp for lp, _ in nll)
        total_tokens = sum(n for _, n in nll)
        return Scores(accuracy=correct / len(records), answer_nll=-total_lp / total_tokens, items=len(records),
                      predictions=predictions)
    finally:
        model.train(was_training)
