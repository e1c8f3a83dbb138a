import json
import os
import shutil
import subprocess
import sys

import pytest

from qdora.cli import main


def test_help_lists_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("bench", "train", "merge", "eval", "analyze", "plan", "demo"):
        assert command in out


def test_plan_needs_a_model(capsys):
    assert main(["plan"]) == 2  # here or in --config (a run's train_config.json names it)
    assert "--model is required" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("qdora", path=os.path.dirname(sys.executable))
    assert exe, "the `qdora` command is not on the PATH of this environment"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("qdora ")


@pytest.mark.slow
def test_bench_layer_runs_end_to_end(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "layer", "--shapes", "256x384", "--tokens", "64", "--reps", "2",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for row in ("| ours qdora |", "| ours qlora |", "| peft qdora |", "| peft qlora |",
                "ours qdora / ours qlora (time)", "peft qdora / ours qdora (time)"):
        assert row in out
    (res,) = json.loads(path.read_text())
    r = res["results"]
    assert r["peft qdora"]["max_abs_diff_vs_ours"] < 1e-4  # same layer, same adapter: same output
    assert all(v["median_s"] > 0 and v["peak_step_bytes"] > 0 for v in r.values())
    # Our qdora's step allocates what qlora's does plus at most one (tokens × column block) fp32
    # temporary and O(out·r) vectors; PEFT's materializes W0 + s·B·A. Byte counts are deterministic.
    tokens, out_f, rank = 64, 384, 16
    extra = r["ours qdora"]["peak_step_bytes"] - r["ours qlora"]["peak_step_bytes"]
    assert extra <= 4 * (tokens * out_f + 8 * out_f * rank)
    assert r["peft qdora"]["peak_step_bytes"] > r["ours qdora"]["peak_step_bytes"]


def test_bench_rejects_bad_shapes():
    with pytest.raises(SystemExit):
        main(["bench", "layer", "--shapes", "4096by4096"])
