"""`qdora train` on chat data with its own template file, packing, validation (a split or a file,
every N steps, the best adapter kept), CSV and TensorBoard logs, plain progress lines without a
terminal, and bad data stopped before anything is written."""

import csv
import json
import math

import pytest
import torch
from models import CHATML, build, llama3_config, save_bpe_tokenizer

from qdora.cli import main as cli_main
from qdora.data.examples import DEMO_DATA, DataError
from qdora.train.loop import TrainConfig, read_metrics, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    arc = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:24]
    # short conversations (the question's first words): rows of 40-70 tokens, several fit one packed row
    chats = [{"messages": [{"role": "user", "content": r["instruction"][48:96]},
                           {"role": "assistant", "content": r["output"]}]} for r in arc]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (root / "val.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:4]))
    (root / "chatml.jinja").write_text(CHATML)
    build(llama3_config(vocab_size=512, intermediate_size=256, max_position_embeddings=512)).save_pretrained(
        root / "model")
    save_bpe_tokenizer(root / "model", [r["instruction"] + " " + r["output"] for r in arc] + [CHATML])
    return root


def config(setup, out, **kw):
    base = dict(model=str(setup / "model"), data=str(setup / "chat.jsonl"), out=str(out), method="qdora", r=4,
                alpha=8, dropout=0.0, lr=1e-2, max_steps=4, batch_size=4, cutoff_len=256, save_every=2,
                chat_template=str(setup / "chatml.jinja"), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_chat_training_validates_and_keeps_the_best(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("QDORA_CACHE", str(tmp_path / "cache"))
    summary = train(config(setup, tmp_path / "run", val_split=0.25, eval_every=2, keep_best=True,
                           report_to=("csv", "tensorboard")))
    metrics = read_metrics(tmp_path / "run")
    vals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in vals] == [2, 4] and all(math.isfinite(m["val_loss"]) for m in vals)
    assert summary["val_loss"] == vals[-1]["val_loss"]
    best = json.loads((tmp_path / "run" / "adapter-best" / "best.json").read_text())
    assert best["val_loss"] == min(m["val_loss"] for m in vals)
    assert (summary["best_step"], summary["best_val_loss"]) == (best["step"], best["val_loss"])
    assert (tmp_path / "run" / "adapter-best" / "qdora_adapter.json").is_file()
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [m["step"] for m in metrics]
    assert float(rows[1]["val_loss"]) == pytest.approx(vals[0]["val_loss"])
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    # the tokenized data was cached: a second run does not tokenize again
    from qdora.data import token_cache
    monkeypatch.setattr(token_cache, "tokenize_all", lambda *a, **k: pytest.fail("tokenized again"))
    train(config(setup, tmp_path / "again", max_steps=1))


def test_validation_loss_is_the_token_mean_over_the_file(setup, tmp_path):
    """The validation loss after the last step, recomputed independently from the saved adapter."""
    import qdora
    from qdora.data.chat import set_chat_template
    from qdora.data.examples import collate, load_records, tokenize_record
    summary = train(config(setup, tmp_path / "run", val_data=str(setup / "val.jsonl"), max_steps=2))
    model, tok = qdora.load_model(setup / "model", method="qdora", cfg=qdora.AdapterConfig(r=4, alpha=8),
                                  progress=False)
    qdora.load_adapter(model, tmp_path / "run" / "adapter", verbose=False)
    set_chat_template(tok, setup / "chatml.jinja")
    examples = [tokenize_record(tok, r, 256) for r in load_records(setup / "val.jsonl")]
    batch = collate(examples, tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    assert summary["val_loss"] == pytest.approx(nll.item() / int((labels != -100).sum()), rel=1e-4)


def test_packing_trains_on_the_same_examples_in_fewer_rows(setup, tmp_path, capsys):
    train(config(setup, tmp_path / "packed", packing=True, max_steps=2, progress=True))
    out = capsys.readouterr()
    assert "packing: 24 examples in" in out.out
    packed = read_metrics(tmp_path / "packed")
    assert all(math.isfinite(m["loss"]) for m in packed)
    # without a terminal: plain progress lines (first and last step), not a bar
    lines = [ln for ln in out.err.splitlines() if ln.startswith("qdora train: step")]
    assert [ln.split(",")[0] for ln in lines] == ["qdora train: step 1/2", "qdora train: step 2/2"]
    assert "\r" not in out.err

    # --no-progress: no progress lines, the notes about the data still
    train(config(setup, tmp_path / "quiet", packing=True, max_steps=1, progress=False))
    out = capsys.readouterr()
    assert "packing: 24 examples in" in out.out and "qdora train: step" not in out.err


@pytest.mark.parametrize("rows, pattern", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "the chat has no assistant turn"),
    ([{"messages": [{"role": "user", "content": "a " * 400}, {"role": "assistant", "content": "b"}]}],
     r"no example has a target token within cutoff_len=64 \(every token left is prompt\)"),
    ([{"text": "x"}, {"prompt": "p", "completion": "c"}], "mixes record formats"),
])
def test_bad_data_stops_before_anything_is_written(setup, tmp_path, rows, pattern):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=pattern):
        train(config(setup, out, data=str(data), cutoff_len=64))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_chat_without_a_template_names_the_option(setup, tmp_path, capsys):
    code = cli_main(["train", "--model", str(setup / "model"), "--data", str(setup / "chat.jsonl"), "--out",
                     str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    assert code == 2 and not (tmp_path / "run").exists()
    assert "has none; pass --chat-template FILE" in capsys.readouterr().err


def test_option_errors_are_listed_together():
    with pytest.raises(ValueError, match=r"(?s)val_data and val_split both given.*report_to=\['wandb'\] unknown"):
        TrainConfig(model="m", data="d", out="o", val_data="v", val_split=0.1, report_to=("wandb",))
    with pytest.raises(ValueError, match="eval_every and keep_best need validation data"):
        TrainConfig(model="m", data="d", out="o", keep_best=True)


def test_packed_validated_run_resumes_bitwise(setup, tmp_path):
    """A run with packing, a validation split, CSV logs and the best adapter, stopped by SIGTERM and
    resumed, ends with the uninterrupted run's losses, validation losses and best step."""
    import os
    import signal
    kw = dict(packing=True, val_split=0.25, eval_every=2, keep_best=True, report_to=("csv",), max_steps=4,
              save_every=2, dropout=0.1)
    train(config(setup, tmp_path / "full", **kw))

    def interrupt(step, _):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train(config(setup, tmp_path / "resumed", **kw), on_step=interrupt)["interrupted"] == signal.SIGTERM
    train(config(setup, tmp_path / "resumed", resume=True, **kw))
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [(m["step"], m["loss"], m.get("val_loss")) for m in resumed] == \
           [(m["step"], m["loss"], m.get("val_loss")) for m in full]
    best = [json.loads((tmp_path / run / "adapter-best" / "best.json").read_text()) for run in ("full", "resumed")]
    assert best[0] == best[1]
    rows = [list(csv.DictReader((tmp_path / run / "metrics.csv").read_text().splitlines())) for run in ("full",
                                                                                                         "resumed")]
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]] == ["1", "2", "3", "4"]


