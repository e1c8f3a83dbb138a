import pytest
import torch
from models import build, llama3_config, save_bpe_tokenizer

from qdora.data.examples import DEMO_DATA, Record, load_records, tokenize_record
from qdora.data.scoring import answer_options, continuation_logprobs, score_multiple_choice


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm")
    records = load_records(DEMO_DATA / "arc_easy_test.json")[:6]
    tok = save_bpe_tokenizer(path, [r.prompt + r.response for r in records])
    model = build(llama3_config(vocab_size=512, max_position_embeddings=512))
    return model, tok, records


def test_logprob_matches_transformers_own_loss(lm):
    model, tok, records = lm
    rec = records[0]
    (lp, n), = continuation_logprobs(model, tok, [(rec.prompt, rec.response)], add_eos=True)
    ex = tokenize_record(tok, rec, cutoff_len=10_000)  # the training tokenization: prompt masked
    ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss  # mean NLL over the supervised tokens
    supervised = int((labels != -100).sum())
    assert n == supervised
    assert lp == pytest.approx(-loss.item() * supervised, rel=1e-5)


def test_batching_and_padding_do_not_change_scores(lm):
    model, tok, records = lm
    pairs = [(r.prompt, r.response) for r in records]
    one = continuation_logprobs(model, tok, pairs, batch_size=1)
    many = continuation_logprobs(model, tok, pairs, batch_size=4)
    for (a, n1), (b, n2) in zip(one, many):
        assert n1 == n2 and a == pytest.approx(b, rel=1e-4, abs=1e-4)


def test_answer_options_and_scores(lm):
    model, tok, records = lm
    assert answer_options(records[0]) == ["answer1", "answer2", "answer3", "answer4"]
    boolq = Record(prompt="### Instruction:\nIs it?\n\nAnswer format: true/false\n\n### Response:\n",
                   response="the correct answer is true", label="true")
    assert answer_options(boolq) == ["true", "false"]
    scores = score_multiple_choice(model, tok, records)
    assert scores.items == 6 and 0.0 <= scores.accuracy <= 1.0 and len(scores.predictions) == 6
    assert all(p in answer_options(r) for p, r in zip(scores.predictions, records))
    expected_nll = []
    for r in records:
        (lp, n), = continuation_logprobs(model, tok, [(r.prompt, r.response)], add_eos=True)
        expected_nll.append((lp, n))
    assert scores.answer_nll == pytest.approx(-sum(a for a, _ in expected_nll) / sum(n for _, n in expected_nll))
    with pytest.raises(ValueError, match="not a multiple-choice record"):
        score_multiple_choice(model, tok, [Record(prompt="p", response="r")])


def test_llm_adapters_choices_parse():
    import json

    from qdora.data.scoring import llm_adapters_choice
    rows = json.loads((DEMO_DATA / "arc_easy_test.json").read_text())
    items = [llm_adapters_choice(obj, f"item {i}") for i, obj in enumerate(rows)]
    assert items[0].question.startswith("Which statement best explains why photosynthesis")
    assert items[0].options[0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert items[0].answer == 0
    assert sorted({len(i.options) for i in items}) == [3, 4]  # one item has three options
    for item, obj in zip(items, rows):  # every option's text is in the record, in order
        positions = [obj["instruction"].index(f"Answer{k + 1}: {o}") for k, o in enumerate(item.options)]
        assert positions == sorted(positions)
    with pytest.raises(ValueError, match="item 9: not an LLM-Adapters multiple-choice record"):
        llm_adapters_choice({"instruction": "Say hi", "answer": "answer1"}, "item 9")


def test_chat_choice_scores_against_the_models_own_loss(lm):
    """Each option's score is its reply's log-likelihood per character, the reply tokenized as a
    chat is trained: recomputed here with transformers' loss on the template's own rendering."""
    from models import chatml_tokenizer

    from qdora.data.scoring import Choice, score_chat_choices
    model = lm[0]
    tok = chatml_tokenizer(["Which is a fruit? apple a stone the idea of blue", "What color is the sky? blue green",
                            "user assistant"])
    items = [Choice("Which is a fruit?", ("apple", "a stone", "the idea of blue"), 0),
             Choice("What color is the sky?", ("blue", "green"), 0)]
    got = score_chat_choices(model, tok, items, batch_size=3)
    expected, gold = [], []
    for item in items:
        per_option = []
        for k, option in enumerate(item.options):
            messages = [{"role": "user", "content": item.question}, {"role": "assistant", "content": option}]
            prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(messages, tokenize=False).rstrip()
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(full, add_special_tokens=False)["input_ids"]
            assert ids[:len(p_ids)] == p_ids
            labels = [-100] * len(p_ids) + ids[len(p_ids):]
            with torch.no_grad():
                loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
            n = len(ids) - len(p_ids)
            assert ids[-1] == tok.eos_token_id  # <|im_end|>: the stop, left out of the option's score
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -2].double()
            end = torch.log_softmax(logits, -1)[ids[-1]].item()
            per_option.append((-loss * n - end) / len(option))
            if k == item.answer:
                gold.append((-loss * n, n))
        expected.append(max(range(len(per_option)), key=per_option.__getitem__))
    assert got.predictions == expected
    assert got.answer_nll == pytest.approx(-sum(a for a, _ in gold) / sum(n for _, n in gold), rel=1e-5)


def test_paired_accuracy_interval_and_exact_test():
    from scipy import stats

    from qdora.data.scoring import paired_accuracy
    before = [True] * 30 + [False] * 70
    after = [True] * 25 + [False] * 5 + [True] * 20 + [False] * 50  # 5 worse, 20 better
    p = paired_accuracy(before, after)
    assert (p.before, p.after, p.improved, p.worsened, p.n) == (0.30, 0.45, 20, 5, 100)
    assert p.difference == pytest.approx(0.15)
    assert p.p_value == pytest.approx(2 * stats.binom.cdf(5, 25, 0.5))  # exact McNemar, two-sided
    # the bootstrap interval is about the normal one for a paired difference of proportions
    se = ((20 + 5) / 100 - 0.15 ** 2) ** 0.5 / 100 ** 0.5
    assert p.ci95[0] == pytest.approx(0.15 - 1.96 * se, abs=0.02) and p.ci95[1] == pytest.approx(0.15 + 1.96 * se,
                                                                                                   abs=0.02)
    with pytest.raises(ValueError, match="two equal, non-empty lists"):
        paired_accuracy([True], [True, False])
