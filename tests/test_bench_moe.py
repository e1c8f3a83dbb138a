"""`python -m qdora.eval.bench.moe_speed` in its tiniest mode: it runs, prints both tables with a row
per expert count, and every figure is finite and positive. (Timings are never compared.)"""

from __future__ import annotations

import json
import math

import pytest

from qdora.eval.bench.moe_speed import main


def test_tiny_run_prints_both_tables_with_finite_positive_figures(tmp_path, capsys):
    out = tmp_path / "moe.json"
    # H and I are one NF4 block (64) each: the smallest the benchmark accepts (see the next test).
    assert main(["--experts", "4", "--hidden", "64", "--intermediate", "64", "--tokens", "16", "--reps", "1",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| E | k | experts routed |") == 2
    rows = [line for line in printed.splitlines() if line.startswith("| 4 | 2 | ")]
    assert len(rows) == 2  # one in (a), one in (b)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        numbers = [float(v) for c in cells for v in c.split(" / ")]
        assert all(math.isfinite(v) and v > 0 for v in numbers), row

    (res,) = json.loads(out.read_text())["results"]
    assert (res["experts"], res["top_k"], res["tokens"]) == (4, 2, 16)
    assert 1 <= res["routed"] <= 4
    assert res["forward_max_rel_diff"] <= 1e-2
    figures = [*res["step_s"].values(), *res["forward_s"].values(), *res["step_peak_bytes"].values(),
               *res["forward_peak_bytes"].values(), *res["adapter_bytes"].values(), res["nf4_bytes"]]
    assert set(res["step_s"]) == {"qdora", "qlora"}
    assert set(res["forward_s"]) == {"routed only", "dequantize all", "dequantize alone"}
    assert all(math.isfinite(v) and v > 0 for v in figures), figures
    assert all(len(v) == 1 for v in res["step_times_s"].values())


@pytest.mark.parametrize("argv, message", [
    (["--intermediate", "32"], "multiples of 64"),
    (["--experts", "4", "--top-k", "5"], "--top-k"),
    (["--reps", "0"], "--reps=0"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
