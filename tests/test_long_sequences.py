"""Long sequences end to end: `qdora train` with the tiled MLP and offloaded activations gives the default run's
curve; their settings are checked in one line before any work; `qdora plan` knows them (the terms they change,
exactly) and `--max-seq-len` finds the longest sequence per card."""

import json

import pytest
from test_loss_defaults import config, setup  # noqa: F401  (the same tiny model and data)

from qdora.cli import main
from qdora.models.offload import OffloadedActivations
from qdora.models.tiled_mlp import find_tiled_mlp
from qdora.plan.memory import MAX_SEQ_CARDS_GB, PlanConfig, at_length, longest_sequence, plan, resolve_model
from qdora.plan.report import longest_table
from qdora.train.loop import TrainConfig, read_metrics, train

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.parametrize("tiling", ["tiled_mlp", "tiled_layers"])
def test_tiled_mlp_and_offload_give_the_default_runs_curve(setup, tmp_path, monkeypatch, tiling):  # noqa: F811
    seen = []
    original = OffloadedActivations.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self)

    monkeypatch.setattr(OffloadedActivations, "__init__", remember)
    long = train(config(setup, tmp_path / "long", **{tiling: True}, mlp_tile_tokens=16, offload_activations=True))
    tiles = find_tiled_mlp(long["model"])
    assert tiles is not None and tiles.tile_tokens == 16 and tiles.layers == 2
    assert tiles.parts == ("layers" if tiling == "tiled_layers" else "mlp")
    assert len(seen) == 1 and seen[0].active and seen[0].stats.to_host > 0  # the path ran
    train(config(setup, tmp_path / "plain"))
    a, b = read_metrics(tmp_path / "long"), read_metrics(tmp_path / "plain")
    assert len(a) == len(b) == 4
    # the same tolerance as the chunked loss's curve (test_loss_defaults): the tiles sum the MLP's parameter
    # gradients tile by tile, a different fp32 rounding of the same sums; offloading is bit for bit
    for key in ("loss", "grad_norm", "val_loss"):
        assert [m[key] for m in a if key in m] == pytest.approx([m[key] for m in b if key in m], rel=1e-5), key


@pytest.mark.parametrize("settings, message", [
    (dict(offload_activations=True, gradient_checkpointing=False),
     "offload_activations=True moves the checkpointed layer inputs to host memory and needs gradient checkpointing"),
    (dict(offload_activations=True, fsdp=True), "offload_activations=True is not supported with FSDP"),
    (dict(tiled_mlp=True, mlp_tile_tokens=300), r"mlp_tile_tokens=300 is above the sequence \(cutoff_len=256\)"),
    (dict(tiled_mlp=True, mlp_tile_tokens=-1), "mlp_tile_tokens=-1 must be an integer >= 1"),
    (dict(mlp_tile_tokens=64), "mlp_tile_tokens=64 sizes the tiled MLP, which is off; add --tiled-mlp"),
    (dict(loss_chunk_tokens=257), r"loss_chunk_tokens=257 is above the sequence \(cutoff_len=256\)"),
])
def test_long_sequence_settings_are_checked_before_any_work(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(model="m", data="d", out="o", **settings)


def test_the_command_line_says_it_in_one_line(tmp_path, capsys):
    rc = main(["train", "--model", str(tmp_path / "absent"), "--data", str(tmp_path / "absent.json"), "--out",
               str(tmp_path / "o"), "--offload-activations", "--no-gradient-checkpointing"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "needs gradient checkpointing" in err
    assert not (tmp_path / "o").exists()
    rc = main(["plan", "--model", "Llama-3-9B", "--max-seq-len"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "'Llama-3-9B' is neither a preset" in err


def test_offloaded_activations_leave_two_checkpoints_on_the_gpu():
    shape = resolve_model("Llama-3-8B")
    base = PlanConfig(r=32, target_modules="all", seq_len=32768, chunked_loss=True)
    a, b = plan(shape, base), plan(shape, base.replace(offload_activations=True))
    checkpoint = 32768 * shape.hidden * 2  # T·h·e, bf16
    assert a.peak_phase == b.peak_phase == "layer backward"
    assert a.terms["activations"] - b.terms["activations"] == (shape.layers - 2) * checkpoint
    host = [v for k, v in b.details.items() if k.startswith("offloaded activations")]
    assert host == [shape.layers * checkpoint]
    # on CPU host and device are one memory: nothing saved, no host line; the layer backward holds the
    # input fetched back and the one prefetched beside the copies
    cpu_plain, cpu_off = plan(shape, base.replace(device="cpu")), plan(shape, base.replace(device="cpu",
                                                                                          offload_activations=True))
    assert cpu_off.total_bytes - cpu_plain.total_bytes == 2 * 32768 * shape.hidden * 4 and not cpu_off.details


def test_the_tiled_mlp_keeps_its_input_and_one_tiles_working_set():
    shape = resolve_model("Llama-3-8B")
    base = PlanConfig(r=32, target_modules="all", seq_len=65536, chunked_loss=True, offload_activations=True)
    a, b = plan(shape, base), plan(shape, base.replace(tiled_mlp=True))
    assert b.total_bytes < a.total_bytes
    short = base.replace(seq_len=4096, tiled_mlp=True)  # no longer than one tile (the hidden size): untiled
    assert plan(shape, short).terms == plan(shape, short.replace(tiled_mlp=False)).terms
    # smaller tiles, smaller working set, down to the attention's backward, which tiles do not shrink
    sizes = [plan(shape, base.replace(tiled_mlp=True, mlp_tile_tokens=t)).total_bytes for t in (16384, 4096, 1024)]
    assert sizes[0] > sizes[1] >= sizes[2]


def test_longest_sequence_is_the_boundary_of_the_plan():
    shape = resolve_model("Llama-3-8B")
    cfg = PlanConfig(r=32, target_modules="all", chunked_loss=True, offload_activations=True, tiled_mlp=True)
    for gb in (16, 24):
        for margin, ok in ((True, ("yes",)), (False, ("yes", "tight"))):
            n = longest_sequence(shape, cfg, gb, margin)
            assert n > 0
            assert plan(shape, at_length(cfg, n)).verdict(gb) in ok
            assert plan(shape, at_length(cfg, n + 1)).verdict(gb) not in ok
    rows = longest_table(shape, cfg)
    assert [r["card_gb"] for r in rows] == list(MAX_SEQ_CARDS_GB)
    longest = [r["longest"] for r in rows]
    assert longest == sorted(longest) and all(r["longest_with_margin"] <= r["longest"] for r in rows)
    assert rows[-1]["host_bytes"] == shape.layers * rows[-1]["longest"] * shape.hidden * 2


def test_max_seq_len_prints_the_table(capsys):
    assert main(["plan", "--model", "SmolLM2-135M", "--chunked-loss", "--tiled-mlp", "--max-seq-len", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["card_gb"] for r in rows] == list(MAX_SEQ_CARDS_GB) and all(r["longest"] > 0 for r in rows)
    assert main(["plan", "--model", "SmolLM2-135M", "--max-seq-len"]) == 0
    out = capsys.readouterr().out
    assert "| 24 GB |" in out and "none of the long-sequence options" in out
