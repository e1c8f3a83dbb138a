"""`qdora eval` sweeps (rank, learning rate), their item-level comparisons, the bootstrap interval of
the ΔM/ΔD fit, and runs that continue after an interruption."""

import json
import os
import signal

import numpy as np
import pytest
from test_harness import _tiny_run_files

import qdora.eval.harness.runner as harness
from qdora.data.scoring import paired_nll
from qdora.eval.harness.analyze import fit
from qdora.eval.harness.runner import HarnessConfig, RunInterrupted, main, run, run_config
from qdora.eval.harness.sweep import RunKey, compare, plan, sweep_markdown


def test_run_names_and_order():
    assert [k.name for k in plan(("qlora", "qdora"), 2, 16, 3e-4)] == [
        "qlora-seed0", "qdora-seed0", "qlora-seed1", "qdora-seed1"]
    keys = plan(("qlora", "qdora"), 1, 16, 3e-4, r_sweep=(2, 8))
    assert [k.name for k in keys] == ["qlora-r2-lr0.0003-seed0", "qdora-r2-lr0.0003-seed0",
                                      "qlora-r8-lr0.0003-seed0", "qdora-r8-lr0.0003-seed0"]
    keys = plan(("qdora",), 1, 16, 3e-4, lr_sweep=(1e-4, 1e-3))
    assert [(k.r, k.lr) for k in keys] == [(16, 1e-4), (16, 1e-3)]


def test_sweep_settings_are_checked_before_any_run():
    common = dict(model="m", train_data="d", out="o", methods=("qlora", "qdora"))
    with pytest.raises(ValueError, match=r"rank sweep \(r \[2, 4\]\) needs alpha as a multiple of r, e\.g\. --alpha"):
        HarnessConfig(r_sweep=(2, 4), **common)
    with pytest.raises(ValueError, match=r"\['full'\] cannot be swept"):
        HarnessConfig(**{**common, "methods": ("full", "qdora")}, lr_sweep=(1e-4, 1e-3))
    with pytest.raises(ValueError, match="r_sweep=0 must be a positive integer"):
        HarnessConfig(r_sweep=(0, 4), alpha_per_r=2.0, **common)


def test_each_runs_rank_alpha_and_rate():
    hc = HarnessConfig(model="m", train_data="d", out="o", methods=("qdora", "dora-half"), r_sweep=(4, 8),
                       alpha_per_r=2.0, lr=3e-4)
    cfg, _ = run_config(hc, RunKey("qdora", 0, 8, 3e-4))
    assert (cfg.r, cfg.alpha, cfg.lr) == (8, 16.0, 3e-4)
    cfg, _ = run_config(hc, RunKey("dora-half", 0, 8, 3e-4))  # DoRA†: half the rank, the same alpha/r
    assert (cfg.r, cfg.alpha) == (4, 8.0)
    cfg, _ = run_config(HarnessConfig(model="m", train_data="d", out="o", methods=("qdora",), lr_sweep=(1e-4, 1e-3)),
                        RunKey("qdora", 0, 16, 1e-3))
    assert (cfg.r, cfg.alpha, cfg.lr, cfg.keep_adapters_every) == (16, 32.0, 1e-3, 0)


@pytest.mark.parametrize("argv, message", [
    (["--r", "2,x"], "--r '2,x': expected int values"),
    (["--lr", "1e-4,1e-4"], "give one value or several different ones"),
    (["--alpha", "2r,3r"], "--alpha '2r,3r': expected a number (32) or a multiple of each run's rank (2r)"),
])
def test_sweep_options_fail_in_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "o")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_paired_nll_against_a_numpy_bootstrap():
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 20, 80)
    logp_a = -tokens * rng.uniform(1.5, 3.0, 80)
    logp_b = logp_a + tokens * rng.normal(0.3, 0.3, 80)  # b is better by about 0.3 nats per token
    p = paired_nll(logp_a.tolist(), tokens.tolist(), logp_b.tolist(), tokens.tolist())
    assert p.a == pytest.approx(-logp_a.sum() / tokens.sum()) and p.b == pytest.approx(-logp_b.sum() / tokens.sum())
    diffs = []
    for _ in range(10_000):  # an independent bootstrap: numpy's generator, a plain loop
        i = rng.integers(0, 80, 80)
        diffs.append(-logp_b[i].sum() / tokens[i].sum() + logp_a[i].sum() / tokens[i].sum())
    low, high = np.percentile(diffs, [2.5, 97.5])
    width = high - low
    assert p.ci95[0] == pytest.approx(low, abs=0.05 * width) and p.ci95[1] == pytest.approx(high, abs=0.05 * width)
    assert p.ci95[0] < p.difference < p.ci95[1] < 0
    with pytest.raises(ValueError, match="different token counts"):
        paired_nll([-1.0], [2], [-1.0], [3])


