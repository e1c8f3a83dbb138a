"""Preference pairs (`qdora.data.preference`): TRL's text and chat formats from every file type, one-line errors
naming the record, tokenization as TRL's `DPOTrainer` tokenizes, and the bundled ARC-Easy pairs."""

import json
import re

import pytest
from serving import make_model_dir

from qdora.data.examples import DEMO_DATA
from qdora.data.preference import has_pairs, load_pairs, parse_pair, tokenize_pair
from qdora.data.records import DataError
from qdora.data.scoring import choice_pair
from qdora.demo import demo_choices

TEXT = [{"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Blue."},
        {"prompt": "Name a fruit:", "chosen": " apple", "rejected": " one two"}]
CHAT = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit"}],
         "chosen": [{"role": "assistant", "content": "apple"}],
         "rejected": [{"role": "assistant", "content": "the sky"}]}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(make_model_dir(tmp_path_factory.mktemp("pd")))


def test_every_file_type_reads_the_same_pairs(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "p.json").write_text(json.dumps(TEXT))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEXT))
    ds = datasets.Dataset.from_list(TEXT)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    got = [load_pairs(tmp_path / name) for name in ("p.json", "p.jsonl", "p.parquet", "folder")]
    assert all([(p.prompt, p.chosen, p.rejected) for p in pairs] == [(r["prompt"], r["chosen"], r["rejected"])
                                                                     for r in TEXT] for pairs in got)
    assert has_pairs(tmp_path / "p.jsonl")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert not has_pairs(tmp_path / "sft.jsonl")


@pytest.mark.parametrize("record, words", [
    ({"prompt": "q", "chosen": "a"}, "field 'rejected' is missing"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "are the same reply"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "must be a string"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}, "is a string but 'prompt' is"),
    ({"prompt": [{"role": "assistant", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "last message is 'assistant'"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": [], "rejected": []}, "prompt[0] must be"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "must be one assistant message"),
])
def test_bad_pairs_are_named_with_their_line(tmp_path, record, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TEXT[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=re.escape(words)) as err:
        load_pairs(path)
    assert str(err.value).startswith(f"{path} line 2: ") and "\n" not in str(err.value)


def test_text_and_chat_tokenize_as_trl_does(tok):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from models import build, llama3_config
    model = build(llama3_config(vocab_size=512))
    for rows in (TEXT, CHAT):
        trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(output_dir="/tmp/qdora-pd", report_to=[],
                                                                 use_cpu=True, bf16=False),
                                 ref_model=build(llama3_config(vocab_size=512)), processing_class=tok,
                                 train_dataset=datasets.Dataset.from_list(rows))
        for row, theirs in zip(rows, trainer.train_dataset):
            ours = tokenize_pair(tok, parse_pair(row))
            assert (ours["prompt_ids"], ours["chosen_ids"], ours["rejected_ids"]) == \
                (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])


def test_a_long_pair_keeps_its_prompt_and_is_marked(tok):
    pair = parse_pair(TEXT[0])
    whole = tokenize_pair(tok, pair)
    cut = tokenize_pair(tok, pair, cutoff_len=len(whole["prompt_ids"]) + 1)
    assert cut["truncated"] and cut["prompt_ids"] == whole["prompt_ids"]
    assert cut["chosen_ids"] == whole["chosen_ids"][:1] and len(cut["rejected_ids"]) == 1
    assert not tokenize_pair(tok, pair, cutoff_len=1000)["truncated"]


def test_the_bundled_arc_pairs_are_rebuilt_from_the_arc_records():
    path = DEMO_DATA / "arc_easy_pairs.jsonl"
    rebuilt = "".join(json.dumps(choice_pair(item)) + "\n" for item in demo_choices("arc_easy_train.json"))
    assert path.read_text() == rebuilt
    pairs = load_pairs(path)  # every pair valid: two different replies
    assert len(pairs) == 400 and all(p.chat for p in pairs)
