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

from qdora.data.chat import tokenize_chat
from qdora.data.examples import Record, pad_token_id
from qdora.data.records import parse_record

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


@dataclass(frozen=True)
class Choice:
    """A multiple-choice item: the question, its options' texts, and the index of the correct one."""

    question: str
    options: tuple[str, ...]
    answer: int
    source: str = ""


_OPTION = re.compile(r"Answer(\d+):\s*")


def llm_adapters_choice(obj: dict, source: str = "") -> Choice:
    """The question, options and answer of an LLM-Adapters multiple-choice record (ARC, OpenBookQA:
    `instruction` = "Please choose the correct answer to the question: Q\\n\\nAnswer1: ... Answer4:
    ...\\n\\nAnswer format: ...", `answer` = `answerN`)."""
    try:
        body = obj["instruction"].split("to the question:", 1)[1].split("\n\nAnswer format:")[0]
        question, listed = body.split("\n\n", 1)
        parts = _OPTION.split(listed.strip())
        options = tuple(parts[i + 1].strip() for i in range(1, len(parts) - 1, 2))
        answer = int(str(obj["answer"]).removeprefix("answer")) - 1
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise ValueError(f"{source}: not an LLM-Adapters multiple-choice record ({err})") from None
    if not options or not 0 <= answer < len(options):
        raise ValueError(f"{source}: not an LLM-Adapters multiple-choice record (answer {obj.get('answer')!r})")
    return Choice(question.strip(), options, answer, source)


def choice_chat(item: Choice, option: int | None = None) -> dict:
    """A chat record for `item`: the question from the user, option `option` (default: the
    correct one) as the assistant's reply."""
    reply = item.options[item.answer if option is None else option]
    return {"messages": [{"role": "user", "content": item.question}, {"role": "assistant", "content": reply}]}


def choice_pair(item: Choice) -> dict:
    """A preference pair for `item` (chat format): the question from the user, the correct option's text as
    the chosen reply, the option after it (cyclically) as the rejected one."""
    wrong = (item.answer + 1) % len(item.options)
    return {"prompt": [{"role": "user", "content": item.question}],
            "chosen": [{"role": "assistant", "content": item.options[item.answer]}],
            "rejected": [{"role": "assistant", "content": item.options[wrong]}]}


@dataclass
class ChoiceScores:
    predictions: list[int]
    """The option each item's model picks."""
    answer_nll: float
    """Mean negative log-likelihood per token of the correct replies (end-of-turn tokens included)."""
    answer_logp: list[float]
    """Per item: the summed log-likelihood of its correct reply's tokens (`answer_nll` is
    `-sum(answer_logp) / sum(answer_tokens)`), for paired comparisons item by item."""
    answer_tokens: list[int]
    """Per item: how many tokens its correct reply has."""