def test_cli_config_file_with_the_new_settings(setup, tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: {setup / 'model'}\ndata: {setup / 'chat.jsonl'}\nout: {tmp_path / 'run'}\n"
                           f"chat-template: {setup / 'chatml.jinja'}\nformat: chat\npacking: true\n"
                           "val-split: 0.2\nreport-to: [csv]\nmax-steps: 2\nr: 4\nalpha: 8\nprogress-seconds: 0\n")
    assert cli_main(["train", "--config", str(config_file), "--batch-size", "2"]) == 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["packing"] is True and saved["report_to"] == ["csv"] and saved["batch_size"] == 2
    assert (tmp_path / "run" / "metrics.csv").is_file()
    captured = capsys.readouterr()
    err = captured.err
    assert "qdora train: step 1/2" in err and "qdora train: step 2/2" in err
    last = [m for m in read_metrics(tmp_path / "run") if "val_loss" in m][-1]
    assert "2 steps, " in captured.out and f"; validation loss {last['val_loss']:.4f}; results in" in captured.out


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]}],
     "bad.jsonl line 1: messages[1]: the assistant's content is empty, so there is nothing to learn from it"),
    ([{"prompt": "p", "completion": "  "}],
     "bad.jsonl line 1: field 'completion' is empty, so there is nothing to learn from the record"),
    ([{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "u"}]}],
     "bad.jsonl line 1: messages[1]: the conversation starts with the assistant (roles: system, assistant, user)"),
    ([{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"},
                    {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}],
     "bad.jsonl line 1: messages[0] and messages[1] are both 'user'"),
])
def test_records_with_nothing_to_learn_are_refused_in_one_line(setup, tmp_path, capsys, rows, message):
    # They used to train with exit 0, supervising only the end-of-turn token.
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = cli_main(["train", "--model", str(setup / "model"), "--data", str(data), "--out", str(tmp_path / "run"),
                     "--chat-template", str(setup / "chatml.jinja"), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "run").exists()
    assert err.startswith("qdora train: error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_a_template_that_refuses_a_conversation_names_the_record(setup, tmp_path, capsys):
    # Llama-2/Mistral/Gemma-style templates raise on a system role; that was a raw jinja2 traceback.
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                      "{{ raise_exception('System role not supported') }}{% endif %}"
                      "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]})
                    + "\n" + json.dumps({"messages": [{"role": "system", "content": "s"},
                                                      {"role": "user", "content": "u"},
                                                      {"role": "assistant", "content": "a"}]}) + "\n")
    code = cli_main(["train", "--model", str(setup / "model"), "--data", str(data), "--out", str(tmp_path / "run"),
                     "--chat-template", str(strict), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "run").exists()
    assert err.strip() == (f"qdora train: error: {data} line 2: the chat template refuses this conversation "
                           "(roles: system, user, assistant): System role not supported; change the record, or pass "
                           "--chat-template FILE with a template that accepts it"), err
