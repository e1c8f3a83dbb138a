import pytest
import torch
from models import build, llama3_config, save_bpe_tokenizer

from qdora.data import DEMO_DATA, Record, load_records, tokenize_record
from qdora.scoring import answer_options, continuation_logprobs, score_multiple_choice


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
