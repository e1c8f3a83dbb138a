"""qdora.data.examples: record loading, prompt templates, tokenization/masking, collation, batch order."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from qdora.data.examples import (
    DEMO_DATA,
    DataError,
    Record,
    SFTDataset,
    batch_order,
    collate,
    count_supervised,
    load_records,
    pad_token_id,
    parse_record,
    tokenize_record,
)

NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
              "further context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\nTranslate to French.\n\n### Input:\ngood morning\n\n### Response:\n")

_CORPUS = [
    NO_INPUT, WITH_INPUT,
    "the correct answer is answer2", "the correct answer is true",
    "Natalia sold 48/2 = 24 clips in May. #### 72",
    "The quick brown fox jumps over the lazy dog.",
]


def _backend(bos: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer, trained offline, that adds BOS like Llama's."""
    return PreTrainedTokenizerFast(tokenizer_object=_backend(bos=True),
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(tmp_path, name: str, rows: list) -> object:
    return _write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- records and templates

def test_templates_verbatim(tmp_path):
    path = _jsonl(tmp_path, "data.jsonl", [
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Name a color.", "output": "Red."},
        {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour",
         "answer": "bonjour"},
    ])
    a, b, c = load_records(path)
    assert a.prompt == NO_INPUT and a.response == "Blue." and a.label is None
    assert b.prompt == NO_INPUT and b.response == "Red."
    assert c.prompt == WITH_INPUT and c.response == "bonjour" and c.label == "bonjour"


def test_jsonl_sources_count_blank_lines(tmp_path):
    row = json.dumps({"instruction": "i", "output": "o"})
    path = _write(tmp_path, "d.jsonl", f"\n{row}\n   \n{row}\n\n")
    records = load_records(path)
    assert [r.source for r in records] == [f"{path} line 2", f"{path} line 4"]


def test_json_array_sources_and_numeric_answer(tmp_path):
    path = _write(tmp_path, "d.json", json.dumps([
        {"instruction": "i", "input": "x", "output": "o", "answer": "answer1"},
        {"instruction": "2+2?", "input": None, "output": "4", "answer": 4},
    ]))
    first, second = load_records(path)
    assert (first.source, first.label) == (f"{path} item 1", "answer1")
    assert (second.source, second.label) == (f"{path} item 2", "4")
    assert second.prompt == NO_INPUT.replace("Name a color.", "2+2?")  # None input: no-input form


def test_gsm8k_records(tmp_path):
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = 72.\n#### 72"
    path = _jsonl(tmp_path, "gsm.jsonl", [
        {"question": "How many clips?", "answer": solution},
        {"question": "How much?", "answer": "Big number.\n#### 1,080"},
        {"question": "Negative?", "answer": "It is -3.\n####  -3 "},
        {"question": "No marker?", "answer": "just text"},
    ])
    r, big, neg, plain = load_records(path)
    assert r.prompt == NO_INPUT.replace("Name a color.", "How many clips?")
    assert r.response == solution  # the full worked answer is the training target
    assert r.label == "72"
    assert big.label == "1080"  # thousands separators are removed
    assert neg.label == "-3"
    assert plain.label is None


def test_record_is_frozen():
    rec = parse_record({"instruction": "i", "output": "o"})
    with pytest.raises(Exception):
        rec.prompt = "x"


# ---------------------------------------------------------------- tokenization

def _rec(prompt_instruction: str = "Name a color.", response: str = "the correct answer is answer2"):
    return parse_record({"instruction": prompt_instruction, "output": response})


def test_masking_boundary(tokenizer):
    rec = _rec()
    out = tokenize_record(tokenizer, rec, cutoff_len=1024)
    ids, labels = out["input_ids"], out["labels"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert len(ids) == len(labels)
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[-1] == eos and labels[-1] == eos
    # The boundary: a run of -100 then a run of supervised labels equal to the ids.
    n_masked = labels.index(next(label for label in labels if label != -100))
    assert all(label == -100 for label in labels[:n_masked])
    assert labels[n_masked:] == ids[n_masked:]
    assert count_supervised(labels) == len(ids) - n_masked
    # The masked part decodes to BOS + prompt, the supervised part to response + EOS.
    assert tokenizer.decode(ids[:n_masked]) == "<s>" + rec.prompt
    assert tokenizer.decode(ids[n_masked:]) == rec.response + "</s>"
    # With this tokenizer (byte-level, no prefix space, the prompt ends in a newline) tokenizing the
    # parts separately equals tokenizing the whole text at once.
    assert ids == tokenizer(rec.prompt + rec.response)["input_ids"] + [eos]


def test_train_on_prompt(tokenizer):
    out = tokenize_record(tokenizer, _rec(), cutoff_len=1024, train_on_prompt=True)
    assert out["labels"] == out["input_ids"]
    assert count_supervised(torch.tensor(out["labels"])) == len(out["input_ids"])


def test_no_bos_tokenizer():
    tok = PreTrainedTokenizerFast(tokenizer_object=_backend(bos=False), eos_token="</s>")
    rec = _rec()
    out = tokenize_record(tok, rec, cutoff_len=1024)
    assert tok.convert_tokens_to_ids("<s>") not in out["input_ids"]
    assert tok.decode(out["input_ids"]) == rec.prompt + rec.response + "</s>"


def test_truncation(tokenizer):
    rec = _rec()
    full = tokenize_record(tokenizer, rec, cutoff_len=10_000)
    n = len(full["input_ids"])
    n_prompt = full["labels"].count(-100)
    # exactly enough room: EOS kept
    assert tokenize_record(tokenizer, rec, cutoff_len=n) == full
    # one short: EOS dropped, the rest is the same prefix
    cut = tokenize_record(tokenizer, rec, cutoff_len=n - 1)
    assert len(cut["input_ids"]) == n - 1 and tokenizer.eos_token_id not in cut["input_ids"]
    assert cut["input_ids"] == full["input_ids"][:-1] and cut["labels"] == full["labels"][:-1]
    # cut inside the response
    mid = tokenize_record(tokenizer, rec, cutoff_len=n_prompt + 2)
    assert len(mid["input_ids"]) == n_prompt + 2 and count_supervised(mid["labels"]) == 2
    # the prompt alone exceeds the cutoff: returned, but nothing is supervised
    short = tokenize_record(tokenizer, rec, cutoff_len=5)
    assert len(short["input_ids"]) == 5 and count_supervised(short["labels"]) == 0
    with pytest.raises(ValueError, match="cutoff_len"):
        tokenize_record(tokenizer, rec, cutoff_len=0)


def test_sft_dataset(tokenizer):
    records = [_rec(), _rec("Translate to French.", "bonjour")]
    ds = SFTDataset(records, tokenizer, cutoff_len=64)
    assert len(ds) == 2 and ds.records == records
    for rec, item in zip(records, [ds[0], ds[1]]):
        assert len(item["input_ids"]) <= 64
        assert tokenizer.decode([i for i, label in zip(item["input_ids"], item["labels"]) if label != -100]) \
            == rec.response + "</s>"


# ---------------------------------------------------------------- batching

def test_collate():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                {"input_ids": [8], "labels": [8]},
                {"input_ids": [9, 10], "labels": [-100, -100]}]
    batch = collate(examples, pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, -100, -100]]
    assert collate(examples, pad_token_id=2)["input_ids"][1].tolist() == [8, 2, 2]


