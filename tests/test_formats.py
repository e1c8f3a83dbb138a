"""Data formats (chat, prompt/completion, text, Alpaca, GSM8K), file types (JSON, JSONL, Parquet,
Arrow, datasets folders), chat tokenization against the template's own text, and the token cache."""

from __future__ import annotations

import json
import re

import pytest
from models import CHATML, chatml_tokenizer
from transformers import PreTrainedTokenizerFast

from qdora.data.chat import tokenize_chat
from qdora.data.examples import IGNORE_INDEX, DataError, load_records, parse_record, tokenize_record
from qdora.data.records import detect_format

# A template that drops earlier assistant turns' reasoning, so a prefix of the conversation does not
# render as a prefix of the whole (as Qwen3's does with <think> blocks).
DROPS_REASONING = ("{% for m in messages %}{% set c = m['content'] %}"
                   "{% if m['role'] == 'assistant' and not loop.last %}"
                   "{% set c = c.split('</think>')[-1] %}{% endif %}"
                   "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
                     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"},
                     {"role": "assistant", "content": "Green, of course."}]}
RECORDS = {
    "chat": CHAT,
    "prompt-completion": {"prompt": "Two plus two is", "completion": " four."},
    "text": {"text": "The quick brown fox jumps over the lazy dog."},
    "alpaca": {"instruction": "Name a color.", "input": "", "output": "Blue."},
    "gsm8k": {"question": "What is 2+2?", "answer": "2+2=4 #### 4"},
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with ChatML's special tokens and template."""
    return chatml_tokenizer([json.dumps(r) for r in RECORDS.values()]
                            + ["system user assistant Be brief Name a color Blue Green"])


def _write(path, rows, kind):
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import datasets
        ds = datasets.Dataset.from_list(rows)
        if kind == "parquet":
            ds.to_parquet(str(path))
        elif kind == "folder":
            ds.save_to_disk(str(path))
        else:  # a single Arrow file as datasets writes it
            ds.save_to_disk(str(path.parent / "saved"))
            path.write_bytes(next((path.parent / "saved").glob("*.arrow")).read_bytes())
    return path


@pytest.mark.parametrize("kind, name", [("json", "d.json"), ("jsonl", "d.jsonl"), ("parquet", "d.parquet"),
                                        ("arrow", "d.arrow"), ("folder", "saved_dataset")])
@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_every_format_from_every_file_type(tmp_path, kind, name, fmt):
    rows = [RECORDS[fmt], RECORDS[fmt]]
    records = load_records(_write(tmp_path / name, rows, kind))
    assert [r.format for r in records] == [fmt, fmt]
    assert records[0] == parse_record(RECORDS[fmt], records[0].source)  # the file type changes nothing
    assert re.search(r"(item 2|line 2|row 2)$", records[1].source)  # lines, items and rows all count from 1
    if fmt == "chat":
        assert records[0].messages[-1] == ("assistant", "Green, of course.")


def test_format_detection_and_forcing(tmp_path):
    assert {f: detect_format(r) for f, r in RECORDS.items()} == {f: f for f in RECORDS}
    path = _write(tmp_path / "d.jsonl", [RECORDS["text"]], "jsonl")
    with pytest.raises(DataError, match=r"d.jsonl line 1: field 'messages' is missing \(the record has: text\)"):
        load_records(path, format="chat")
    with pytest.raises(DataError, match="format='csv' is unknown"):
        load_records(path, format="csv")


@pytest.mark.parametrize("rows, pattern", [
    ([CHAT, RECORDS["text"]], r"mixes record formats \(.* line 1 is chat, .* line 2 is text\); keep one format"),
    ([{"messages": [{"role": "user", "content": "hi"}]}],
     r"line 1: the chat has no assistant turn \(roles: user\); there is nothing to train on"),
    ([{"messages": [{"role": "bot", "content": "hi"}]}], r"line 1: messages\[0\]: role 'bot' is not one of system"),
    ([{"messages": [{"role": "assistant", "content": 3}]}], r"line 1: messages\[0\]: 'content' must be a string"),
    ([{"messages": []}], r"line 1: field 'messages' must be a non-empty list"),
    ([{"messages": "hello"}], r"line 1: field 'messages' must be a list, got string"),
    ([{"prompt": "p", "completion": None}], r"line 1: field 'completion' must be a string, got null"),
    ([{"text": "  "}], r"line 1: field 'text' is empty"),
])
def test_bad_records_name_file_line_and_field(tmp_path, rows, pattern):
    path = _write(tmp_path / "d.jsonl", rows, "jsonl")
    with pytest.raises(DataError, match=pattern):
        load_records(path)


def test_bad_files(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(RECORDS["text"]).encode().replace(b"fox", b"f\xf6x"))
    with pytest.raises(DataError, match="latin1.jsonl: not UTF-8 text"):
        load_records(tmp_path / "latin1.jsonl")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="broken.parquet: cannot be read as Parquet"):
        load_records(tmp_path / "broken.parquet")
    empty = _write(tmp_path / "empty.parquet", [RECORDS["text"]], "parquet")
    import pyarrow.parquet as pq
    pq.write_table(pq.read_table(empty).slice(0, 0), empty)
    with pytest.raises(DataError, match="empty.parquet: contains no records"):
        load_records(empty)
    import datasets
    datasets.DatasetDict({"train": datasets.Dataset.from_list([RECORDS["text"]])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a DatasetDict folder \(splits: train\); pass one split's folder"):
        load_records(tmp_path / "dd")


def _supervised_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_chat_trains_on_every_assistant_turn_and_nothing_else(tokenizer):
    record = parse_record(CHAT)
    example = tokenize_record(tokenizer, record, cutoff_len=1000)
    # The oracle: the template's own rendering, and the assistant turns as the template writes them.
    rendered = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == rendered
    assert _supervised_text(tokenizer, example) == "Blue.<|im_end|>Green, of course.<|im_end|>"
    assert tokenize_record(tokenizer, record, 1000, train_on_prompt=True)["labels"] == example["input_ids"]
    short = tokenize_record(tokenizer, record, cutoff_len=10)
    assert short == {k: v[:10] for k, v in example.items()}


def test_chat_with_a_template_that_rewrites_earlier_turns(tokenizer):
    chat = {"messages": [{"role": "user", "content": "Name a color."},
                         {"role": "assistant", "content": "<think>pick one</think>Blue."},
                         {"role": "user", "content": "Another one?"},
                         {"role": "assistant", "content": "<think>not blue</think>Green."}]}
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>",
                                    pad_token="<pad>")
    tokenizer.chat_template = DROPS_REASONING
    example = tokenize_record(tokenizer, parse_record(chat), cutoff_len=1000)
    # The first turn is rendered without its reasoning, the last one with it: both are found.
    assert _supervised_text(tokenizer, example) == "Blue.<|im_end|><think>not blue</think>Green.<|im_end|>"


def test_chat_without_a_template_names_the_fix(tokenizer):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(DataError, match="has none; pass --chat-template FILE"):
        tokenize_chat(bare, parse_record(CHAT, "d.jsonl line 1"), 100)


@pytest.mark.parametrize("fmt, supervised", [
    ("prompt-completion", " four.<|im_end|>"),
    ("text", "The quick brown fox jumps over the lazy dog.<|im_end|>"),
    ("alpaca", "Blue.<|im_end|>"),
])
def test_loss_is_on_the_completion_or_everything(tokenizer, fmt, supervised):
    example = tokenize_record(tokenizer, parse_record(RECORDS[fmt]), cutoff_len=1000)
    assert _supervised_text(tokenizer, example) == supervised


def test_token_cache_serves_a_second_run(tmp_path, tokenizer, monkeypatch):
    from qdora.data import token_cache
    monkeypatch.setenv("QDORA_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path / "d.jsonl", [CHAT, CHAT], "jsonl")
    records = load_records(path)
    first = token_cache.cached_examples(path, records, tokenizer, 64, False)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.safetensors"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(token_cache, "tokenize_all", no_tokenizing)
    assert token_cache.cached_examples(path, records, tokenizer, 64, False) == first
    with pytest.raises(AssertionError, match="tokenized again"):  # another cutoff is another cache entry
        token_cache.cached_examples(path, records, tokenizer, 32, False)
    other = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    other.chat_template = CHATML.replace("\n", " ")
    with pytest.raises(AssertionError, match="tokenized again"):  # another template too
        token_cache.cached_examples(path, records, other, 64, False)
