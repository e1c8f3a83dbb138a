import functools
import json
import math
import os
import re
import signal

import pytest
import torch
from models import build, llama3_config, save_bpe_tokenizer
from safetensors import safe_open

from qdora import QDoRALinear
from qdora.data.examples import DEMO_DATA, DataError
from qdora.train.loop import TrainConfig, lr_at, read_metrics, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:16]
    (root / "data.json").write_text(json.dumps(records))
    build(llama3_config(vocab_size=512, intermediate_size=256, max_position_embeddings=512)).save_pretrained(
        root / "model")
    corpus = [r["instruction"] + " " + r["output"] for r in records] + ["Below is an instruction ### Response:"]
    save_bpe_tokenizer(root / "model", corpus)
    return root


def config(setup, out, **kw):
    base = dict(model=str(setup / "model"), data=str(setup / "data.json"), out=str(out), method="qdora", r=4,
                alpha=8, dropout=0.1, lr=5e-3, max_steps=6, batch_size=4, cutoff_len=320, save_every=2,
                warmup_steps=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora", "qdora"])
def test_every_method_trains_and_saves(setup, tmp_path, method):
    summary = train(config(setup, tmp_path / method, method=method, max_steps=3))
    metrics = read_metrics(tmp_path / method)
    assert [m["step"] for m in metrics] == [1, 2, 3] and summary["steps"] == 3
    assert all(math.isfinite(m["loss"]) and m["tokens"] > 0 and m["tokens_per_s"] > 0 for m in metrics)
    saved = tmp_path / method / ("model" if method == "full" else "adapter")
    assert saved.is_dir() and (tmp_path / method / "checkpoint" / "state.json").is_file()


def test_intermediate_adapters_are_kept(setup, tmp_path):
    train(config(setup, tmp_path / "run", max_steps=4, keep_adapters_every=2))
    assert (tmp_path / "run" / "adapter-step2" / "qdora_adapter.json").is_file()
    assert not (tmp_path / "run" / "adapter-step4").exists() and (tmp_path / "run" / "adapter").is_dir()


def test_qdora_loss_goes_down(setup, tmp_path):
    train(config(setup, tmp_path / "run", max_steps=12, lr=3e-2, dropout=0.0, schedule="constant"))
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # nats per token


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_resume_continues_the_same_curve_bitwise(setup, tmp_path, adapter_dtype):
    """bf16 adapters: the fp32 master copies are in the checkpoint, so the resumed run is the same run."""
    config = functools.partial(globals()["config"], adapter_dtype=adapter_dtype)
    full = train(config(setup, tmp_path / "full"))
    reference = read_metrics(tmp_path / "full")

    def interrupt(step, _):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would

    first = train(config(setup, tmp_path / "resumed"), on_step=interrupt)
    assert first["interrupted"] == signal.SIGTERM and first["steps"] == 3
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["step"] == 3
    saved = safe_open(str(tmp_path / "resumed" / "checkpoint" / "optimizer.safetensors"), "pt").keys()
    masters = [k for k in saved if k.endswith("::master_weight")]
    assert len(masters) == (0 if adapter_dtype == "float32" else 3 * len(qdora_layers(full["model"])))
    second = train(config(setup, tmp_path / "resumed", resume=True))
    assert second["steps"] == 6 and second["interrupted"] is None
    resumed = read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == list(range(1, 7))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in reference]  # bitwise: same floats
    assert [m["lr"] for m in resumed] == [m["lr"] for m in reference]
    for (n1, p1), (n2, p2) in zip(full["model"].named_parameters(), second["model"].named_parameters()):
        if p1.requires_grad:
            assert torch.equal(p1, p2), n1


def qdora_layers(model):
    return [m for m in model.modules() if isinstance(m, QDoRALinear)]


def test_bad_data_never_touches_a_good_checkpoint(setup, tmp_path):
    out, data = tmp_path / "run", tmp_path / "data.jsonl"
    records = json.loads((setup / "data.json").read_text())
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    train(config(setup, out, data=str(data), max_steps=2))
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    metrics = (out / "metrics.jsonl").read_bytes()
    broken = dict(records[1])
    del broken["output"]
    data.write_text(json.dumps(records[0]) + "\n" + json.dumps(broken) + "\n")  # the file went bad
    with pytest.raises(DataError, match=r"data.jsonl line 2: field 'output' is missing"):
        train(config(setup, out, data=str(data), max_steps=4, resume=True))
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == before
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_existing_checkpoint_needs_resume_and_same_settings(setup, tmp_path):
    out = tmp_path / "run"
    train(config(setup, out, max_steps=2))
    with pytest.raises(FileExistsError, match="already holds a checkpoint.*pass --resume"):
        train(config(setup, out, max_steps=4))
    with pytest.raises(ValueError, match=r"--resume with different settings.*lr: 0.005 -> 0.001"):
        train(config(setup, out, max_steps=4, lr=1e-3, resume=True))