def test_batch_order():
    first = batch_order(10, 3, seed=1, epoch=0)
    assert [len(b) for b in first] == [3, 3, 3, 1]  # last partial batch kept
    assert sorted(i for b in first for i in b) == list(range(10))
    torch.manual_seed(123)  # the global RNG must play no part
    again = batch_order(10, 3, seed=1, epoch=0)
    torch.rand(5)
    assert again == first
    epochs = [batch_order(10, 3, seed=1, epoch=e) for e in range(4)]
    assert all(sorted(i for b in order for i in b) == list(range(10)) for order in epochs)
    assert len({str(order) for order in epochs}) == 4  # each epoch is shuffled differently
    assert batch_order(10, 3, seed=2, epoch=0) != first
    assert [len(b) for b in batch_order(6, 3, seed=0, epoch=0)] == [3, 3]
    assert batch_order(0, 3, seed=0, epoch=0) == []
    with pytest.raises(ValueError, match="batch_size"):
        batch_order(10, 0, seed=0, epoch=0)


def test_pad_token_id(tokenizer):
    assert pad_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<pad>")
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


# ---------------------------------------------------------------- errors

GOOD = {"instruction": "i", "input": "", "output": "o"}


@pytest.mark.parametrize("rows, where, pattern", [
    ([GOOD, {"instruction": "i", "input": ""}], "line 2",
     r"field 'output' is missing \(the record has: instruction, input\); the alpaca format has instruction"),
    ([GOOD, GOOD, {"instruction": "i", "output": 3}], "line 3", r"field 'output' must be a string, got int"),
    ([{"instruction": ["i"], "output": "o"}], "line 1", r"field 'instruction' must be a string, got array"),
    ([{"instruction": "i", "input": 5, "output": "o"}], "line 1", r"field 'input' must be a string, got int"),
    ([{"question": "q"}], "line 1", r"field 'answer' is missing \(the record has: question\)"),
    ([{"question": "q", "answer": None}], "line 1", r"field 'answer' must be a string, got null"),
    ([{"prompt": "p"}], "line 1", r"field 'completion' is missing \(the record has: prompt\); the prompt-completion"),
    ([{"label": "p"}], "line 1", r"unrecognised record \(it has: label\); expected one of: chat \(messages"),
    ([GOOD, ["not", "an", "object"]], "line 2", r"expected a JSON object, got array"),
])
def test_bad_record_jsonl(tmp_path, rows, where, pattern):
    path = _jsonl(tmp_path, "data.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{path} {where}: ") + pattern):
        load_records(path)