@torch.no_grad()
def score_chat_choices(model, tokenizer, items: list[Choice], batch_size: int = 16) -> ChoiceScores:
    """The option each item's model picks: every option is rendered as the assistant's reply with
    the tokenizer's chat template and tokenized exactly as `qdora train` tokenizes a chat; its score
    is the log-likelihood of the reply's tokens per character of the option (length-normalized, as
    lm-evaluation-harness' `acc_norm`), its end-of-turn token left out when that is the EOS token
    (it scores the stop, not the option). `answer_nll` counts every trained token of the correct
    replies, the end-of-turn token too."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    try:
        seqs, owners = [], []
        for k, item in enumerate(items):
            for o in range(len(item.options)):
                ex = tokenize_chat(tokenizer, parse_record(choice_chat(item, o), item.source), cutoff_len=1 << 30)
                seqs.append(ex)
                owners.append((k, o))
        scores = [[-float("inf")] * len(item.options) for item in items]
        gold_logp, gold_tokens = [0.0] * len(items), [0] * len(items)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]["input_ids"]))  # less padding
        for start in range(0, len(order), batch_size):
            chunk = [seqs[i] for i in order[start:start + batch_size]]
            width = max(len(ex["input_ids"]) for ex in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, ex in enumerate(chunk):
                n = len(ex["input_ids"])
                ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"]), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = F.log_softmax(logits[:, :-1], dim=-1)
            targets = labels[:, 1:].to(device)
            token_logp = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
            counts = (targets != -100).sum(-1).tolist()
            for i, j in enumerate(order[start:start + batch_size]):
                k, o = owners[j]
                total = token_logp[i].sum().item()
                supervised = (targets[i] != -100).nonzero()[:, 0]
                last = supervised[-1].item()
                # the option's score leaves out its end-of-turn token when that is the EOS token
                end = token_logp[i, last].item() if targets[i, last].item() == tokenizer.eos_token_id else 0.0
                scores[k][o] = (total - end) / max(1, len(items[k].options[o]))
                if o == items[k].answer:
                    gold_logp[k], gold_tokens[k] = total, counts[i]
        return ChoiceScores([max(range(len(s)), key=s.__getitem__) for s in scores],
                            -sum(gold_logp) / max(1, sum(gold_tokens)), gold_logp, gold_tokens)
    finally:
        model.train(was_training)


@dataclass
class Paired:
    """Accuracy before and after on the same items, and the paired difference's uncertainty."""

    before: float
    after: float
    n: int
    improved: int
    """Items wrong before and right after."""
    worsened: int
    ci95: tuple[float, float]
    """Percentile bootstrap interval of the difference (items resampled, 10,000 times)."""
    p_value: float
    """Exact two-sided McNemar test on the items that changed."""

    @property
    def difference(self) -> float:
        return self.after - self.before


def paired_accuracy(before: list[bool], after: list[bool], resamples: int = 10_000, seed: int = 0) -> Paired:
    """`Paired` for per-item correctness before and after (the same items, in the same order)."""
    from scipy import stats  # heavy, used here only

    if len(before) != len(after) or not before:
        raise ValueError(f"paired_accuracy needs two equal, non-empty lists (got {len(before)} and {len(after)})")
    diff = torch.tensor([float(a) - float(b) for a, b in zip(after, before)], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = diff[torch.randint(len(diff), (resamples, len(diff)), generator=g)].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    improved, worsened = int((diff > 0).sum()), int((diff < 0).sum())
    changed = improved + worsened
    p = stats.binomtest(min(improved, worsened), changed, 0.5).pvalue if changed else 1.0
    return Paired(sum(before) / len(before), sum(after) / len(after), len(before), improved, worsened,
                  (low, high), float(p))


@dataclass
class PairedNLL:
    """The token-mean answer NLL of two models on the same items, and the difference's uncertainty."""

    a: float
    b: float
    n: int
    ci95: tuple[float, float]
    """Percentile bootstrap interval of `b − a` (items resampled, both models alike, 10,000 times)."""

    @property
    def difference(self) -> float:
        return self.b - self.a


def paired_nll(logp_a: list[float], tokens_a: list[int], logp_b: list[float], tokens_b: list[int],
               resamples: int = 10_000, seed: int = 0) -> PairedNLL:
    """`PairedNLL` from per-item summed log-likelihoods and token counts of the correct answers
    (`ChoiceScores.answer_logp`, `answer_tokens`); each model's NLL is `-sum(logp) / sum(tokens)`
    over the (resampled) items."""
    if not (len(logp_a) == len(tokens_a) == len(logp_b) == len(tokens_b)) or not logp_a:
        raise ValueError(f"paired_nll needs four equal, non-empty lists (got {len(logp_a)}, {len(tokens_a)}, "
                         f"{len(logp_b)} and {len(tokens_b)})")
    if list(tokens_a) != list(tokens_b):
        raise ValueError("paired_nll: the two models' answers have different token counts; the items must be "
                         "the same, tokenized by the same tokenizer")
    la, lb = torch.tensor(logp_a, dtype=torch.float64), torch.tensor(logp_b, dtype=torch.float64)
    tokens = torch.tensor(tokens_a, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(la), (resamples, len(la)), generator=g)
    n = tokens[idx].sum(1)
    diffs = (la[idx].sum(1) - lb[idx].sum(1)) / n  # (-lb) - (-la)
    low, high = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    total = tokens.sum().item()
    return PairedNLL(-la.sum().item() / total, -lb.sum().item() / total, len(la), (low, high))
