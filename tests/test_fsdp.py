"""FSDP2 training on CPU: 2 processes (gloo) launched with torchrun against one process.

The oracle is a single-process run of the same config: the global batch of each step is split
across the two ranks, and each rank's loss is its share of the global token-mean, so both runs
compute the same sums in a different order and on different padding (each rank pads its half to
its own longest example).

Tolerances, from fp32 rounding (u = 2^-24) and AdamW's update rule, not from one machine's run:
- Losses: per-token losses carry the rounding of reordered and reshaped dot products (length K ≤ 256
  in this model: about √K·u = 1e-6 relative in the probabilistic model of rounding, Higham and Mary
  2019), and a mean of positive terms does not amplify it: LOSS_RTOL = 1e-6.
- Gradient norms: a sum of squares (positive terms), dominated by the large, well-conditioned
  gradient elements: GRAD_NORM_RTOL = 1e-5 (168u). AdamW is blind to the scale of the gradient, so
  the gradient norm is what catches a reduction that sums instead of averaging.
- Adapters after `STEPS` AdamW steps of `LR`: AdamW moves an element by `lr·m̂/(√v̂ + ε)`, so a
  relative error ρ in its gradient moves it by about `lr·ρ` per step. A gradient element sums over
  at most `TOKENS` tokens with condition number κ = Σ|terms| / |Σ terms|; its rounding error is
  ρ ≤ κ·TOKENS·u in the worst case, or about κ·√TOKENS·u in the probabilistic model. Allowing
  κ = `CANCELLATION` in the worst case (κ ≈ 200 in the probabilistic one) gives
  ADAPTER_ATOL = STEPS·LR·CANCELLATION·TOKENS·u (9.5e-6). An element whose gradient cancels further,
  to its own rounding level (|g| near AdamW's ε = 1e-8: an expert element few tokens reach), takes a
  step whose size rounding decides, up to 2·lr a step. That is a policy, not a bound: such elements
  are rare, so ADAPTER_OUTLIERS (one) per tensor may differ by up to OUTLIER_ATOL = 2·STEPS·LR. A
  wrong reduction (a sum for a mean, a rank's share or a tensor's all-reduce lost) moves every
  element of the tensors it touches, not one (`test_the_adapter_comparison_...` checks the rule).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import build, llama3_config, save_bpe_tokenizer
from safetensors.torch import load_file

from qdora.data.examples import DEMO_DATA
from qdora.train.loop import TrainConfig, read_metrics, train

U = 2.0 ** -24  # fp32 unit roundoff
LR, STEPS, TOKENS = 5e-3, 4, 5 * 320  # the runs' lr, steps and tokens per step (batch 5, cutoff 320)
CANCELLATION = 5
LOSS_RTOL = 1e-6
GRAD_NORM_RTOL = 1e-5
ADAPTER_ATOL = STEPS * LR * CANCELLATION * TOKENS * U
ADAPTER_OUTLIERS = 1
OUTLIER_ATOL = 2 * STEPS * LR
WORKER = Path(__file__).with_name("fsdp_worker.py")
TIMEOUT_S = 300  # a launch takes ~20 s here; a hang fails the test instead of blocking CI


def torchrun(spec: dict, where: Path, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Launch tests/fsdp_worker.py on 2 CPU processes (gloo) with `spec`."""
    path = where / f"spec-{len(list(where.glob('spec-*')))}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", QDORA_DIST_TIMEOUT="60", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def config(setup: Path, out: Path, **kw) -> dict:
    base = dict(model=str(setup / "model"), data=str(setup / "data.json"), out=str(out), method="qdora", r=4,
                alpha=8, dropout=0.0, lr=LR, max_steps=STEPS, batch_size=5, cutoff_len=320, save_every=2,
                warmup_steps=1, progress=False)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references; then one torchrun job with the same runs on 2 ranks and, last,
    a run whose rank 1 dies while writing its checkpoint at step 4; then a job resuming that run."""
    root = tmp_path_factory.mktemp("fsdp")
    # 11 examples, batch 5: full batches split unevenly (2 + 3); the last batch of an epoch has one
    # example, so rank 0 has none at step 3 and runs an unsupervised dummy to keep collectives in step.
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:11]
    (root / "data.json").write_text(json.dumps(records))
    build(llama3_config(vocab_size=512, intermediate_size=256, max_position_embeddings=512)).save_pretrained(
        root / "model")
    save_bpe_tokenizer(root / "model", [r["instruction"] + " " + r["output"] for r in records])
    (root / "broken.gguf").write_bytes(b"GGUF" + bytes(60))  # exists, but no GGUF reader can open it
    single = {}
    for method in ("qdora", "qlora"):
        summary = train(TrainConfig(**config(root, root / f"single-{method}", method=method)))
        single[method] = summary["model"]
    from qdora.models.adapter_io import save_adapter
    save_adapter(single["qdora"], root / "single-qdora-peft", format="peft")
    packed = dict(packing=True, cutoff_len=640, val_split=0.2, eval_every=2)  # rows of two examples, validated
    train(TrainConfig(**config(root, root / "single-packed", **packed)))
    # One process stopped after step 2 (as SIGTERM stops it); the torchrun job below resumes it on 2.
    stop_at_2 = lambda step, _: step == 2 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    train(TrainConfig(**config(root, root / "one-then-two")), on_step=stop_at_2)

    runs = [{"config": config(root, root / "fsdp-qdora", fsdp=True), "peft_adapter": str(root / "fsdp-qdora-peft")},
            {"config": config(root, root / "fsdp-qlora", method="qlora", fsdp=True), "measure_start": True},
            {"config": config(root, root / "fsdp-qdora-offload", fsdp=True, cpu_offload=True)},
            {"config": config(root, root / "fsdp-packed", fsdp=True, **packed)},
            {"config": config(root, root / "fsdp-tiled", fsdp=True, tiled_layers=True, mlp_tile_tokens=48)},
            {"config": config(root, root / "stop", fsdp=True, save_every=4), "sigterm_rank1_at": 2},
            {"config": config(root, root / "other-seed", fsdp=True), "seed_rank1": 1, "expect_error": True},
            {"config": config(root, root / "no-model", fsdp=True, model=str(root / "missing")), "expect_error": True},
            {"config": config(root, root / "bad-gguf", fsdp=True, model=str(root / "broken.gguf")),
             "expect_error": True},
            {"config": config(root, root / "one-then-two", fsdp=True, resume=True)},
            {"config": config(root, root / "two-then-one", fsdp=True, save_every=4), "sigterm_rank1_at": 2},
            {"config": config(root, root / "crash", fsdp=True), "crash_in_save_at": 4}]
    crashed = torchrun({"runs": runs}, root)
    # The 2-process run stopped after step 2, resumed by one process.
    train(TrainConfig(**config(root, root / "two-then-one", save_every=4, resume=True)))
    state_after_crash = json.loads((root / "crash" / "checkpoint" / "state.json").read_text())
    leftovers = sorted(p.name for p in (root / "crash").iterdir())
    resumed = torchrun({"runs": [{"config": config(root, root / "crash", fsdp=True, resume=True)}]}, root)
    return dict(root=root, crashed=crashed, resumed=resumed, state_after_crash=state_after_crash,
                leftovers=leftovers)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _finished(runs, name, adapter=True):
    """The runs before the crashing one completed (the job itself ended with rank 1's crash)."""
    out = runs["root"] / name
    assert (out / "adapter").is_dir() == adapter and (out / "facts-rank1.json").is_file(), \
        runs["crashed"].stdout[-3000:] + runs["crashed"].stderr[-6000:]


def _assert_same_losses(actual, expected):
    assert [m["step"] for m in actual] == [m["step"] for m in expected]
    for a, e in zip(actual, expected):
        assert abs(a["loss"] - e["loss"]) <= LOSS_RTOL * abs(e["loss"]), (a["step"], a["loss"], e["loss"])
        assert a["tokens"] == e["tokens"] and a["lr"] == e["lr"]
        assert abs(a["grad_norm"] - e["grad_norm"]) <= GRAD_NORM_RTOL * e["grad_norm"], \
            (a["grad_norm"], e["grad_norm"])


def _assert_same_adapter(actual: Path, expected: Path, weights="adapter.safetensors"):
    a, e = load_file(str(actual / weights)), load_file(str(expected / weights))
    assert sorted(a) == sorted(e) and a
    for key in e:
        diff = (a[key].double() - e[key].double()).abs().flatten()
        outliers = diff[diff > ADAPTER_ATOL]
        assert len(outliers) <= ADAPTER_OUTLIERS and (outliers <= OUTLIER_ATOL).all(), \
            f"{key}: {len(outliers)} of {diff.numel()} elements differ by more than {ADAPTER_ATOL:.2e} " \
            f"(largest {diff.max().item():.3e})"


def test_the_adapter_comparison_excuses_one_rounding_flip_and_no_wrong_reduction(tmp_path):
    """The rule above, on made-up adapters: one element per tensor may take a step rounding decided;
    a tensor whose every element moved by a tenth of a step, or two flipped elements, fail."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ref = {"x.lora_A": torch.randn(4, 64), "x.lora_B": torch.randn(64, 4) * 1e-2}
    cases = {"one flip": ({"x.lora_B": (5, 2, 2 * LR)}, True),
             "all moved": ({"x.lora_A": (None, None, LR / 10)}, False),
             "two flips": ({"x.lora_B": (5, 2, 2 * LR), "x.lora_B#": (7, 1, 2 * LR)}, False)}
    (tmp_path / "ref").mkdir()
    save_file(ref, str(tmp_path / "ref" / "adapter.safetensors"))
    for name, (changes, passes) in cases.items():
        other = {k: v.clone() for k, v in ref.items()}
        for key, (row, col, by) in changes.items():
            target = other[key.rstrip("#")]
            if row is None:
                target += by
            else:
                target[row, col] += by
        (tmp_path / name).mkdir()
        save_file(other, str(tmp_path / name / "adapter.safetensors"))
        if passes:
            _assert_same_adapter(tmp_path / name, tmp_path / "ref")
        else:
            with pytest.raises(AssertionError, match="differ by more than"):
                _assert_same_adapter(tmp_path / name, tmp_path / "ref")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qdora", "qlora"])
def test_fsdp_equals_single_process(runs, method):
    _finished(runs, f"fsdp-{method}")
    root = runs["root"]
    single, sharded = read_metrics(root / f"single-{method}"), read_metrics(root / f"fsdp-{method}")
    assert len(sharded) == 4
    _assert_same_losses(sharded, single)
    _assert_same_adapter(root / f"fsdp-{method}" / "adapter", root / f"single-{method}" / "adapter")
    # The adapters moved (B starts at 0): equality is not two untouched initialisations.
    b = load_file(str(root / f"fsdp-{method}" / "adapter" / "adapter.safetensors"))
    assert max(v.abs().max().item() for k, v in b.items() if k.endswith("lora_B")) > 1e-3


@pytest.mark.slow
def test_packing_and_validation_under_fsdp(runs):
    """Packed rows (position ids through the sharded model) and the validation loss (each rank's
    part of each batch, summed over the ranks): the single-process run's figures."""
    _finished(runs, "fsdp-packed")
    root = runs["root"]
    sharded, single = read_metrics(root / "fsdp-packed"), read_metrics(root / "single-packed")
    _assert_same_losses(sharded, single)
    vals = [(m["step"], m["val_loss"]) for m in single if "val_loss" in m]
    assert [s for s, _ in vals] == [2, 4]
    assert [(m["step"], pytest.approx(m["val_loss"], rel=LOSS_RTOL)) for m in sharded if "val_loss" in m] == vals
    assert max(len(m) for m in single) and single[0]["tokens"] > 320  # a row held more than one example


@pytest.mark.slow
def test_cpu_offload_trains_the_same_run(runs):
    """CPU offload (FSDP2 `CPUOffloadPolicy`) on a CPU device moves nothing, but runs FSDP's offload
    path (host-side shards copied before each all-gather, gradients copied back, optimizer stepping
    the host shards) and our loading of shards into it: same losses and adapter as one process."""
    _finished(runs, "fsdp-qdora-offload")
    root = runs["root"]
    _assert_same_losses(read_metrics(root / "fsdp-qdora-offload"), read_metrics(root / "single-qdora"))
    _assert_same_adapter(root / "fsdp-qdora-offload" / "adapter", root / "single-qdora" / "adapter")
    # On a CPU device offload changes where nothing lives, so nothing is computed differently either:
    # the run is bit for bit the FSDP run without offload.
    _finished(runs, "fsdp-qdora")
    assert ([m["loss"] for m in read_metrics(root / "fsdp-qdora-offload")]
            == [m["loss"] for m in read_metrics(root / "fsdp-qdora")])
    a = load_file(str(root / "fsdp-qdora-offload" / "adapter" / "adapter.safetensors"))
    e = load_file(str(root / "fsdp-qdora" / "adapter" / "adapter.safetensors"))
    assert sorted(a) == sorted(e) and all(torch.equal(a[k], e[k]) for k in e)
    for r in (0, 1):
        offloaded = json.loads((root / "fsdp-qdora-offload" / f"facts-rank{r}.json").read_text())
        plain = json.loads((root / "fsdp-qdora" / f"facts-rank{r}.json").read_text())
        assert offloaded["offload_to_cpu"] == [True] and plain["offload_to_cpu"] == [False]
        assert offloaded["shard_devices"] == ["cpu"] and offloaded["all_dtensor"]
        assert 0.45 < offloaded["local_fraction"] < 0.55


@pytest.mark.slow
def test_tiled_layers_under_fsdp_train_the_same_run(runs):
    """`--tiled-layers` (48-token tiles of rows up to 320 tokens) inside FSDP2's sharded layers: each tile's
    recompute runs in the layer's backward, while FSDP holds the layer's gathered parameters; the same run as
    one process without tiles (tiling changes only the order of fp32 sums)."""
    _finished(runs, "fsdp-tiled")
    root = runs["root"]
    for r in (0, 1):  # the tiles ran, on both ranks (and the untiled run made none)
        assert json.loads((root / "fsdp-tiled" / f"facts-rank{r}.json").read_text())["tiled_calls"] > 0
        assert json.loads((root / "fsdp-qdora" / f"facts-rank{r}.json").read_text())["tiled_calls"] == 0
    _assert_same_losses(read_metrics(root / "fsdp-tiled"), read_metrics(root / "single-qdora"))
    _assert_same_adapter(root / "fsdp-tiled" / "adapter", root / "single-qdora" / "adapter")


def test_fsdp_gathers_the_peft_adapter_on_rank0(runs):
    _finished(runs, "fsdp-qdora")
    root = runs["root"]
    _assert_same_adapter(root / "fsdp-qdora-peft", root / "single-qdora-peft", "adapter_model.safetensors")
    config = json.loads((root / "fsdp-qdora-peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4


@pytest.mark.slow
def test_fsdp_streams_the_checkpoint_and_shards_every_layer(runs):
    for method in ("qdora", "qlora"):
        _finished(runs, f"fsdp-{method}")
        facts = [json.loads((runs["root"] / f"fsdp-{method}" / f"facts-rank{r}.json").read_text()) for r in (0, 1)]
        for f in facts:
            # Every rank streams the checkpoint (nobody loads it whole, nothing is broadcast): it
            # reads one decoder layer, shards it, reads the next; the root comes last.
            assert (f["load_model_calls"], f["stream_model_calls"]) == (0, 1)
            assert f["start"] == ["read layer 0", "shard LlamaDecoderLayer", "read layer 1", "shard LlamaDecoderLayer",
                                  "read root", "shard LlamaForCausalLM"], f["start"]
            assert f["all_dtensor"] and f["fsdp_layers"] == 2 and f["gradient_checkpointing"]
            # Each rank keeps about half of every parameter (dim-0 shards, the last one padded).
            assert 0.45 < f["local_fraction"] < 0.55, f
            # 7 linear layers per decoder layer, all NF4 (frozen ones too), packed as uint8 on CPU.
            assert f["packed_count"] == 14 and f["packed_dtypes"] == ["torch.uint8"]


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_job(runs, tmp_path):
    """`accelerate launch --multi_gpu` starts the processes through torchrun's launcher too (here on
    CPU, gloo): the same FSDP run, bit for bit, as the torchrun job's."""
    _finished(runs, "fsdp-qdora")
    root, out = runs["root"], tmp_path / "accelerate"
    cfg = config(root, out)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if k not in ("progress",)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "qdora.cli", "train", "--fsdp", "--no-progress", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", QDORA_DIST_TIMEOUT="60", CUDA_VISIBLE_DEVICES="")
    _ok(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S))
    ours, theirs = read_metrics(out), read_metrics(root / "fsdp-qdora")
    assert [(m["loss"], m["grad_norm"]) for m in ours] == [(m["loss"], m["grad_norm"]) for m in theirs]
    a = load_file(str(out / "adapter" / "adapter.safetensors"))
    e = load_file(str(root / "fsdp-qdora" / "adapter" / "adapter.safetensors"))
    assert sorted(a) == sorted(e) and all(torch.equal(a[k], e[k]) for k in e)


@pytest.mark.slow
def test_plan_predicts_the_measured_start(runs):
    """`qdora plan`'s FSDP start term against the start measured on each rank (the profiler's peak
    of live tensor bytes over `build_sharded`, the mapped checkpoint file left out). This tiny
    model peaks while its root is sharded; `python -m qdora.eval.plan.validate --start` also covers
    starts that peak in a layer (within +11% there)."""
    from qdora.plan.memory import PlanConfig, plan
    _finished(runs, "fsdp-qlora")
    cfg = TrainConfig(**config(runs["root"], runs["root"] / "x", method="qlora", fsdp=True))
    predicted = plan(str(runs["root"] / "model"), PlanConfig(
        method="qlora", r=cfg.r, dropout=cfg.dropout, target_modules=tuple(cfg.target_modules), device="cpu",
        gpus=2, adapter_dtype=cfg.adapter_dtype)).start_bytes
    for r in (0, 1):
        measured = json.loads((runs["root"] / "fsdp-qlora" / f"facts-rank{r}.json").read_text())["start_peak_bytes"]
        assert abs(predicted / measured - 1) <= 0.15, (r, predicted, measured)


@pytest.mark.slow
def test_ranks_that_built_different_weights_refuse_to_train(runs):
    """Each rank keeps its shard of the layers it built itself, so the ranks must build the same
    bytes; rank 1 seeded differently draws other initial adapters, and every rank stops at the start."""
    out = runs["root"] / "other-seed"
    assert (out / "facts-rank1.json").is_file(), runs["crashed"].stdout[-3000:] + runs["crashed"].stderr[-6000:]
    for r in (0, 1):
        error = json.loads((out / f"facts-rank{r}.json").read_text())["start_error"]
        assert error.startswith("RuntimeError: the ranks built different weights for decoder layer 0, "
                                "decoder layer 1 "), error
    assert not (out / "checkpoint").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_missing_model_fails_every_rank_at_once(runs):
    """Every rank checks the model path before the process group starts (`qdora.train.loop.check_run`),
    so each fails at once with the same error, not after the collective timeout. (A model that
    exists but that rank 0 cannot open fails on rank 0 and reaches the others by a collective:
    `qdora.train.fsdp.build_sharded`.)"""
    out = runs["root"] / "no-model"
    errors = [json.loads((out / f"facts-rank{r}.json").read_text())["start_error"] for r in (0, 1)]
    assert errors == [f"FileNotFoundError: model not found: {runs['root'] / 'missing'}"] * 2


def test_a_model_rank_0_cannot_open_fails_every_rank_at_once(runs):
    """A .gguf file is converted by rank 0 alone; its failure reaches rank 1 at once."""
    out = runs["root"] / "bad-gguf"
    errors = [json.loads((out / f"facts-rank{r}.json").read_text())["start_error"] for r in (0, 1)]
    assert errors[0] and not errors[0].startswith("RuntimeError: rank 0")
    assert errors[1] == f"RuntimeError: rank 0 could not open {runs['root'] / 'broken.gguf'}; its error says why"


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_all_after_the_same_step(runs):
    _finished(runs, "stop", adapter=False)
    out = runs["root"] / "stop"
    facts = [json.loads((out / f"facts-rank{r}.json").read_text()) for r in (0, 1)]
    assert [(f["steps"], f["interrupted"]) for f in facts] == [(2, 15), (2, 15)]  # SIGTERM = 15
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2  # save_every=4: the signal's
    assert [m["step"] for m in read_metrics(out)] == [1, 2] and not (out / "adapter").exists()


@pytest.mark.slow
def test_crash_while_saving_keeps_the_last_checkpoint_and_resume_continues(runs):
    root = runs["root"]
    crashed = runs["crashed"]
    assert crashed.returncode != 0  # rank 1 died; the job ended (no hang: TIMEOUT_S would have failed it)
    assert "exitcode  : 3" in crashed.stdout + crashed.stderr  # torchrun's report of os._exit(3) on rank 1
    assert runs["state_after_crash"]["step"] == 2 and runs["state_after_crash"]["world_size"] == 2
    # The step-4 checkpoint was being written when rank 1 died: its temporary folder was never swapped in.
    assert "checkpoint" in runs["leftovers"] and "checkpoint.tmp-sharded" in runs["leftovers"]
    _ok(runs["resumed"])
    resumed, reference = read_metrics(root / "crash"), read_metrics(root / "fsdp-qdora")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    # Same world size, same operations: the resumed curve and adapter are the uninterrupted ones exactly.
    assert [m["loss"] for m in resumed] == [m["loss"] for m in reference]
    a = load_file(str(root / "crash" / "adapter" / "adapter.safetensors"))
    e = load_file(str(root / "fsdp-qdora" / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(a[k], e[k]) for k in e)
    assert not (root / "crash" / "checkpoint.tmp-sharded").exists()


def test_fsdp_needs_a_launcher(tmp_path, monkeypatch):
    from qdora.train.fsdp import init_process_group
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun --standalone --nproc-per-node 2 -m qdora.cli -- train --fsdp"):
        init_process_group()


def test_fsdp_config_errors():
    with pytest.raises(ValueError) as info:
        TrainConfig(model="m", data="d", out="o", method="full", optimizer="paged_adamw_8bit", fsdp=True)
    assert "method='full' is not supported with --fsdp" in str(info.value)
    assert "optimizer='paged_adamw_8bit' cannot step sharded parameters" in str(info.value)
    with pytest.raises(ValueError, match="cpu_offload=True is an FSDP option: add --fsdp"):
        TrainConfig(model="m", data="d", out="o", method="qdora", cpu_offload=True)
    with pytest.raises(ValueError, match="direction='vera' is not supported with --fsdp"):
        TrainConfig(model="m", data="d", out="o", method="qdora", direction="vera", fsdp=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["one-then-two", "two-then-one"])
def test_a_checkpoint_resumes_with_another_number_of_processes(runs, name):
    """One checkpoint format for one process and FSDP: stopped after step 2 by one process and
    resumed by two, or the other way round, the run is the single-process run (within the
    tolerances above: the two halves of a batch sum in another order)."""
    root = runs["root"]
    _finished(runs, "fsdp-qdora")
    state = json.loads((root / name / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == (2 if name == "one-then-two" else 1)
    _assert_same_losses(read_metrics(root / name), read_metrics(root / "single-qdora"))
    _assert_same_adapter(root / name / "adapter", root / "single-qdora" / "adapter")


@pytest.mark.slow
def test_no_checkpoint_file_is_a_pickle(runs):
    """Every file of every checkpoint is safetensors or JSON (a pickle starts with 0x80)."""
    from safetensors import safe_open
    folders = [p for p in runs["root"].glob("*/checkpoint") if p.is_dir()]
    assert len(folders) >= 6
    for folder in folders:
        for file in folder.rglob("*"):
            if file.is_dir():
                continue
            assert file.read_bytes()[:1] != b"\x80", file
            if file.suffix == ".json":
                json.loads(file.read_text())
            else:
                assert file.suffix == ".safetensors", file
                with safe_open(str(file), framework="pt") as f:
                    f.keys()


def test_an_earlier_sharded_checkpoint_is_refused_with_the_way_out(tmp_path):
    from qdora.train.checkpoint import check_checkpoint
    (tmp_path / "state.json").write_text(json.dumps({"step": 2, "sharded": True, "world_size": 2}))
    with pytest.raises(ValueError, match="earlier qdora's FSDP format.*start the run again without --resume"):
        check_checkpoint(tmp_path)


def test_mixed_precision_needs_matching_quant_storage():
    from torch import nn

    from qdora import AdapterConfig, add_adapters
    from qdora.train.fsdp import prepare_for_fsdp

    model = nn.Sequential(nn.Linear(64, 32))
    add_adapters(model, AdapterConfig(method="qdora", r=2, target_modules=("0",)), verbose=False)
    with pytest.raises(ValueError, match="stored as torch.uint8.*quant_storage='bfloat16'"):
        prepare_for_fsdp(model, torch.bfloat16)


@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float32"])
def test_shardable_layers_compute_what_the_nf4_model_computes(storage):
    """`prepare_for_fsdp` (plain packed parameters, quantization state on the module, frozen NF4
    layers through our autograd function) changes no output and no gradient. Oracle: the same
    model before the change (bitsandbytes' own forward for the frozen layers)."""
    from conftest import FP32_TOL, assert_close

    from qdora import AdapterConfig, add_adapters
    from qdora.train.fsdp import ShardableLinear4bit, prepare_for_fsdp

    torch.manual_seed(0)
    model = build(llama3_config(num_hidden_layers=1, hidden_size=64, intermediate_size=192))
    cfg = AdapterConfig(method="qdora", r=4, dropout=0.0, target_modules=("q_proj", "down_proj"),
                        adapter_dtype="float32", quant_storage=storage)
    add_adapters(model, cfg, verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 1024, (2, 11))

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    logits, grads = run()
    prepare_for_fsdp(model, None)
    frozen = [m for m in model.modules() if isinstance(m, ShardableLinear4bit)]
    assert len(frozen) == 5 and all(type(m.weight) is torch.nn.Parameter for m in frozen)
    logits2, grads2 = run()
    assert_close(logits2, logits, FP32_TOL, "logits")
    for n in grads:
        assert_close(grads2[n], grads[n], FP32_TOL, n)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("method", ["qdora", "qlora", "dora", "qdora-bf16-storage"])
def test_streaming_builds_what_load_model_builds(tmp_path, tied, method):
    """`stream_model` (every rank's FSDP start) reads, quantizes and adapts one decoder layer at a
    time and hands it on before the next layer is read; the model it returns is `load_model`'s bit
    for bit (same tensors, same trainable set, same initial A from the same seed), tied embeddings
    and magnitude-only layers included. Oracle: `load_model` then `add_adapters` on the whole model."""
    from qdora import AdapterConfig
    from qdora.models.loading import CheckpointModel, load_model, stream_model

    build(llama3_config(tie_word_embeddings=tied, num_hidden_layers=3)).save_pretrained(tmp_path / "model")
    storage = "bfloat16" if method.endswith("bf16-storage") else "uint8"  # what CUDA mixed precision shards
    method = method.split("-")[0]
    cfg = AdapterConfig(method=method, r=4, magnitude_only_modules=("o_proj",) if method != "qlora" else (),
                        adapter_dtype="float32", quant_storage=storage)
    torch.manual_seed(7)
    expected, _ = load_model(tmp_path / "model", method=method, cfg=cfg, progress=False)
    read: list[str] = []
    real_place = CheckpointModel.place

    def place(self, key, tensor):
        read.append(key)
        return real_place(self, key, tensor)

    handed = []

    def on_layer(layer):
        # This layer is complete and adapted; nothing of the later layers has been read.
        assert all(p.device.type != "meta" for p in layer.parameters())
        assert not any(k.startswith(f"model.layers.{len(handed) + 1}.") for k in read)
        handed.append((len(read), sum(type(m).__name__ == "QDoRALinear" for m in layer.modules())))

    CheckpointModel.place = place
    try:
        torch.manual_seed(7)
        got, _ = stream_model(tmp_path / "model", cfg, progress=False, on_layer=on_layer)
    finally:
        CheckpointModel.place = real_place
    layer_keys = len([k for k in read if k.startswith("model.layers.0.")])
    assert [n for n, _ in handed] == [layer_keys, 2 * layer_keys, 3 * layer_keys]  # then the root's tensors
    adapted = [sum(type(m).__name__ == "QDoRALinear" for m in layer.modules()) for layer in expected.model.layers]
    assert [n for _, n in handed] == adapted and adapted[0] > 0  # each layer was adapted before it was handed on
    ours = list(got.named_parameters(remove_duplicate=False))
    theirs = list(expected.named_parameters(remove_duplicate=False))
    assert [(n, p.dtype, p.requires_grad) for n, p in ours] == [(n, p.dtype, p.requires_grad) for n, p in theirs]
    def same_bytes(a, b):  # packed NF4 stored as bf16 holds NaN patterns: compare the bytes
        return torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))

    for (n, p), (_, q) in zip(ours, theirs):
        assert same_bytes(p, q), n
    for (n, b), (_, c) in zip(got.named_buffers(), expected.named_buffers()):
        assert same_bytes(b, c), n
    assert any(p.requires_grad for _, p in ours)
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == tied
    assert [type(m).__name__ for m in got.modules()] == [type(m).__name__ for m in expected.modules()]
    assert got.qdora_config == expected.qdora_config


def test_streaming_names_what_the_checkpoint_lacks(tmp_path):
    from safetensors.torch import load_file, save_file

    from qdora import AdapterConfig
    from qdora.models.loading import stream_model

    build(llama3_config()).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\).*model\.layers\.1\.mlp\.up_proj\.weight"):
        stream_model(tmp_path, AdapterConfig(method="qdora", r=4), progress=False)
