import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from models import build, llama3_config, save_bpe_tokenizer

from qdora.data.examples import DEMO_DATA
from qdora.eval.harness.runner import METHODS, HarnessConfig, extract_answer, markdown, run, summarize


def _tiny_run_files(tmp_path, n: int, chat: bool = False) -> list[dict]:
    """The first `n` bundled ARC-Easy training records as `train.json`, and a tiny random Llama-3-shaped
    model `m` with a byte-level BPE tokenizer trained on them (ChatML's, with `chat`)."""
    from models import chatml_tokenizer
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:n]
    (tmp_path / "train.json").write_text(json.dumps(records))
    build(llama3_config(vocab_size=512, intermediate_size=256, max_position_embeddings=512)).save_pretrained(
        tmp_path / "m")
    corpus = [r["instruction"] + r["output"] for r in records]
    if chat:
        chatml_tokenizer(corpus).save_pretrained(tmp_path / "m")
    else:
        save_bpe_tokenizer(tmp_path / "m", corpus)
    return records


def test_answer_extraction_like_llm_adapters():
    options = ["answer1", "answer2", "answer3", "answer4"]
    assert extract_answer("the correct answer is answer3", options) == "answer3"
    assert extract_answer("answer2, or maybe answer1", options) == "answer2"  # the first one found
    assert extract_answer("I do not know", options) == ""
    assert extract_answer("the correct answer is false", ["true", "false"]) == "false"
    assert extract_answer("ending4", ["ending1", "ending2", "ending3", "ending4"]) == "ending4"


def test_math_answer_extraction():
    from qdora.eval.harness.runner import extract_number, same_number
    assert extract_number("She sold 48/2 = 24 in May, so 48 + 24 = 72 in all.") == "72"
    assert extract_number("The answer is 1,080.") == "1080"
    assert extract_number("no digits here") is None
    assert same_number("72.0", "72") and not same_number("71", "72") and not same_number(None, "1")


@pytest.mark.slow
def test_gsm8k_task_is_scored_by_final_number(tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
            for i in range(1, 9)]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build(llama3_config(vocab_size=512, intermediate_size=256, max_position_embeddings=512)).save_pretrained(
        tmp_path / "m")
    save_bpe_tokenizer(tmp_path / "m", [r["question"] + r["answer"] for r in rows])
    hc = HarnessConfig(model=str(tmp_path / "m"), train_data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "o"),
                       methods=("qdora",), tasks=("gsm8k",), data_dir=str(tmp_path), max_steps=2, batch_size=2,
                       cutoff_len=480, eval_items=3, r=4, alpha=8, math_max_new_tokens=8, isolate=False, generate=True,
                       seeds=1, analyze=False)
    task = run(hc)["runs"][0]["tasks"]["gsm8k"]
    assert task["items"] == 3 and 0 <= task["acc_generate"] <= 1 and math.isfinite(task["answer_nll"])


