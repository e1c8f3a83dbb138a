"""Long data in `qdora train`: examples longer than `cutoff_len` are cut to it and counted (through
the token cache), never cut silently; packing places every example whole, and rows of 131,072
tokens pack and collate; the attention implementation is chosen for the device and named, with
the notes about the data, on the terminal and in run.log."""

import json
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import FP32_TOL
from models import CHATML, build, chatml_tokenizer, llama3_config, save_bpe_tokenizer

from qdora.data.chat import assistant_spans, tokenize_chat
from qdora.data.examples import (
    IGNORE_INDEX,
    Tokenized,
    collate,
    load_records,
    parse_record,
    tokenize_all,
    tokenize_record,
    tokenize_whole,
)
from qdora.data.packing import collate_packed, pack
from qdora.models.loading import attention_implementation
from qdora.models.packed_attention import sliding_window
from qdora.train.loop import TrainConfig, read_metrics, train
from qdora.train.run_data import RunExamples, Truncation
from qdora.train.run_log import RUN_LOG

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
                     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"},
                     {"role": "assistant", "content": "Green, of course."}, {"role": "user", "content": "More?"},
                     {"role": "assistant", "content": "Red, then yellow, then blue again."}]}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Name a color.", "Blue, green, red and yellow."]


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer([json.dumps(CHAT), *TEXTS, "system user assistant"])


def _records(n_long=3, n_short=5):
    long = [parse_record({"text": " ".join(TEXTS * (4 + i))}, f"d.jsonl line {i + 1}") for i in range(n_long)]
    short = [parse_record({"text": TEXTS[i % 3]}, f"d.jsonl line {n_long + i + 1}") for i in range(n_short)]
    return long + short + [parse_record(CHAT, "d.jsonl chat")]


# ---- counting what the cut removes --------------------------------------------------------------

def test_tokenize_all_cuts_as_tokenize_record_and_keeps_each_length(tokenizer):
    records = _records()
    whole = [tokenize_whole(tokenizer, r) for r in records]
    cutoff = 24
    tokenized = tokenize_all(records, tokenizer, cutoff, progress=False)
    assert tokenized.examples == [tokenize_record(tokenizer, r, cutoff) for r in records]
    assert tokenized.lengths == [len(w["input_ids"]) for w in whole]
    for ex, w in zip(tokenized.examples, whole):  # the cut keeps the first cutoff_len tokens, labels alike
        assert ex == {k: v[:cutoff] for k, v in w.items()}
    assert tokenized.truncated == [n for n in tokenized.lengths if n > cutoff]
    assert len(tokenized.truncated) == 4  # the three long texts and the chat; no short text
    # a cutoff above every length cuts nothing
    assert tokenize_all(records, tokenizer, max(tokenized.lengths), progress=False).truncated == []
    assert tokenized.select([8, 0]).lengths == [tokenized.lengths[8], tokenized.lengths[0]]
    with pytest.raises(ValueError, match="cutoff_len must be >= 1, got 0"):
        tokenize_all(records, tokenizer, 0)
    with pytest.raises(ValueError, match="2 examples but 1 lengths"):
        Tokenized(tokenized.examples[:2], [1], cutoff)