def test_a_crash_between_the_renames_of_a_checkpoint_swap_resumes_from_the_previous_one(setup, tmp_path):
    # swap_in_dir moves the old checkpoint to checkpoint.old-<pid>, then the new one in: a crash
    # between the two leaves only checkpoint.old-<pid>. --resume finds it, and the next checkpoint
    # written replaces it; a user's own checkpoint.old is never touched.
    out = tmp_path / "run"
    train(config(setup, out, max_steps=2))
    (out / "checkpoint").rename(out / "checkpoint.old-999999999")
    (out / "checkpoint.old").mkdir()
    summary = train(config(setup, out, max_steps=4, resume=True))
    assert summary["steps"] == 4 and [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    assert not (out / "checkpoint.old-999999999").exists() and (out / "checkpoint.old").is_dir()


def test_a_full_disk_at_the_end_keeps_the_adapter_and_the_last_checkpoint_and_names_the_bytes(
        setup, tmp_path, monkeypatch, capsys):
    """Through the command line: the final checkpoint does not fit; the adapter (written first, the
    smaller) is saved, the checkpoint of step 2 is kept as it was, and one line says where and how much."""
    import errno

    import qdora.train.checkpoint
    from qdora.cli import main
    real = qdora.train.checkpoint.save_file_atomic

    def fill_up(tensors, path, *args, **kw):
        state = json.loads((out / "checkpoint" / "state.json").read_text()) if (out / "checkpoint").is_dir() else {}
        if state.get("step") == 2:  # the checkpoint of step 2 is in place: the next one fills the disk
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kw)

    monkeypatch.setattr(qdora.train.checkpoint, "save_file_atomic", fill_up)
    out = tmp_path / "run"
    argv = ["train", "--model", str(setup / "model"), "--data", str(setup / "data.json"), "--r", "4", "--alpha", "8",
            "--max-steps", "4", "--save-every", "2", "--batch-size", "2", "--cutoff-len", "320", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    ckpt, adapter = re.escape(str(out / "checkpoint")), re.escape(str(out / "adapter"))
    assert re.fullmatch(rf"qdora train: error: {ckpt}: no space left on device while writing the checkpoint of "
                        r"step 4 \(it needs about [\d.,]+ MiB; [\d.,]+ MiB free there\)\. The adapter of step 4 is "
                        rf"saved in {adapter}\. The checkpoint of step 2 in {ckpt} is kept as it was\. Free some "
                        r"space, then run the same command with --resume\.", err[0]), err[0]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (out / "adapter" / "qdora_adapter.json").is_file()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    monkeypatch.setattr(qdora.train.checkpoint, "save_file_atomic", real)  # space freed: the run continues from step 2
    assert main(argv + ["--resume"]) == 0
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4


def test_epochs_set_the_steps_once_the_data_is_read(setup, tmp_path, capsys):
    # 16 examples in micro-batches of 4: 4 per epoch; 1.5 epochs with grad_accum 2 -> ceil(6 / 2) = 3 steps
    cfg = config(setup, tmp_path / "run", max_steps=100, epochs=1.5, grad_accum=2, save_every=100)
    summary = train(cfg)
    assert summary["steps"] == 3 and [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert "1.5 epoch(s) of 16 examples: 3 steps of 4 x 2" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["max_steps"], saved["epochs"]) == (3, 0.0)
    again = config(setup, tmp_path / "run", max_steps=100, epochs=1.5, grad_accum=2, save_every=100, resume=True)
    assert train(again)["steps"] == 3  # the same command plus --resume: the run is complete
    with pytest.raises(ValueError, match=r"epochs=2 and max_steps=6 both given; give one"):
        config(setup, tmp_path / "x", epochs=2)
    with pytest.raises(ValueError, match=r"epochs=-1 must be a number >= 0"):
        config(setup, tmp_path / "x", max_steps=100, epochs=-1)


def test_learning_rate_schedule():
    cfg = TrainConfig(model="m", data="d", out="o", lr=1.0, max_steps=10, warmup_steps=2, schedule="linear")
    assert [lr_at(s, cfg) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    cos = TrainConfig(model="m", data="d", out="o", lr=1.0, max_steps=10, warmup_steps=2, schedule="cosine")
    assert lr_at(2, cos) == 1.0 and lr_at(6, cos) == pytest.approx(0.5) and lr_at(10, cos) == pytest.approx(0.0)


def test_train_config_errors_are_collected():
    with pytest.raises(ValueError) as info:
        TrainConfig(model="m", data="d", out="o", method="qdor", max_steps=0, lr=-1, schedule="step")
    text = str(info.value)
    for fragment in ("method='qdor'", "max_steps=0", "lr=-1", "schedule='step'"):
        assert fragment in text
    with pytest.raises(ValueError, match="r=0 must be a positive integer"):
        TrainConfig(model="m", data="d", out="o", r=0)


def test_cli_train(setup, tmp_path):
    from qdora.cli import main
    rc = main(["train", "--model", str(setup / "model"), "--data", str(setup / "data.json"), "--method", "qlora",
               "--r", "4", "--alpha", "8", "--lr", "1e-3", "--max-steps", "2", "--batch-size", "2",
               "--out", str(tmp_path / "cli"), "--cutoff-len", "320", "--no-progress"])
    assert rc == 0 and len(read_metrics(tmp_path / "cli")) == 2
    assert (tmp_path / "cli" / "adapter" / "qdora_adapter.json").is_file()
