"""A run that goes wrong stops clearly and loses nothing, through the real command line: non-finite
training, errors before any slow work (one line, exit status 2), corrupt checkpoints, moved runs,
the adapter format, and a quiet start."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import build, llama3_config, save_bpe_tokenizer
from safetensors.torch import load_file, save_file

from qdora.cli import main
from qdora.core.safetensors_io import NonFiniteTensorError, save_file_atomic
from qdora.data.examples import DEMO_DATA
from qdora.train.loop import read_metrics

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:16]
    (root / "data.json").write_text(json.dumps(records))
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    build(llama3_config(vocab_size=512, intermediate_size=256, max_position_embeddings=512)).save_pretrained(
        root / "model")
    save_bpe_tokenizer(root / "model", [r["instruction"] + " " + r["output"] for r in records])
    return root


def train_args(setup, out, *extra):
    return ["train", "--model", str(setup / "model"), "--data", str(setup / "data.json"), "--out", str(out),
            "--r", "4", "--alpha", "8", "--max-steps", "2", "--batch-size", "2", "--cutoff-len", "320",
            "--no-progress", *extra]


def run_cli(capsys, args):
    """`qdora <args>` in this process: (exit status, stderr)."""
    rc = main(args)
    return rc, capsys.readouterr().err


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything starts loading a model: the error must come before that."""
    import qdora.models.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(qdora.models.loading, "load_model", refuse)
    monkeypatch.setattr(qdora.models.loading, "resolve_checkpoint", refuse)


