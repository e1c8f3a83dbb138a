"""`qdora bench loss` at a tiny shape on CPU: its rows, its oracle errors and its refusals (the GPU figures come
from scripts/gpu-check.sh's `loss` part)."""

import json

import pytest
from conftest import FP32_TOL

from qdora.cli import main


def test_bench_loss_rows_on_cpu(tmp_path, capsys):
    out = tmp_path / "loss.json"
    assert main(["bench", "loss", "--tokens", "96", "--hidden", "16", "--vocab", "101", "--reps", "1",
                 "--check-tokens", "64", "--train-head", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["whole", "torch"]
    whole, torch_ = rows
    for r in rows:
        assert r["ms"] > 0 and r["peak_bytes"] > 0
        assert r["loss_rel_err"] <= FP32_TOL and r["dh_rel_err"] <= FP32_TOL and r["dW_rel_err"] <= FP32_TOL, r
    # the whole logits: 96 x 101 fp32 logits, their log-softmax and gradient at least; the chunks hold fewer
    assert whole["peak_bytes"] >= 2 * 96 * 101 * 4
    assert "| torch |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--variants", "cce"], "liger and cce run on CUDA, the device is cpu"),
    (["--variants", "fused"], "--variants: fused; use some of whole, torch, liger, cce"),
    (["--tokens", "0"], "--tokens=0 must be >= 1"),
])
def test_bench_loss_refusals_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "loss", "--device", "cpu", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