def test_summary_mean_and_spread():
    rows = [{"method": "m", "trainable_params": 10, "peak_rss_growth_mib": 1.0, "median_step_s": 1.0,
             "tokens_per_s": 5.0, "final_train_loss": loss, "tasks": {"t": {"acc_loglik": acc, "answer_nll": 1.0,
                                                                            "answer_ppl": math.e}}}
            for loss, acc in ((1.0, 0.5), (3.0, 0.7))]
    s = summarize(rows)["m"]
    assert s["final_train_loss"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert s["t/acc_loglik"]["mean"] == pytest.approx(0.6)
    assert "| m | 10 |" in markdown(summarize(rows), ["t"])


@pytest.mark.slow
def test_every_method_runs_with_the_same_data_order(tmp_path, monkeypatch):
    _tiny_run_files(tmp_path, 8)
    import qdora.data.examples
    import qdora.train.loop
    calls = []
    real = qdora.data.examples.batch_order
    monkeypatch.setattr(qdora.train.loop, "batch_order", lambda *a: calls.append(a) or real(*a))
    hc = HarnessConfig(model=str(tmp_path / "m"), train_data=str(tmp_path / "train.json"), out=str(tmp_path / "out"),
                       methods=tuple(METHODS), max_steps=2, batch_size=2, cutoff_len=320, eval_items=3,
                       r=4, alpha=8, generate=True, isolate=False, tasks=("ARC-Easy",), vera_r=8, seeds=1)
    result = run(hc)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["method"] for r in saved["runs"]] == list(METHODS)
    assert set(saved["summary"]) == set(METHODS)
    for r in saved["runs"]:
        assert r["trainable_params"] > 0 and math.isfinite(r["final_train_loss"]) and len(r["loss_curve"]) == 2
        t = r["tasks"]["ARC-Easy"]
        assert t["items"] == 3 and math.isfinite(t["answer_nll"]) and 0 <= t["acc_generate"] <= 1
    assert len({c for c in calls}) == 1 and len(calls) == len(METHODS)  # one order, used by every method
    by = {r["method"]: r for r in saved["runs"]}
    assert by["dora-half"]["trainable_params"] < by["dora"]["trainable_params"]
    assert by["qdora-magonly"]["trainable_params"] < by["qdora"]["trainable_params"]
    assert by["full"]["trainable_params"] > 10 * by["qdora"]["trainable_params"]
    assert by["qdora-vera"]["trainable_params"] < by["qdora"]["trainable_params"]
    assert by["qdora-vera"]["lr"] == hc.vera_lr and by["full"]["lr"] == hc.full_lr and by["qdora"]["lr"] == hc.lr
    table = (tmp_path / "out" / "results.md").read_text().split("\n\n")[0]
    assert len(table.splitlines()) == len(METHODS) + 2
    assert result["summary"].keys() == saved["summary"].keys()
    # ΔM/ΔD of seed 0's checkpoints (step 1 kept, step 2 final) for every method, q_proj and v_proj per layer
    assert set(saved["delta_md"]) == set(METHODS)
    layers = llama3_config().num_hidden_layers
    csv_rows = (tmp_path / "out" / "delta_md.csv").read_text().splitlines()[1:]
    assert len(csv_rows) == len(METHODS) * 2 * 2 * layers
    assert {tuple(r.split(",")[:2]) for r in csv_rows} == {(m, f"step {k}") for m in METHODS for k in (1, 2)}
    assert all(float(r.split(",")[4]) >= 0 and float(r.split(",")[5]) >= 0 for r in csv_rows)


