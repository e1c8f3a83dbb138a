"""`qdora train --objective dpo|simpo`: at the first step every DPO reward is exactly 0 and the loss log 2 for
every method (the reference is the model before fine-tuning: adapters off, or a frozen copy for full), the
reference precomputed or live gives the same run, a resumed run replays the uninterrupted one, validation
reports reward accuracy and margins, and bad input is refused in one line before any work."""

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
from serving import make_model_dir

from qdora.data.records import DataError
from qdora.train.config import TrainConfig
from qdora.train.loop import read_metrics, train

PAIRS = [{"prompt": "What is the capital of France?", "chosen": " Paris is the capital.", "rejected": " The sky."},
         {"prompt": "Name a fruit:", "chosen": " apple, pear, plum.", "rejected": " one two three"},
         {"prompt": "Count: one two", "chosen": " three four five", "rejected": " green grass"},
         {"prompt": "The sky is", "chosen": " blue.", "rejected": " Paris."},
         {"prompt": "The grass is", "chosen": " green.", "rejected": " seven eight"},
         {"prompt": "Count: six", "chosen": " seven eight nine ten", "rejected": " apple"}]
CHAT = [{"prompt": [{"role": "user", "content": p["prompt"]}],
         "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in PAIRS]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    (root / "sft.jsonl").write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    return make_model_dir(root), root


def cfg(files, out, **kw):
    model_dir, root = files
    base = dict(model=str(model_dir), data=str(root / "pairs.jsonl"), out=str(out), objective="dpo", max_steps=3,
                batch_size=2, cutoff_len=64, lr=1e-3, dropout=0.0, progress=False, r=4, alpha=8, save_every=50)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["qdora", "qlora", "dora", "lora", "full"])
def test_the_first_step_is_log_2_with_zero_rewards_for_every_method(files, tmp_path, method):
    train(cfg(files, tmp_path / method, method=method, max_steps=2, lr=1e-4 if method == "full" else 1e-3))
    first, second = read_metrics(tmp_path / method)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)  # fp32's log 2: within an ulp (6e-8) of it
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    assert second["rewards/margins"] != 0.0  # the policy moved away from its reference


def test_chat_pairs_and_validation_metrics(files, tmp_path):
    _, root = files
    train(cfg(files, tmp_path / "c", data=str(root / "chat.jsonl"), val_split=0.34, eval_every=1, max_steps=2))
    rows = read_metrics(tmp_path / "c")
    assert all({"val_loss", "val_rewards/accuracies", "val_rewards/margins"} <= set(r) for r in rows)
    assert 0.0 <= rows[-1]["val_rewards/accuracies"] <= 1.0
    assert (tmp_path / "c" / "adapter").is_dir()


def test_a_precomputed_reference_gives_the_live_references_run(files, tmp_path):
    for method in ("qdora", "full"):
        train(cfg(files, tmp_path / f"live-{method}", method=method, lr=1e-4))
        train(cfg(files, tmp_path / f"pre-{method}", method=method, lr=1e-4, precompute_reference=True))
        live, pre = read_metrics(tmp_path / f"live-{method}"), read_metrics(tmp_path / f"pre-{method}")
        # The same reference sums, taken over other batches (precompute groups pairs its own way, so the padding
        # and the matmul shapes differ): fp32 rounding only, 6e-7 relative measured here (5 ulps of 1.19e-7);
        # 1e-5 leaves a margin for other CPUs' BLAS kernels.
        assert [r["loss"] for r in pre] == pytest.approx([r["loss"] for r in live], rel=1e-5, abs=1e-6)
        saved = json.loads((tmp_path / f"pre-{method}" / "reference_logps.json").read_text())
        assert len(saved) == len(PAIRS) and all(len(s) == 2 and s[0] < 0 for s in saved)