def _rows(points):
    return [{"module": m, "layer": layer, "checkpoint": c, "delta_d": x, "delta_m": y}
            for (m, layer, c), (x, y) in points.items()]


def test_fit_interval_resamples_whole_weights():
    rng = np.random.default_rng(0)
    points = {}
    for unit in range(30):
        base = rng.normal(0, 1)
        for c in range(4):
            x = base + 0.3 * c
            points[("q_proj", unit, c)] = (x, -0.5 * x + rng.normal(0, 0.5))
    rows = _rows(points)
    stats = fit(rows)
    x = np.array([r["delta_d"] for r in rows])
    y = np.array([r["delta_m"] for r in rows])
    assert stats["slope"] == pytest.approx(np.polyfit(x, y, 1)[0]) and stats["units"] == 30
    assert stats["correlation"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    slopes, corrs = [], []
    for _ in range(4000):  # the independent oracle: units drawn with numpy, numpy's fit
        units = rng.integers(0, 30, 30)
        take = np.concatenate([np.arange(4 * u, 4 * u + 4) for u in units])
        slopes.append(np.polyfit(x[take], y[take], 1)[0])
        corrs.append(np.corrcoef(x[take], y[take])[0, 1])
    for key, draws in (("slope_ci95", slopes), ("correlation_ci95", corrs)):
        low, high = np.percentile(draws, [2.5, 97.5])
        assert stats[key][0] == pytest.approx(low, abs=0.06 * (high - low))
        assert stats[key][1] == pytest.approx(high, abs=0.06 * (high - low))
    assert stats["slope_ci95"][1] < 0  # a clear negative relation stays negative
    exact = fit(_rows({("q", u, c): (u + c, 3 - 2 * (u + c)) for u in range(5) for c in range(2)}))
    assert exact["slope_ci95"] == pytest.approx((-2.0, -2.0)) and exact["correlation_ci95"] == pytest.approx((-1, -1))


def _row(method, r, seed, right, logp, tokens, lr=3e-4):
    return {"method": method, "seed": seed, "r_setting": r, "lr": lr, "variant": f"{method}-r{r}-lr{lr:g}",
            "tasks": {"t": {"acc_loglik": sum(right) / len(right), "predictions": [0 if x else 1 for x in right],
                            "answers": [0] * len(right), "answer_nll": -sum(logp) / sum(tokens),
                            "answer_logp": logp, "answer_tokens": tokens}}}


def test_sweep_table_compares_item_by_item_and_dora_at_half_rank():
    tokens = [4] * 10
    rows = [_row("qlora", 2, 0, [True] * 3 + [False] * 7, [-8.0] * 10, tokens),
            _row("qdora", 2, 0, [True] * 6 + [False] * 4, [-6.0] * 10, tokens),
            _row("qlora", 4, 0, [True] * 5 + [False] * 5, [-7.0] * 10, tokens),
            _row("qdora", 4, 0, [True] * 5 + [False] * 5, [-7.0] * 10, tokens)]
    table = sweep_markdown(rows, "t", ["qlora", "qdora"])
    assert "| 2 | 0.0003 | 0.300 | 0.600 | 2.000 | 1.500 |" in table
    c = compare([rows[0]], [rows[1]], "t")
    assert c["acc_loglik"]["diff"] == pytest.approx(0.3) and c["acc_loglik"]["improved"] == 3
    assert c["acc_loglik"]["worsened"] == 0 and c["acc_loglik"]["p"] == pytest.approx(0.25)  # 2 * 0.5**3
    assert c["answer_nll"]["diff"] == pytest.approx(-0.5) and c["answer_nll"]["ci95"] == pytest.approx((-0.5, -0.5))
    assert "| qlora r=4 lr=0.0003 | qdora r=2 lr=0.0003 | +0.1000" in table  # DoRA† at half rank vs LoRA
    two_seeds = compare([rows[0], {**rows[2], "seed": 1}], [rows[1], {**rows[3], "seed": 1}], "t")
    assert two_seeds["test"] == "paired t over seeds" and two_seeds["acc_loglik"]["diff"] == pytest.approx(0.15)


@pytest.mark.slow
def test_a_rank_sweep_end_to_end(tmp_path, capsys):
    _tiny_run_files(tmp_path, 6, chat=True)
    out = tmp_path / "sweep"
    assert main(["--model", str(tmp_path / "m"), "--train-data", str(tmp_path / "train.json"), "--chat",
                 "--methods", "qlora,qdora", "--tasks", "ARC-Easy", "--seeds", "1", "--max-steps", "2",
                 "--eval-items", "4", "--r", "2,4", "--alpha", "2r", "--no-isolate", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["r"], r["alpha"]) for r in results["runs"]] == [
        ("qlora-r2-lr0.0005", 2, 4.0), ("qdora-r2-lr0.0005", 2, 4.0),
        ("qlora-r4-lr0.0005", 4, 8.0), ("qdora-r4-lr0.0005", 4, 8.0)]
    table = (out / "results.md").read_text()
    assert "The sweep on ARC-Easy, at step 2" in table and "McNemar p" in table
    assert "| qlora r=4 lr=0.0005 | qdora r=2 lr=0.0005 |" in table
    task = results["runs"][1]["tasks"]["ARC-Easy"]
    assert len(task["answer_logp"]) == 4 and task["answer_nll"] == pytest.approx(
        -sum(task["answer_logp"]) / sum(task["answer_tokens"]))


@pytest.mark.slow
def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    """SIGTERM after step 2 of 4: the run saves its checkpoint and the invocation stops; --resume
    continues it from there, and its losses and learning curve are those of an uninterrupted run."""
    _tiny_run_files(tmp_path, 6)
    common = dict(model=str(tmp_path / "m"), train_data=str(tmp_path / "train.json"), tasks=("ARC-Easy",),
                  methods=("qdora",), seeds=1, max_steps=4, batch_size=2, cutoff_len=320, eval_items=3, r=4,
                  alpha=8, analyze=False, isolate=False, eval_every=2)
    whole = run(HarnessConfig(out=str(tmp_path / "whole"), **common))["runs"][0]
    score = harness.score_tasks

    def stop_after_step_2(*args, **kwargs):
        scores = score(*args, **kwargs)
        if not stop_after_step_2.sent:
            stop_after_step_2.sent = True
            os.kill(os.getpid(), signal.SIGTERM)  # train stops after this step, checkpoint saved
        return scores
    stop_after_step_2.sent = False
    monkeypatch.setattr(harness, "score_tasks", stop_after_step_2)
    with pytest.raises(RunInterrupted, match="stopped at step 2 of 4.*--resume to continue"):
        run(HarnessConfig(out=str(tmp_path / "cut"), **common))
    monkeypatch.setattr(harness, "score_tasks", score)
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.0005 then, 0.001 now\)"):
        run(HarnessConfig(out=str(tmp_path / "cut"), resume=True, **{**common, "lr": 1e-3}))
    other = json.loads((tmp_path / "train.json").read_text())[1:]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="other.json is not the data the run was trained on"):
        run(HarnessConfig(out=str(tmp_path / "cut"), resume=True,
                          **{**common, "train_data": str(tmp_path / "other.json")}))
    resumed = run(HarnessConfig(out=str(tmp_path / "cut"), resume=True, **common))["runs"][0]
    assert resumed["resumed"] is True
    assert resumed["loss_curve"] == whole["loss_curve"]
    assert [p["step"] for p in resumed["curve"]] == [2, 4]
    for a, b in zip(resumed["curve"], whole["curve"]):
        assert a["ARC-Easy"]["answer_nll"] == pytest.approx(b["ARC-Easy"]["answer_nll"], rel=1e-6)


def test_eval_without_resume_keeps_an_earlier_invocations_runs(tmp_path, capsys):
    # Without --resume, a folder holding runs is refused in one line before any model is read; nothing
    # in it is touched (before, the runs were deleted and run again).
    from qdora.cli import main as qdora
    runs = tmp_path / "o" / "runs"
    (runs / "qdora-r16-lr0.0003-seed0").mkdir(parents=True)
    (runs / "qdora-r16-lr0.0003-seed0.row.json").write_text('{"kept": true}\n')
    assert qdora(["eval", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"qdora eval: error: --out {tmp_path / 'o'} holds the runs of an earlier `qdora eval` "
                   "(1 finished); pass --resume to keep them and run the rest, or choose another --out "
                   f"(or delete {runs} to start over)")
    assert (runs / "qdora-r16-lr0.0003-seed0.row.json").read_text() == '{"kept": true}\n'
    assert (runs / "qdora-r16-lr0.0003-seed0").is_dir()