def test_union_of_training_files(tmp_path):
    from qdora.data.examples import load_records
    from qdora.eval.harness.runner import union_file
    a = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:3]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n")
    path = union_file([str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")], tmp_path / "u.jsonl")
    records = load_records(path)
    assert [r.response for r in records] == [x["output"] for x in a] + ["2\n#### 2"]
    assert records[-1].label == "2"


def test_separation_is_a_paired_t_test_by_seed():
    from qdora.eval.harness.runner import separation
    nll = {("a", 0): 1.00, ("a", 1): 1.10, ("a", 2): 1.20, ("b", 0): 1.02, ("b", 1): 1.13, ("b", 2): 1.21,
           ("c", 0): 1.50, ("c", 1): 0.90, ("c", 2): 1.20}
    rows = [{"method": m, "seed": k, "tasks": {"t": {"answer_nll": v}}} for (m, k), v in nll.items()]
    pairs = {(p["a"], p["b"]): p for p in separation(rows, "t")}
    ab = pairs[("a", "b")]  # differences -0.02, -0.03, -0.01: mean -0.02, std 0.01
    assert ab["n"] == 3 and ab["mean_diff"] == pytest.approx(-0.02) and ab["std"] == pytest.approx(0.01)
    assert ab["t"] == pytest.approx(-0.02 / (0.01 / math.sqrt(3)))  # -3.46: inside t(2 dof, 97.5%) = 4.303
    assert ab["separated"] is False
    # b shifted by a constant 0.05 from a: zero spread, any shift is beyond seed noise
    rows += [{"method": "d", "seed": k, "tasks": {"t": {"answer_nll": nll[("a", k)] + 0.05}}} for k in range(3)]
    ad = {(p["a"], p["b"]): p for p in separation(rows, "t")}[("a", "d")]
    assert ad["mean_diff"] == pytest.approx(-0.05) and ad["separated"] is True
    # a single common seed: no spread, no verdict
    one = [r for r in rows if r["seed"] == 0]
    assert all(p["separated"] is None and p["n"] == 1 for p in separation(one, "t"))


@pytest.mark.slow
def test_isolated_runs_equal_in_process_runs(tmp_path):
    """A run in its own subprocess gives the same training and scores as in-process, plus its own peak."""
    _tiny_run_files(tmp_path, 6)
    common = dict(model=str(tmp_path / "m"), train_data=str(tmp_path / "train.json"), methods=("qdora-vera",),
                  tasks=("ARC-Easy",), seeds=1, max_steps=2, batch_size=2, cutoff_len=320, eval_items=3, r=4,
                  alpha=8, vera_r=8, analyze=False)
    inproc = run(HarnessConfig(out=str(tmp_path / "a"), isolate=False, **common))["runs"][0]
    isolated = run(HarnessConfig(out=str(tmp_path / "b"), isolate=True, **common))["runs"][0]
    assert isolated["loss_curve"] == pytest.approx(inproc["loss_curve"], rel=1e-5)
    assert isolated["tasks"]["ARC-Easy"]["answer_nll"] == pytest.approx(inproc["tasks"]["ARC-Easy"]["answer_nll"],
                                                                       rel=1e-5)
    assert isolated["peak_rss_mib"] > 0 and isolated["trainable_params"] == inproc["trainable_params"]
    with pytest.raises(ValueError, match="learning rates must be positive"):
        HarnessConfig(out="x", vera_lr=0, **common)


def test_separation_uses_the_student_t_quantile_of_any_number_of_seeds():
    from scipy import stats

    from qdora.eval.harness.runner import separation
    # 12 seeds, differences with t = 2.1: beyond the normal 1.96, inside t(11 dof, 97.5%) = 2.201.
    base = [0.3, -0.1, 0.2, 0.0, 0.1, -0.2, 0.25, 0.05, -0.05, 0.15, -0.15, 0.1]
    mean, sd = statistics.fmean(base), statistics.stdev(base)
    shift = 2.1 * sd / math.sqrt(12) - mean
    rows = [{"method": "a", "seed": k, "tasks": {"t": {"answer_nll": 1.0 + d + shift}}} for k, d in enumerate(base)]
    rows += [{"method": "b", "seed": k, "tasks": {"t": {"answer_nll": 1.0}}} for k in range(12)]
    (pair,) = separation(rows, "t")
    assert pair["n"] == 12 and pair["t"] == pytest.approx(2.1) and 1.96 < 2.1 < stats.t.ppf(0.975, 11)
    assert pair["separated"] is False


def test_run_child_reports_output_peak_memory_and_failure():
    """The one subprocess runner: captured output, the child's own peak RSS (a 200 MB buffer shows),
    a failure naming what failed with its stderr, and a timeout that stops the child."""
    from qdora.eval.common import run_child
    child = run_child(["-c", "import sys; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); "
                             "print('hello'); print('note', file=sys.stderr)"], "a test child", capture=True)
    assert child.stdout == "hello\n" and child.stderr == "note\n"
    assert 200 << 20 <= child.peak_rss_bytes < 2 << 30
    with pytest.raises(RuntimeError, match=r"(?s)a failing child failed \(exit code 3\).*boom"):
        run_child(["-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], "a failing child", capture=True)
    with pytest.raises(RuntimeError, match=r"a slow child failed \(stopped after 0.5 s\)"):
        run_child(["-c", "import time; time.sleep(30)"], "a slow child", timeout=0.5)


@pytest.mark.slow
def test_learning_curve_and_resume(tmp_path, capsys):
    """--eval-every scores the tasks on the model being trained (its last point is the final score,
    and the curve does not change the run); --resume keeps finished runs and runs the rest."""
    _tiny_run_files(tmp_path, 6)
    common = dict(model=str(tmp_path / "m"), train_data=str(tmp_path / "train.json"), tasks=("ARC-Easy",),
                  seeds=1, max_steps=4, batch_size=2, cutoff_len=320, eval_items=3, r=4, alpha=8, analyze=False,
                  isolate=False)
    plain = run(HarnessConfig(out=str(tmp_path / "plain"), methods=("qdora",), **common))["runs"][0]
    curved = run(HarnessConfig(out=str(tmp_path / "curve"), methods=("qdora",), eval_every=2, **common))["runs"][0]
    assert [c["step"] for c in curved["curve"]] == [2, 4]
    assert curved["loss_curve"] == plain["loss_curve"]  # scoring in between changes nothing
    end = curved["curve"][-1]["ARC-Easy"]["answer_nll"]
    assert end == pytest.approx(curved["tasks"]["ARC-Easy"]["answer_nll"], rel=1e-6)
    assert end == pytest.approx(plain["tasks"]["ARC-Easy"]["answer_nll"], rel=1e-5)
    assert curved["curve"][0]["ARC-Easy"]["answer_nll"] != end
    capsys.readouterr()
    again = run(HarnessConfig(out=str(tmp_path / "curve"), methods=("qdora", "qlora"), eval_every=2, resume=True,
                              **common))
    out = capsys.readouterr().out
    assert "qdora-seed0: kept from" in out and "qlora-seed0\n" in out
    assert again["runs"][0]["loss_curve"] == curved["loss_curve"] and again["runs"][1]["method"] == "qlora"


@pytest.mark.slow
def test_chat_option_scoring(tmp_path):
    """--chat trains on the multiple-choice records as chat (option text as the reply) and scores the
    held-out items as qdora demo does; the scores are those of qdora.data.scoring on the trained model."""
    from qdora.eval.harness.tasks import record_choice, test_records
    records = _tiny_run_files(tmp_path, 6, chat=True)
    result = run(HarnessConfig(model=str(tmp_path / "m"), train_data=str(tmp_path / "train.json"),
                               out=str(tmp_path / "out"), methods=("qdora",), tasks=("ARC-Easy",), seeds=1,
                               max_steps=2, batch_size=2, eval_items=5, r=4, alpha=8, analyze=False, isolate=False,
                               chat=True))
    first = json.loads((tmp_path / "out" / "train_chat.jsonl").read_text().splitlines()[0])
    item = record_choice(test_records("ARC-Easy", None, 1)[0])
    assert item.options[item.answer] == "Sunlight is the source of energy for nearly all ecosystems."
    assert first["messages"][1]["content"] in records[0]["instruction"] and first["messages"][0]["role"] == "user"
    task = result["runs"][0]["tasks"]["ARC-Easy"]
    assert task["items"] == 5 and 0 <= task["acc_loglik"] <= 1 and math.isfinite(task["answer_nll"])
    assert all(0 <= p < 4 for p in task["predictions"])
    import qdora
    from qdora.data.scoring import score_chat_choices
    model, tok = qdora.load_model(tmp_path / "m", method="qdora", cfg=qdora.AdapterConfig(r=4, alpha=8),
                                  progress=False)
    qdora.load_adapter(model, tmp_path / "out" / "runs" / "qdora-seed0" / "adapter", verbose=False)
    again = score_chat_choices(model, tok, [record_choice(r) for r in test_records("ARC-Easy", None, 5)])
    assert again.predictions == task["predictions"]
    assert again.answer_nll == pytest.approx(task["answer_nll"], rel=1e-4)


def test_curve_table_means_and_paired_differences():
    from qdora.eval.harness.comparison import curve_markdown
    rows = [{"method": m, "seed": s, "curve": [{"step": 50, "T": {"acc_loglik": a, "answer_nll": n}}]}
            for m, s, a, n in [("qdora", 0, 0.60, 2.0), ("qdora", 1, 0.70, 2.2), ("qlora", 0, 0.50, 2.1),
                               ("qlora", 1, 0.55, 2.3)]]
    table = curve_markdown(rows, "T")
    assert "| 50 | 0.650 ± 0.071 | 0.525 ± 0.035 | 2.100 ± 0.141 | 2.200 ± 0.141 |" in table
    # differences +0.10 and +0.15: mean +0.125, std 0.0354, t = 0.125 / (0.0354 / sqrt 2) = 5.0
    assert "| 50 | +0.125 | +0.10, +0.15 | +5.0 |" in table
    assert curve_markdown([{"method": "a", "seed": 0}], "T") == ""



def _parent_of(child: str) -> str:
    """A parent process's code: `run_child` on `child` (Python code), exiting 128 + the signal that
    stopped it, after saying which."""
    return ("import sys\n"
            "from qdora.eval.common import Stopped, run_child\n"
            "try:\n"
            f"    run_child(['-c', {child!r}], 'the child')\n"
            "except Stopped as stop:\n"
            "    print('parent: stopped by', stop.signum, flush=True)\n"
            "    sys.exit(128 + stop.signum)\n")

def test_a_signal_to_the_parent_reaches_its_child_which_ends_with_it(tmp_path):
    # `qdora eval` runs each run in a child (run_child). SIGTERM to the parent used to kill the parent
    # alone, leaving the child training on; now it is passed on, the child ends (a training child
    # writes its checkpoint), and the parent then stops.
    child = ("import signal, sys, time, pathlib\n"
             f"out = pathlib.Path({str(tmp_path)!r})\n"
             "def stop(signum, frame):\n"
             "    (out / 'child-stopped').write_text(signal.Signals(signum).name)\n"
             "    sys.exit(3)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "(out / 'child.pid').write_text(str(__import__('os').getpid()))\n"
             "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", _parent_of(child)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "child.pid").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the child did not start"
        time.sleep(0.1)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "parent: stopped by 15" in out
    assert (tmp_path / "child-stopped").read_text() == "SIGTERM"
    pid = int((tmp_path / "child.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def _start_parent_of_a_ticking_child(tmp_path) -> tuple[subprocess.Popen, int]:
    """A process that runs `run_child` on a child appending to `ticks` every 50 ms (SIGHUP at its
    default, whatever this process has); returns it and the child's pid once the child ticks."""
    child = ("import os, pathlib, time\n"
             f"out = pathlib.Path({str(tmp_path)!r})\n"
             "(out / 'child.pid').write_text(str(os.getpid()))\n"
             "while True:\n"
             "    with open(out / 'ticks', 'a') as f:\n"
             "        f.write('.')\n"
             "    time.sleep(0.05)\n")
    parent = "import signal\nsignal.signal(signal.SIGHUP, signal.SIG_DFL)\n" + _parent_of(child)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ticks").exists():  # (the child shares the parent's stdout pipe)
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()  # leave nothing behind (a child already started dies with it: its death signal)
            pytest.fail("the child did not start")
        time.sleep(0.05)
    return proc, int((tmp_path / "child.pid").read_text())


def _assert_gone_and_silent(pid: int, ticks: Path) -> None:
    """Within 10 s the process `pid` has ended (gone, or a zombie no one has reaped yet), and then
    `ticks` grows no more."""
    def alive():
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
    deadline = time.monotonic() + 10
    while alive():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # leave nothing behind
            pytest.fail(f"the child {pid} outlived its parent")
        time.sleep(0.05)
    size = ticks.stat().st_size
    time.sleep(0.3)
    assert ticks.stat().st_size == size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guarantee is Linux's (prctl)")
def test_a_child_dies_with_a_parent_killed_by_sigkill(tmp_path):
    proc, pid = _start_parent_of_a_ticking_child(tmp_path)
    proc.kill()  # no handler runs: the kernel's parent-death signal must end the child
    proc.wait(timeout=60)
    _assert_gone_and_silent(pid, tmp_path / "ticks")


def test_sighup_to_the_parent_stops_its_child_like_sigterm(tmp_path):
    # A closed terminal or a dropped SSH session sends SIGHUP to the parent alone (the child has a
    # process group of its own): the parent passes it on as SIGTERM, waits, and stops.
    proc, pid = _start_parent_of_a_ticking_child(tmp_path)
    proc.send_signal(signal.SIGHUP)
    try:
        proc.wait(timeout=60)
    finally:
        _assert_gone_and_silent(pid, tmp_path / "ticks")
    out = proc.stdout.read()
    assert proc.returncode == 128 + signal.SIGHUP and f"parent: stopped by {int(signal.SIGHUP)}" in out


def _eval_cli(tmp_path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`qdora eval` of qdora on the tiny model, one seed, one step, in a process of its own."""
    _tiny_run_files(tmp_path, 4)
    args = ["eval", "--model", str(tmp_path / "m"), "--train-data", str(tmp_path / "train.json"), "--methods",
            "qdora", "--tasks", "ARC-Easy", "--seeds", "1", "--max-steps", "1", "--batch-size", "2", "--eval-items",
            "2", "--r", "4", "--alpha", "8", "--no-analyze", "--out", str(tmp_path / "out"), *extra]
    return subprocess.run([sys.executable, "-m", "qdora.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_a_user_error_in_an_isolated_run_is_one_line(tmp_path):
    # The run's process finds that no example keeps a target token within 4 tokens: one line, not
    # its traceback and then the parent's.
    done = _eval_cli(tmp_path, "--cutoff-len", "4")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("qdora eval: error: qdora-seed0: ") and "raise --cutoff-len" in done.stderr


@pytest.mark.slow
def test_a_bug_in_an_isolated_run_shows_its_traceback_once(tmp_path):
    # A bug (here: an unexpected exception in the run's process, planted before the runner imports
    # `train`) keeps its traceback, shown once.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "if '--run-one' in sys.argv:\n"
        "    import qdora.train.loop\n"
        "    def bug(*args, **kwargs):\n"
        "        raise KeyError('a planted bug')\n"
        "    qdora.train.loop.train = bug\n")
    done = _eval_cli(tmp_path, env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("Traceback") == 1 and "KeyError: 'a planted bug'" in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith("qdora eval: error: qdora-seed0 failed (exit code 1)")


@pytest.mark.slow
def test_a_dpo_comparison_reports_the_held_out_pairs(tmp_path):
    """--objective dpo: pairs made from the training records (correct option chosen), the held-out pairs from
    the task's test items; each run's reward accuracy and margin are its last validation's."""
    _tiny_run_files(tmp_path, 6, chat=True)
    result = run(HarnessConfig(model=str(tmp_path / "m"), train_data=str(tmp_path / "train.json"),
                               out=str(tmp_path / "out"), methods=("qlora", "qdora"), tasks=("ARC-Easy",), seeds=2,
                               max_steps=2, batch_size=2, eval_items=4, r=4, alpha=8, analyze=False, isolate=False,
                               chat=True, objective="dpo", beta=0.1, cutoff_len=512))
    pairs = [json.loads(line) for line in (tmp_path / "out" / "val_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 4 and pairs[0]["chosen"][0]["content"] != pairs[0]["rejected"][0]["content"]
    for row in result["runs"]:
        metrics = [json.loads(line) for line in
                   (tmp_path / "out" / "runs" / f"{row['method']}-seed{row['seed']}" / "metrics.jsonl").read_text()
                   .splitlines()]
        assert row["tasks"]["pairs"]["reward_accuracy"] == metrics[-1]["val_rewards/accuracies"]
        # fp32's log 2 is within an ulp (6e-8) of it
        assert metrics[0]["rewards/chosen"] == 0.0 and metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "held-out reward accuracy" in table and "Pairwise, the held-out pairs' reward accuracy" in table


def test_a_preference_comparison_needs_chat_records(tmp_path):
    with pytest.raises(ValueError, match="makes its pairs from multiple-choice records: add --chat"):
        HarnessConfig(model="m", train_data="t.json", out=str(tmp_path), objective="dpo", tasks=("ARC-Easy",))