def test_chat_labels_are_the_tokens_overlapping_an_assistant_turn(tokenizer):
    # the oracle: a token is a target if its characters overlap any assistant turn's
    record = parse_record(CHAT)
    text = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = assistant_spans(tokenizer, record, text)
    expected = [t if any(a < end and b > start for start, end in spans) else IGNORE_INDEX
                for t, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    whole = tokenize_chat(tokenizer, record, None)
    assert whole["labels"] == expected and len(spans) == 3
    assert tokenize_chat(tokenizer, record, 10) == {k: v[:10] for k, v in whole.items()}


def test_token_cache_keeps_the_lengths_before_the_cut(tokenizer, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from qdora.data import token_cache
    monkeypatch.setenv("QDORA_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [{"text": " ".join(TEXTS * 4)}, {"text": TEXTS[0]}]))
    records = load_records(data)
    first = token_cache.cached_examples(data, records, tokenizer, 16, False)
    assert len(first.truncated) == 1 and first.lengths[0] > 16 and first.cutoff_len == 16
    [cached] = (tmp_path / "cache" / "tokenized").glob("*.safetensors")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(token_cache, "tokenize_all", no_tokenizing)
    assert token_cache.cached_examples(data, records, tokenizer, 16, False) == first
    # a file without the lengths before the cut (as version 1 wrote) is not trusted: tokenized again
    tensors = load_file(str(cached))
    del tensors["whole_lengths"]
    save_file(tensors, str(cached))
    with pytest.raises(AssertionError, match="tokenized again"):
        token_cache.cached_examples(data, records, tokenizer, 16, False)


def test_truncation_notes_say_how_many_and_the_longest():
    train = Truncation.of("training", [10, 4096, 9812, 5000, 4097] + [100] * 3395, 4096)
    assert (train.examples, train.cut, train.longest) == (3400, 3, 9812)
    assert train.note() == ("note: 3 of 3,400 training examples are longer than cutoff_len=4096 and were cut to it "
                            "(longest 9,812 tokens; raise --cutoff-len to keep them whole)")
    val = Truncation.of("validation", [5000, 12], 4096)
    assert val.note() == ("note: 1 of 2 validation examples is longer than cutoff_len=4096 and was cut to it "
                          "(longest 5,000 tokens; raise --cutoff-len to keep them whole)")
    assert Truncation.of("validation", [], 4096).note() is None
    assert Truncation.of("training", [4096], 4096).note() is None  # exactly cutoff_len: whole
    data = RunExamples([], [], 3398, 2, train, val, 1)
    assert data.notes() == [train.note(), val.note(),
                            "note: 2 training example(s) have no target token within cutoff_len=4096 and are skipped",
                            "note: 1 validation example(s) have no target token within cutoff_len=4096 and are "
                            "skipped"]
    assert data.longest == 4096  # after the cut
    assert data.positions_note(4096) is None and data.positions_note(None) is None
    assert data.positions_note(2048) == (
        "note: cutoff_len=4096 is above the model's max_position_embeddings=2048: examples longer than 2,048 "
        "tokens run at positions it was not trained on (RoPE models run there, with lower quality); the longest "
        "here has 4,096 tokens")


# ---- packing and collating long rows ------------------------------------------------------------

CUTOFF = 131_072


def _long_examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 50_000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 4) + ids[n // 4:]})
    return out


def test_131072_token_rows_pack_and_collate_whole():
    # one example of exactly cutoff_len, long ones that leave room, short ones that fill it, one token
    lengths = [CUTOFF, 70_000, 65_000, 61_072, 3, 1, 90_000, 41_072, 50_000]
    examples = _long_examples(lengths)
    rows = pack(examples, CUTOFF)
    assert [len(r["input_ids"]) for r in rows] == [CUTOFF, 70_000, 65_000 + 61_072 + 3 + 1, CUTOFF, 50_000]
    # nothing split, dropped or reordered: the rows hold the examples end to end, each starting at position 0
    assert [t for r in rows for t in r["input_ids"]] == [t for ex in examples for t in ex["input_ids"]]
    starts = [i for r in rows for i, p in enumerate(r["position_ids"]) if p == 0]
    assert len(starts) == len(examples)
    labels = [t for r in rows for t in r["labels"]]
    expected = [t for ex in examples for t in [IGNORE_INDEX] + ex["labels"][1:]]
    assert labels == expected
    batch = collate_packed(rows[2:4], pad_token_id=0)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, CUTOFF) for k in ("input_ids", "labels",
                                                                                      "position_ids")}
    n = len(rows[2]["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == rows[2]["input_ids"] and not batch["input_ids"][0, n:].any()
    assert batch["position_ids"][0, n:].tolist() == list(range(CUTOFF - n))  # the padding: a segment of its own
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["position_ids"][1].tolist() == rows[3]["position_ids"]
    # unpacked, an example of cutoff_len beside a short one
    plain = collate([examples[0], examples[4]], pad_token_id=2)
    assert plain["attention_mask"].sum(1).tolist() == [CUTOFF, 3] and plain["input_ids"][1, 3:].eq(2).all()
    assert plain["labels"][0].tolist() == examples[0]["labels"]
    assert collate(examples[4:6], pad_token_id=0)["labels"].shape == (2, 3)


def test_pack_refuses_what_it_would_have_to_split():
    examples = _long_examples([5, 9])
    with pytest.raises(ValueError, match=r"example 1, of 9 tokens, is longer than cutoff_len=8; cut it first"):
        pack(examples, 8)
    with pytest.raises(ValueError, match="example 0 has 5 input_ids but 4 labels"):
        pack([{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4]}], 8)
    # an empty example adds nothing, and keeps ids and labels the same length
    rows = pack([{"input_ids": [], "labels": []}, *examples[:1]], 8)
    assert [len(r["labels"]) for r in rows] == [len(r["input_ids"]) for r in rows] == [5]


# ---- the attention implementation ---------------------------------------------------------------

class _Flash:
    _supports_flash_attn, _supports_sdpa = True, True


class _NoSdpa:
    _supports_flash_attn, _supports_sdpa = False, False


@pytest.mark.parametrize("device, dtype, cls, flash_attn, expected", [
    ("cpu", torch.float32, _Flash, True, "sdpa"),
    ("cpu", torch.bfloat16, _Flash, True, "sdpa"),
    ("cuda", torch.bfloat16, _Flash, True, "flash_attention_2"),
    ("cuda", torch.float16, _Flash, True, "flash_attention_2"),
    ("cuda", torch.float32, _Flash, True, "sdpa"),
    ("cuda", torch.bfloat16, _Flash, False, "sdpa"),
    ("cuda", torch.bfloat16, _NoSdpa, True, "eager"),
    ("cpu", torch.float32, _NoSdpa, False, "eager"),
])
def test_attention_is_chosen_for_the_device_and_dtype(monkeypatch, device, dtype, cls, flash_attn, expected):
    # None in sys.modules makes `import flash_attn` raise ImportError, as when it is not installed
    monkeypatch.setitem(sys.modules, "flash_attn", SimpleNamespace() if flash_attn else None)
    assert attention_implementation(cls, torch.device(device), dtype) == expected


def test_attention_follows_what_each_model_supports():
    from transformers import Gemma2ForCausalLM, LlamaForCausalLM
    assert attention_implementation(LlamaForCausalLM, torch.device("cpu"), torch.float32) == "sdpa"
    assert attention_implementation(Gemma2ForCausalLM, torch.device("cpu"), torch.float32) == "eager"  # no sdpa


def test_the_sliding_window_a_model_uses():
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    assert sliding_window(SimpleNamespace(config=MistralConfig(sliding_window=4096))) == 4096
    assert sliding_window(SimpleNamespace(config=MistralConfig(sliding_window=None))) is None
    assert sliding_window(SimpleNamespace(config=Qwen2Config(sliding_window=4096))) is None  # use_sliding_window off
    assert sliding_window(SimpleNamespace(config=Qwen2Config(sliding_window=4096, use_sliding_window=True,
                                                             max_window_layers=0, num_hidden_layers=2))) == 4096
    assert sliding_window(SimpleNamespace(config=Gemma3TextConfig(sliding_window=512))) == 512  # 5 local : 1 global
    assert sliding_window(SimpleNamespace(config=Gemma3TextConfig(
        sliding_window=512, num_hidden_layers=2, layer_types=["full_attention"] * 2))) is None
    assert sliding_window(SimpleNamespace(config=LlamaConfig())) is None


# ---- a tiny run: the terminal and run.log ------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_data")
    # 12 texts, 3 of them (every 4th) far longer than cutoff_len=64, the others shorter
    texts = [" ".join(TEXTS * 3) if i % 4 == 0 else TEXTS[i % 3] for i in range(12)]
    (root / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    # max_position_embeddings below cutoff_len: a note, not an error (Llama's RoPE runs past it)
    build(llama3_config(vocab_size=256, intermediate_size=128, max_position_embeddings=32)).save_pretrained(
        root / "model")
    save_bpe_tokenizer(root / "model", texts + [CHATML], vocab_size=256)
    return root


def test_a_run_names_its_attention_and_what_the_cut_removed(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QDORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    cfg = dict(model=str(setup / "model"), data=str(setup / "d.jsonl"), out=str(out), method="qdora", r=4, alpha=8,
               dropout=0.0, lr=1e-2, max_steps=1, batch_size=4, cutoff_len=64, save_every=1, val_split=0.25,
               packing=True, progress=False)
    train(TrainConfig(**cfg))
    printed = capsys.readouterr().out.splitlines()
    log = (out / RUN_LOG).read_text().splitlines()
    assert re.fullmatch(r"qdora train: started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", log[0])
    # packed rows: SDPA over each packed sequence (qdora.packed_sdpa), no tokens x tokens mask
    named = "attention: qdora_sdpa (SDPA over each packed sequence; no tokens × tokens mask)"
    assert named in log and named in printed
    # the 3 long texts, wherever val_split put them, are counted: training and validation apart
    counts = {}
    for line in log:
        found = re.fullmatch(r"note: (\d+) of (\d+) (training|validation) examples (is|are) longer than "
                             r"cutoff_len=64 and (was|were) cut to it \(longest (\d+) tokens; raise --cutoff-len to "
                             r"keep them whole\)", line)
        if found:
            assert line in printed and int(found[6]) > 64
            counts[found[3]] = (int(found[1]), int(found[2]))
    assert sum(cut for cut, _ in counts.values()) == 3 and counts["training"][1] == 9
    positions = [line for line in log if "max_position_embeddings=32" in line]
    assert positions == [line for line in printed if "max_position_embeddings=32" in line]
    assert positions[0].startswith("note: cutoff_len=64 is above the model's max_position_embeddings=32")
    assert any(line.startswith("packing: 9 examples in") for line in log)
    # --resume adds its own header; the first one stays
    train(TrainConfig(**{**cfg, "max_steps": 2, "resume": True}))
    again = (out / RUN_LOG).read_text().splitlines()
    assert again[:len(log)] == log and again[len(log)] == ""
    assert again[len(log) + 1].startswith("qdora train: resumed at step 1, ") and again.count(named) == 2
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


GEMMA2_LOG = ("attention: qdora_softcap (eager soft-capped scores in tiles of queries, each recomputed in the "
              "backward, over each packed sequence, within the 8-token sliding window on its windowed layers; no "
              "tokens × tokens scores or mask)")


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_a_windowed_model_attends_in_blocks_without_packing(name, setup, tmp_path, capsys, monkeypatch):
    """Mistral with an 8-token sliding window, rows of up to 64 tokens, no packing: transformers' SDPA would build a
    `T × T` windowed mask; `qdora train` runs qdora_sdpa's window blocks and says so. Gemma 2 (windowed and full
    layers, soft-capped scores, packed, offloaded activations): transformers' eager attention would keep `T × T`
    scores; `qdora train` runs qdora_softcap's tiles and says so. Each run's loss equals the same run on
    transformers' own attention (swapped back by the test)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, MistralConfig

    monkeypatch.setenv("QDORA_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    dims = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False)
    config = (MistralConfig(**dims) if name == "mistral" else
              Gemma2Config(**dims, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=1.0))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "model" / file).write_bytes((setup / "model" / file).read_bytes())
    cfg = dict(model=str(tmp_path / "model"), data=str(setup / "d.jsonl"), method="qdora", r=4, alpha=8, dropout=0.0,
               lr=1e-2, max_steps=2, batch_size=4, cutoff_len=64, save_every=2, progress=False)
    if name == "gemma2":
        cfg.update(packing=True, offload_activations=True)
    train(TrainConfig(**cfg, out=str(tmp_path / "ours")))
    log = (tmp_path / "ours" / RUN_LOG).read_text().splitlines()
    if name == "mistral":
        assert "attention: qdora_sdpa (SDPA in blocks of the 8-token sliding window; no tokens × tokens mask)" in log
    else:
        assert GEMMA2_LOG in log
    monkeypatch.setattr("qdora.models.packed_attention.unsupported", lambda model: "swapped back by the test")
    train(TrainConfig(**cfg, out=str(tmp_path / "theirs")))
    own = "sdpa" if name == "mistral" else "eager"
    assert f"attention: {own}" in (tmp_path / "theirs" / RUN_LOG).read_text().splitlines()
    ours, theirs = read_metrics(tmp_path / "ours"), read_metrics(tmp_path / "theirs")
    assert [m["step"] for m in ours] == [1, 2] == [m["step"] for m in theirs]
    for a, b in zip(ours, theirs):  # FP32_TOL: the same sums, split into blocks (or tiles)
        assert abs(a["loss"] - b["loss"]) <= FP32_TOL * abs(b["loss"]), (a, b)


PADDING_LOG = ("padding: rows padded on the right go to the model without an attention mask (causal attention never "
               "lets a token see the padding after it; no tokens × tokens mask is built from it)")


def test_padded_rows_train_without_a_mask_as_with_it(setup, tmp_path, monkeypatch, sdpa_calls):
    """Unpacked batches of 4 examples of different lengths, padded on the right: SDPA is never handed a mask (so
    none of `T × T` is built), the run log says so, and the training and validation losses equal the same run with
    the mask (`unmasked_right_padding` swapped to False by the test: transformers' masked SDPA)."""
    monkeypatch.setenv("QDORA_CACHE", str(tmp_path / "cache"))
    cfg = dict(model=str(setup / "model"), data=str(setup / "d.jsonl"), method="qdora", r=4, alpha=8, dropout=0.0,
               lr=1e-2, max_steps=2, batch_size=4, cutoff_len=64, save_every=2, val_split=0.25, eval_every=2,
               progress=False)
    train(TrainConfig(**cfg, out=str(tmp_path / "unmasked")))
    assert sdpa_calls and not any(masked for _, masked in sdpa_calls)
    assert PADDING_LOG in (tmp_path / "unmasked" / RUN_LOG).read_text().splitlines()
    sdpa_calls.clear()
    monkeypatch.setattr("qdora.models.packed_attention.unmasked_right_padding", lambda model: False)
    train(TrainConfig(**cfg, out=str(tmp_path / "masked")))
    assert any(masked for _, masked in sdpa_calls)  # transformers' mask, for the padded rows
    assert PADDING_LOG not in (tmp_path / "masked" / RUN_LOG).read_text().splitlines()
    ours, theirs = read_metrics(tmp_path / "unmasked"), read_metrics(tmp_path / "masked")
    assert [m["step"] for m in ours] == [1, 2] == [m["step"] for m in theirs] and "val_loss" in ours[-1]
    for a, b in zip(ours, theirs):  # FP32_TOL: the same sums, the padding's keys left out by causality, not a mask
        for key in ("loss", "val_loss"):
            if key in b:
                assert abs(a[key] - b[key]) <= FP32_TOL * abs(b[key]), (key, a, b)