def test_bad_record_json_item_index(tmp_path):
    path = _write(tmp_path, "data.json", json.dumps([GOOD, GOOD, {"instruction": "i", "input": "x"}]))
    with pytest.raises(DataError, match=re.escape(f"{path} item 3: field 'output' is missing")):
        load_records(path)


def test_invalid_json_line(tmp_path):
    path = _write(tmp_path, "data.jsonl", json.dumps(GOOD) + '\n\n{"instruction": "i", "output": }\n')
    with pytest.raises(DataError, match=re.escape(f"{path} line 3, column 32: invalid JSON")):
        load_records(path)


def test_invalid_json_array(tmp_path):
    path = _write(tmp_path, "data.json", '[\n {"instruction": "i",\n  "output": "o"\n },\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path} line 5, column 1: invalid JSON")):
        load_records(path)


@pytest.mark.parametrize("name, text, pattern", [
    ("empty.jsonl", "", "file is empty"),
    ("blank.jsonl", "\n  \n\n", "file is empty"),
    ("empty.json", "", "file is empty"),
    ("none.json", "[]", "contains no records"),
    ("object.json", json.dumps(GOOD), "top-level JSON must be an array of records, got object"),
    ("data.csv", "instruction,output\n", r"unsupported file type '\.csv'; supported: \.json, \.jsonl, \.parquet"),
])
def test_bad_file(tmp_path, name, text, pattern):
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + pattern):
        load_records(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope.jsonl")) + ": file not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_records(tmp_path)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- vendored demo data

def test_demo_data_matches_readme():
    readme = (DEMO_DATA / "README.md").read_text(encoding="utf-8")
    counts = dict(re.findall(r"^\| `(arc_easy_\w+\.json)` \|.*\| (\d+) \|$", readme, re.MULTILINE))
    assert counts == {"arc_easy_train.json": "400", "arc_easy_test.json": "100"}
    for name, count in counts.items():
        records = load_records(DEMO_DATA / name)
        assert len(records) == int(count)
        assert all(isinstance(r, Record) for r in records)
        for r in records:
            assert r.label in {"answer1", "answer2", "answer3", "answer4"}
            assert r.response == f"the correct answer is {r.label}"
            assert r.prompt.startswith("Below is an instruction that describes a task. Write")
            assert re.search(r"\n\nAnswer format: answer1/answer2/answer3(/answer4)?\n\n### Response:\n$",
                             r.prompt)
    assert (DEMO_DATA / "LICENSE").is_file() and (DEMO_DATA / "DATA_LICENSE").is_file()
    assert not (DEMO_DATA / "__init__.py").exists()
