"""`qdora bench generate` runs end to end on a tiny model: every variant makes its tokens, the engine's
answers equal in-process `generate`'s, and the server part answers every client."""

import json

import pytest
from serving import make_model_dir

from qdora.eval.bench.generate import main

pytest.importorskip("uvicorn")
pytest.importorskip("peft")


@pytest.mark.slow
def test_bench_generate_reports_every_variant(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path)
    assert main(["--model", str(model_dir), "--r", "4", "--tokens", "6", "--reps", "1", "--clients", "1,3",
                 "--json", str(tmp_path / "out.json")]) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["same_tokens"] == {"QDoRA": True, "QLoRA": True}
    assert set(report["decode"]) == {"qdora engine, QDoRA", "qdora engine, QLoRA", "qdora in-process, QDoRA",
                                     "qdora in-process, QLoRA", "QDoRA merged, fp32 (transformers)",
                                     "PEFT DoRA (bnb 4-bit)", "PEFT LoRA (bnb 4-bit)"}
    assert all(v["tokens_per_s"] > 0 and len(v["times_s"]) == 1 for v in report["decode"].values())
    rows = report["server"]
    assert [(r["clients"], r["models"]) for r in rows] == [(1, "qdora"), (3, "qdora/qlora/base"), (3, "qdora")]
    assert all(r["tokens"] == 6 * r["clients"] for r in rows)  # min_tokens: every answer has its 6 tokens
    assert all(1 <= r["mean_rows_per_forward"] <= r["clients"] for r in rows)
    assert "| qdora engine, QDoRA |" in capsys.readouterr().out


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--clients '0,2': each must be >= 1"):
        main(["--model", str(tmp_path), "--clients", "0,2"])