def strict_json_lines(path):
    """Each line parsed as strict JSON: NaN and Infinity are refused, as other JSON readers do."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line]


# ---- non-finite training ---------------------------------------------------------------------

def test_a_diverging_run_stops_keeps_its_last_checkpoint_and_writes_valid_json(setup, tmp_path, capsys):
    out = tmp_path / "run"
    # QLoRA at lr 1e30: step 1 is finite and moves the adapters by ~1e30, step 2's loss is NaN.
    rc, err = run_cli(capsys, train_args(setup, out, "--method", "qlora", "--lr", "1e30", "--max-steps", "4",
                                         "--save-every", "1", "--warmup-steps", "0"))
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qdora train: error: step 2: the loss is nan"), err
    assert "lower --lr (this run: 1e+30" in lines[0] and "checkpoint of step 1" in lines[0]
    metrics = strict_json_lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[1]["loss"] is None and "error" in metrics[1]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1  # the last good one
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint" / "trainable.safetensors").values())
    assert not (out / "adapter").exists()


def test_a_step_that_makes_a_tensor_infinite_saves_nothing(setup, tmp_path, capsys):
    out = tmp_path / "run"
    # lr 1e38: AdamW's first step (lr / (1 - 0.9)) overflows fp32 and the adapters become infinite.
    rc, err = run_cli(capsys, train_args(setup, out, "--lr", "1e38", "--save-every", "1", "--warmup-steps", "0"))
    assert rc == 1 and err.count("\n") == 1
    assert re.search(r"step 1: after the optimizer step \d+ trained tensor\(s\) hold non-finite values \(e.g. "
                     r"model\.layers\.\d+\.\S+: [\d,]+\) at learning rate 1e\+38; they were not saved", err), err
    assert not (out / "checkpoint").exists() and not (out / "adapter").exists()
    strict_json_lines(out / "metrics.jsonl")


def test_a_saturated_run_warns_that_nothing_learns(setup, tmp_path, capsys):
    # QDoRA at lr 1e30 on the tiny model: the normalized direction keeps the loss finite, the
    # outputs saturate and from step 2 the gradient is exactly 0.
    rc, err = run_cli(capsys, train_args(setup, tmp_path / "run", "--lr", "1e30", "--max-steps", "4",
                                         "--warmup-steps", "0"))
    assert rc == 0
    warnings = [line for line in err.splitlines() if line.startswith("qdora train: warning:")]
    assert len(warnings) == 1 and "step 2: the gradient norm is exactly 0" in warnings[0], err
    metrics = strict_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert [len(m.get("warnings", [])) for m in metrics] == [0, 1, 0, 0]


def test_a_run_without_clipping_reports_its_gradient_norm(setup, tmp_path, capsys):
    rc, _ = run_cli(capsys, train_args(setup, tmp_path / "run", "--max-grad-norm", "0"))
    assert rc == 0
    assert all(m["grad_norm"] > 0 for m in strict_json_lines(tmp_path / "run" / "metrics.jsonl"))


def test_a_zero_gradient_and_a_uniform_guess_warn_once(setup, tmp_path):
    from qdora.train.health import UNIFORM_STEPS, Health
    health = Health(vocab_size=512)
    uniform = float(torch.tensor(512.0).log())
    warned = [health.check(step, uniform, 0.0 if step > 1 else 1.0, 1e9) for step in range(1, 8)]
    kinds = [[("gradient norm is exactly 0" in w, "guesses uniformly" in w) for w in ws] for ws in warned]
    assert kinds[1] == [(True, False)]  # step 2: the first zero norm
    assert kinds[UNIFORM_STEPS - 1] == [(False, True)]  # after UNIFORM_STEPS steps at ln(512)
    assert sum(len(ws) for ws in warned) == 2  # each once
    assert Health(vocab_size=512).check(1, uniform + 0.5, 1.0, 1e-4) == []


def test_merge_refuses_a_non_finite_adapter_by_name(setup, tmp_path, capsys):
    assert main(train_args(setup, tmp_path / "run")) == 0
    weights = tmp_path / "run" / "adapter" / "adapter.safetensors"
    tensors = load_file(weights)
    name = sorted(k for k in tensors if k.endswith("lora_B"))[3]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "qdora"})  # safetensors' own writer: ours refuses NaN
    rc, err = run_cli(capsys, ["merge", "--model", str(setup / "model"), "--adapter",
                               str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "merged"), "--check"])
    assert rc == 2 and err.count("\n") == 1
    assert f"tensor '{name}'" in err and "1 non-finite value" in err and "diverged" in err
    assert not (tmp_path / "merged").exists()


def test_no_file_is_written_with_a_non_finite_tensor(tmp_path):
    with pytest.raises(NonFiniteTensorError, match=r"x.safetensors: not written: tensor 'b' \(2, 3\) has 1 non"):
        save_file_atomic({"a": torch.ones(2), "b": torch.tensor([[0.0, 1.0, float("inf")], [1, 2, 3]])},
                         tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
    save_file_atomic({"ids": torch.arange(3)}, tmp_path / "ints.safetensors")  # integers cannot be non-finite


# ---- errors before work, one line --------------------------------------------------------------

@pytest.mark.parametrize("case", ["out is a file", "model missing", "data missing", "r=0", "alpha=nan",
                                  "malformed jsonl", "resume with nothing"])
def test_user_errors_are_one_line_and_come_before_loading(setup, tmp_path, capsys, no_model_loading, case):
    out = tmp_path / "out"
    args = train_args(setup, out)
    expected = {
        "out is a file": "--out .* is an existing file, not a folder",
        "model missing": "model not found: .*nowhere",
        "data missing": "nowhere.json: file not found",
        "r=0": "r=0 must be a positive integer",
        "alpha=nan": "alpha=nan must be a positive number",
        "malformed jsonl": r"bad.jsonl line 2, column \d+: invalid JSON",
        "resume with nothing": "--resume: .* holds no checkpoint to continue; run the same command without --resume",
    }[case]
    if case == "out is a file":
        out.write_text("not a folder")
    elif case == "model missing":
        args[args.index("--model") + 1] = str(tmp_path / "nowhere")
    elif case == "data missing":
        args[args.index("--data") + 1] = str(tmp_path / "nowhere.json")
    elif case == "r=0":
        args[args.index("--r") + 1] = "0"
    elif case == "alpha=nan":
        args[args.index("--alpha") + 1] = "nan"
    elif case == "malformed jsonl":
        (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
        args[args.index("--data") + 1] = str(tmp_path / "bad.jsonl")
    elif case == "resume with nothing":
        args.append("--resume")
    rc, err = run_cli(capsys, args)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("qdora train: error: "), err
    assert re.search(expected, err), err


def test_a_target_that_matches_nothing_fails_before_the_weights_are_read(setup, tmp_path, capsys, monkeypatch):
    from qdora.models.loading import CheckpointModel
    monkeypatch.setattr(CheckpointModel, "fill", lambda *a, **k: pytest.fail("weights read before the check"))
    rc, err = run_cli(capsys, train_args(setup, tmp_path / "out", "--target-modules", "q_proj,qq_proj"))
    assert rc == 2 and err.count("\n") == 1, err
    assert "target 'qq_proj' matches no linear module" in err and "leaf names: " in err


def test_an_unwritable_out_fails_before_loading(setup, tmp_path, capsys, no_model_loading):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(read_only)],
                             capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("needs a read-only mount (mount failed) or a non-root user")
        read_only.chmod(0o555)
    try:
        for command in (train_args(setup, read_only / "run"),
                        ["merge", "--model", str(setup / "model"), "--adapter", str(tmp_path), "--out",
                         str(read_only / "merged")]):
            rc, err = run_cli(capsys, command)
            assert rc == 2 and err.count("\n") == 1, err
            assert "--out" in err, err
            assert "read-only file system" in err.lower() or "permission denied" in err.lower(), err
    finally:
        if mounted:
            subprocess.run(["umount", str(read_only)], check=True)


@pytest.mark.parametrize("where", ["run", "model"])
def test_merge_never_replaces_its_own_inputs(setup, tmp_path, capsys, no_model_loading, where):
    # `--out RUN --overwrite` with the adapter in RUN/adapter, or `--out` the base model's folder:
    # refused in one line before anything is read, with every input left as it was.
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"kept")
    (run / "metrics.jsonl").write_text("{}\n")
    model = tmp_path / "model"
    shutil.copytree(setup / "model", model)
    out, flag, path = (run, "--adapter", run / "adapter") if where == "run" else (model, "--model", model)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, err = run_cli(capsys, ["merge", "--model", str(model), "--adapter", str(run / "adapter"), "--out", str(out),
                               "--overwrite"])
    assert rc == 2
    verb = "holds" if where == "run" else "is"
    assert err.strip() == (f"qdora merge: error: --out {out} {verb} {flag} {path}: writing there would replace "
                           "this command's own input; choose another --out folder")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == b"kept"


def test_merge_checks_its_output_before_loading(setup, tmp_path, capsys, no_model_loading):
    (tmp_path / "exists").mkdir()
    (tmp_path / "file").write_text("x")
    for out, expected in (("exists", "exists; pass --overwrite"), ("file", "is an existing file")):
        rc, err = run_cli(capsys, ["merge", "--model", str(setup / "model"), "--adapter", str(tmp_path / "none"),
                                   "--out", str(tmp_path / out)])
        assert rc == 2 and expected in err and err.count("\n") == 1, err
    rc, err = run_cli(capsys, ["merge", "--model", str(setup / "model"), "--adapter", str(tmp_path / "none"),
                               "--out", str(tmp_path / "new")])
    assert rc == 2 and "adapter folder not found" in err


def test_a_corrupt_checkpoint_names_its_file_and_the_way_out(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(train_args(setup, out)) == 0
    trainable = out / "checkpoint" / "trainable.safetensors"
    trainable.write_bytes(trainable.read_bytes()[: trainable.stat().st_size // 2])
    import qdora.models.loading
    monkeypatch.setattr(qdora.models.loading, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    rc, err = run_cli(capsys, train_args(setup, out, "--resume", "--max-steps", "4"))
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{trainable}: corrupt or truncated safetensors file" in err
    assert f"delete {out / 'checkpoint'}" in err


def test_debug_shows_the_traceback_and_errors_are_one_line_otherwise(tmp_path):
    exe = shutil.which("qdora", path=os.path.dirname(sys.executable))
    args = [exe, "train", "--model", str(tmp_path / "nowhere"), "--data", "x.json", "--out", str(tmp_path / "o")]
    plain = subprocess.run(args, capture_output=True, text=True)
    assert plain.returncode == 2
    assert plain.stderr == f"qdora train: error: model not found: {tmp_path / 'nowhere'}\n"
    debug = subprocess.run(args + ["--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_plan_errors_stay_one_line(capsys):
    rc, err = run_cli(capsys, ["plan", "--model", "Llama-9-1B"])
    assert rc == 2 and err.count("\n") == 1 and err.startswith("qdora plan: error: ")


# ---- runs that move, resume, and choose their adapter format -----------------------------------

def test_a_moved_run_resumes_and_counts_the_whole_run(setup, tmp_path, capsys):
    # A constant schedule: a 2-step run continued to 4 steps is the 4-step run, step for step.
    whole = tmp_path / "whole"
    assert main(train_args(setup, whole, "--max-steps", "4", "--schedule", "constant")) == 0
    assert main(train_args(setup, tmp_path / "first", "--max-steps", "2", "--schedule", "constant")) == 0
    shutil.move(tmp_path / "first", tmp_path / "elsewhere")
    capsys.readouterr()
    args = [a for a in train_args(setup, tmp_path / "elsewhere", "--max-steps", "4", "--resume", "--schedule",
                                  "constant") if a != "--no-progress"]
    assert main(args) == 0
    assert [m["loss"] for m in read_metrics(tmp_path / "elsewhere")] == [m["loss"] for m in read_metrics(whole)]
    tokens = sum(m["tokens"] for m in read_metrics(whole))
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and done[0].startswith(f"done: 4 steps, {tokens} tokens in "), done
    state = json.loads((tmp_path / "elsewhere" / "checkpoint" / "state.json").read_text())
    assert state["totals"]["tokens"] == tokens and state["step"] == 4


def test_moved_data_with_the_same_content_resumes_changed_data_does_not(setup, tmp_path, capsys):
    out = tmp_path / "run"
    data = tmp_path / "data.json"
    shutil.copy(setup / "data.json", data)
    args = train_args(setup, out)
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 0
    moved = tmp_path / "moved.json"
    data.rename(moved)
    args[args.index("--data") + 1] = str(moved)
    assert main(args + ["--resume", "--max-steps", "3"]) == 0
    moved.write_text(json.dumps(json.loads(moved.read_text())[:8]))
    capsys.readouterr()
    rc, err = run_cli(capsys, args + ["--resume", "--max-steps", "4"])
    assert rc == 2 and "--resume with different settings" in err and "data:" in err


def test_train_writes_the_adapter_format_asked_for(setup, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    assert main(train_args(setup, out, "--adapter-format", "peft", "--dropout", "0")) == 0
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    from qdora import load_adapter, load_model
    model, _ = load_model(setup / "model", add=False, progress=False)
    load_adapter(model, out / "adapter", verbose=False)  # ours reads it back
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert peft.PeftConfig.from_pretrained(out / "adapter").r == 4


# ---- a quiet start ---------------------------------------------------------------------------------

def test_no_bitsandbytes_kernels_note_from_the_repository_root():
    # bitsandbytes imports the PyPI package `kernels` on CPUs with AVX512-BF16; from the repository
    # root that name is this project's kernels/ folder. qdora quiets the note before bitsandbytes loads.
    result = subprocess.run([sys.executable, "-c", "import qdora, bitsandbytes, peft"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert "kernels" not in result.stderr, result.stderr


def test_demo_data_is_a_listed_package():
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "qdora.demo_data" in project["tool"]["setuptools"]["packages"]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    from qdora.demo import main as demo_main
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    rc = demo_main(["--out", str(tmp_path / "mine")])
    assert rc == 2 and "is not the output of an earlier demo" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_demo_writes_where_git_ignores():
    import qdora.demo
    assert 'default="runs/demo"' in Path(qdora.demo.__file__).read_text()
    if shutil.which("git") and (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "runs/demo/merged/model.safetensors"], cwd=REPO)
        assert ignored.returncode == 0


@pytest.mark.parametrize("args, expected", [
    (["eval", "--model", "NOWHERE", "--out", "OUT"], "qdora eval: error: model not found: "),
    (["eval", "--train-data", "NOWHERE.json", "--out", "OUT"], "qdora eval: error: .*nowhere.json: file not found"),
    (["analyze", "--base", "MODEL", "--tuned", "NOWHERE", "--out", "OUT"], "qdora analyze: error: .*nowhere"),
])
def test_eval_and_analyze_errors_are_one_line(setup, tmp_path, capsys, no_model_loading, args, expected):
    args = [a.replace("NOWHERE", str(tmp_path / "nowhere")).replace("OUT", str(tmp_path / "out"))
             .replace("MODEL", str(setup / "model")) for a in args]
    rc, err = run_cli(capsys, args)
    assert rc == 2 and err.count("\n") == 1 and re.match(expected, err), err