def test_pairs_train_without_a_padding_mask_as_with_it(files, tmp_path, monkeypatch, sdpa_calls):
    """Chosen and rejected replies of different lengths, right-padded into one batch: the model gets no attention
    mask (`unmasked_right_padding`), the run log says so, and the run equals the same run given the mask (swapped
    back by the test): the same sums, fp32 rounding."""
    from qdora.models import packed_attention
    from qdora.train.run_log import RUN_LOG

    masks = []
    original = packed_attention.unmasked_right_padding

    def recorded(model):
        masks.append(original(model))
        return masks[-1]

    monkeypatch.setattr(packed_attention, "unmasked_right_padding", recorded)
    train(cfg(files, tmp_path / "unmasked", val_split=0.34, eval_every=3))
    assert masks == [True] and sdpa_calls and not any(masked for _, masked in sdpa_calls)
    assert any(line.startswith("padding: rows padded on the right go to the model without an attention mask")
               for line in (tmp_path / "unmasked" / RUN_LOG).read_text().splitlines())
    monkeypatch.setattr(packed_attention, "unmasked_right_padding", lambda model: False)
    sdpa_calls.clear()
    train(cfg(files, tmp_path / "masked", val_split=0.34, eval_every=3))
    assert any(masked for _, masked in sdpa_calls)
    ours, theirs = read_metrics(tmp_path / "unmasked"), read_metrics(tmp_path / "masked")
    keys = ("loss", "rewards/chosen", "rewards/rejected", "val_loss", "val_rewards/margins")
    assert len(ours) == 3 and "val_loss" in ours[-1] and ours[-1]["rewards/margins"] != 0.0
    # fp32 rounding of the same sums (SDPA's causal kernel against its masked one), as the precomputed-reference test
    # above: rel 1e-5 is ~80 ulps of fp32 (1.19e-7); abs 1e-6 for the rewards, which start at 0
    for a, b in zip(ours, theirs):
        assert sorted(a) == sorted(b)
        assert [a[k] for k in keys if k in b] == pytest.approx([b[k] for k in keys if k in b], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("objective, extra", [("dpo", {}), ("dpo", {"precompute_reference": True}),
                                              ("dpo", {"method": "full", "precompute_reference": True, "lr": 1e-4}),
                                              ("simpo", {"beta": 2.0})])
def test_resume_replays_the_uninterrupted_run(files, tmp_path, objective, extra):
    whole = tmp_path / "whole"
    train(cfg(files, whole, objective=objective, max_steps=4, **extra))
    part = tmp_path / "part"

    def interrupt(step, _):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would

    assert train(cfg(files, part, objective=objective, max_steps=4, **extra), on_step=interrupt)["steps"] == 2
    train(cfg(files, part, objective=objective, max_steps=4, resume=True, **extra))
    a, b = read_metrics(whole), read_metrics(part)
    keys = ("loss", "rewards/chosen", "rewards/rejected", "grad_norm")
    assert [[r[k] for k in keys] for r in b] == [[r[k] for k in keys] for r in a]


def test_simpo_needs_no_reference(files, tmp_path):
    train(cfg(files, tmp_path / "s", objective="simpo", beta=2.0, simpo_gamma=0.5, max_steps=2))
    first = read_metrics(tmp_path / "s")[0]
    assert first["rewards/chosen"] < 0 and first["loss"] > 0  # β·(mean log-prob of the reply): no reference


@pytest.mark.parametrize("kw, words", [
    ({"objective": "dpo", "data": "SFT"}, "needs preference pairs (prompt, chosen, rejected)"),
    ({"objective": "sft"}, "holds preference pairs"),
    ({"beta": 0}, "beta=0 must be a number > 0"),
    ({"packing": True}, "packing is not supported with it"),
    ({"dpo_loss": "hinge"}, "dpo_loss='hinge' is unknown"),
    ({"objective": "simpo", "precompute_reference": True}, "precompute_reference=True needs objective='dpo'"),
    ({"objective": "orpo"}, "objective='orpo' is unknown"),
])
def test_bad_input_is_refused_before_any_work(files, tmp_path, kw, words):
    _, root = files
    if kw.get("data") == "SFT":
        kw = {**kw, "data": str(root / "sft.jsonl")}
    with pytest.raises((ValueError, DataError), match=re.escape(words)):
        train(cfg(files, tmp_path / "bad", **kw))
    assert not (tmp_path / "bad").exists()


def test_the_command_line_says_it_in_one_line(files, tmp_path):
    model_dir, root = files
    r = subprocess.run([sys.executable, "-m", "qdora.cli", "train", "--model", str(model_dir), "--data",
                        str(root / "sft.jsonl"), "--out", str(tmp_path / "o"), "--objective", "dpo"],
                       capture_output=True, text=True, timeout=300, env={"QDORA_ALLOCATOR": "system",
                                                                          "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs preference pairs" in r.stderr, r.stderr



def test_csv_and_tensorboard_carry_the_rewards(files, tmp_path):
    pytest.importorskip("tensorboard")
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(cfg(files, tmp_path / "r", max_steps=2, val_split=0.34, report_to=("csv", "tensorboard")))
    rows = list(csv.DictReader((tmp_path / "r" / "metrics.csv").read_text().splitlines()))
    assert float(rows[0]["rewards/chosen"]) == 0.0 and rows[-1]["val_rewards/accuracies"] != ""
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    assert {"train/rewards/margins", "eval/rewards/accuracies", "train/loss"} <= set(events.Tags()["scalars"])
