"""Settings written once: `qdora train`'s options and config files come from `TrainConfig`'s fields."""

import dataclasses
import json

import pytest
from models import build, llama3_config, save_bpe_tokenizer

from qdora.cli import build_parser, main
from qdora.data.examples import DEMO_DATA
from qdora.options import field_docs, resolve
from qdora.train.loop import TrainConfig, read_metrics


def parsed(argv):
    return resolve(TrainConfig, vars(build_parser().parse_args(["train", *argv])))


def test_every_field_is_an_option_with_its_docstring_as_help():
    docs = field_docs(TrainConfig)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(docs) == sorted(fields)  # every field documented
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    assert set(fields) <= dests
    flags = {s for a in train._actions for s in a.option_strings}
    for name in ("--keep-adapters-every", "--log-every", "--adapter-dtype", "--no-gradient-checkpointing",
                 "--no-progress", "--resume", "--target-modules"):
        assert name in flags
    help_text = train.format_help()
    assert "Write a line to metrics.jsonl every this many steps." in help_text.replace("\n", " ").replace("  ", " ")


def test_defaults_flags_and_tuples():
    cfg = parsed(["--model", "m", "--data", "d", "--out", "o"])
    assert cfg == TrainConfig(model="m", data="d", out="o")
    cfg = parsed(["--model", "m", "--data", "d", "--out", "o", "--target-modules", "q_proj, v_proj",
                  "--no-gradient-checkpointing", "--r", "8", "--lr", "1e-3"])
    assert cfg.target_modules == ("q_proj", "v_proj") and not cfg.gradient_checkpointing
    assert (cfg.r, cfg.lr) == (8, 1e-3)


def test_a_config_file_and_flags_that_override_it(tmp_path):
    (tmp_path / "run.yaml").write_text("model: m\ndata: d\nout: o\nr: 8\nlr: 0.001\n"
                                       "target-modules: [q_proj, v_proj]\ngradient_checkpointing: false\n")
    cfg = parsed(["--config", str(tmp_path / "run.yaml"), "--lr", "2e-3"])
    assert (cfg.r, cfg.lr, cfg.target_modules, cfg.gradient_checkpointing) == (8, 2e-3, ("q_proj", "v_proj"), False)
    (tmp_path / "run.json").write_text(json.dumps({"model": "m", "data": "d", "out": "o", "method": "qlora"}))
    assert parsed(["--config", str(tmp_path / "run.json")]).method == "qlora"


def test_every_problem_of_a_config_file_in_one_error(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"model": "m", "rank": 8, "lrr": 1e-3, "target_modules": 5}))
    with pytest.raises(ValueError) as info:
        parsed(["--config", str(tmp_path / "bad.json")])
    text = str(info.value)
    for fragment in ("unknown setting 'rank'", "unknown setting 'lrr' (did you mean 'lr'?)",
                     "--target-modules: expected a list",
                     "--data, --out are required", "known settings: model, data, out"):
        assert fragment in text, text
    (tmp_path / "types.json").write_text(json.dumps({"model": "m", "data": "d", "out": "o", "r": "eight",
                                                     "packing": "false", "keep_best": 1}))
    with pytest.raises(ValueError) as info:  # each value's type, all at once
        parsed(["--config", str(tmp_path / "types.json")])
    for fragment in ("r: expected a number, got 'eight'", "packing: expected true or false, got 'false'",
                     "keep_best: expected true or false, got 1"):
        assert fragment in str(info.value), str(info.value)
    (tmp_path / "values.json").write_text(json.dumps({"model": "m", "data": "d", "out": "o", "r": 0,
                                                      "fsdp": False, "cpu_offload": True}))
    with pytest.raises(ValueError) as info:  # the values themselves are checked by TrainConfig, all at once
        parsed(["--config", str(tmp_path / "values.json")])
    for fragment in ("r=0 must be a positive integer", "cpu_offload=True is an FSDP option"):
        assert fragment in str(info.value), str(info.value)
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML"):
        parsed(["--config", str(tmp_path / "broken.yaml")])


def tiny_model_and_data(folder):
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:8]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.json").write_text(json.dumps(records))
    build(llama3_config(vocab_size=512, intermediate_size=256, max_position_embeddings=512)).save_pretrained(
        folder / "model")
    save_bpe_tokenizer(folder / "model", [r["instruction"] + " " + r["output"] for r in records])


def test_a_run_relaunched_from_its_saved_config_is_the_same_run(tmp_path, capsys):
    tiny_model_and_data(tmp_path)
    (tmp_path / "run.yaml").write_text(f"model: {tmp_path / 'model'}\ndata: {tmp_path / 'data.json'}\n"
                                       "r: 4\nalpha: 8\nmax-steps: 3\nbatch-size: 2\ncutoff-len: 320\n"
                                       "log-every: 1\nprogress: false\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "first")]) == 0
    saved = json.loads((tmp_path / "first" / "train_config.json").read_text())
    assert saved["r"] == 4 and saved["out"] == str(tmp_path / "first")
    assert main(["train", "--config", str(tmp_path / "first" / "train_config.json"),
                 "--out", str(tmp_path / "again")]) == 0
    first, again = read_metrics(tmp_path / "first"), read_metrics(tmp_path / "again")
    assert [m["loss"] for m in again] == [m["loss"] for m in first]
    rc = main(["train", "--config", str(tmp_path / "nowhere.yaml")])
    assert rc == 2 and "nowhere.yaml: file not found" in capsys.readouterr().err


def test_a_run_started_with_relative_paths_relaunches_from_anywhere(tmp_path, monkeypatch, capsys):
    # The paths typed are relative to the folder the run started in: train_config.json holds them
    # absolute, so `--config RUN/train_config.json` works from any folder, for train and for plan.
    tiny_model_and_data(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    assert main(["train", "--model", "model", "--data", "data.json", "--out", "run", "--r", "4", "--max-steps", "1",
                 "--batch-size", "2", "--cutoff-len", "320", "--no-progress"]) == 0
    saved = json.loads((tmp_path / "work" / "run" / "train_config.json").read_text())
    for name, path in (("model", "model"), ("data", "data.json"), ("out", "run")):
        assert saved[name] == str(tmp_path / "work" / path), saved[name]
    assert saved["val_data"] == saved["chat_template"] == ""  # not given: not made into a path
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = str(tmp_path / "work" / "run" / "train_config.json")
    assert main(["train", "--config", config, "--out", "again"]) == 0
    assert (tmp_path / "elsewhere" / "again" / "adapter").is_dir()
    assert main(["train", "--config", config, "--resume", "--max-steps", "2"]) == 0  # continues the run there
    assert [m["step"] for m in read_metrics(tmp_path / "work" / "run")] == [1, 2]
    capsys.readouterr()
    assert main(["plan", "--config", config, "--json"]) == 0  # the model (and the setting) from the file
    planned = json.loads(capsys.readouterr().out)
    assert planned["model"]["name"] == "model" and planned["config"]["r"] == 4
    assert (planned["config"]["batch_size"], planned["config"]["seq_len"]) == (2, 320)  # seq_len: cutoff_len


def test_adapter_settings_reach_train_and_plan_by_name():
    """An adapter setting is an AdapterConfig field; TrainConfig and PlanConfig pass on every field
    of the same name (no hand-written copy to forget), with their own defaults."""
    from qdora.core.config import AdapterConfig
    from qdora.plan.memory import PlanConfig
    cfg = TrainConfig(model="m", data="d", out="o", method="dora", r=8, alpha=4.0, dropout=0.1, norm="exact",
                      target_modules=("q_proj",), magnitude_only_modules=("o_proj",), adapter_dtype="bfloat16",
                      seed=7)
    adapter = cfg.adapter_config()
    for name in AdapterConfig.shared_fields(TrainConfig):
        assert getattr(adapter, name) == getattr(cfg, name), name
    assert adapter.projection_seed == 7 and adapter.adapter_dtype == "bfloat16"
    plan_cfg = PlanConfig(method="qlora", r=4, block_rows=128, double_quant=False, target_modules="q_proj,v_proj")
    assert plan_cfg.adapter_config() == AdapterConfig(method="qlora", r=4, block_rows=128, double_quant=False,
                                                      target_modules=("q_proj", "v_proj"),
                                                      dropout=plan_cfg.dropout, adapter_dtype="float32")
    assert {"method", "r", "alpha", "dropout", "norm", "direction"} <= set(AdapterConfig.shared_fields(TrainConfig))


def test_a_yaml_config_is_read_as_the_command_line_reads_its_flags(tmp_path):
    # PyYAML reads `lr: 2e-4` as a string (YAML floats need a dot): taken as the number. A string
    # "false" is not a bool (it used to turn packing on), nor is 1.
    (tmp_path / "run.yaml").write_text("model: m\ndata: d\nout: o\nlr: 2e-4\nr: '8'\npacking: false\n"
                                       "train_on_prompt: true\nalpha: 16\n")
    cfg = parsed(["--config", str(tmp_path / "run.yaml")])
    assert (cfg.lr, cfg.r, cfg.packing, cfg.train_on_prompt, cfg.alpha) == (2e-4, 8, False, True, 16.0)
    assert type(cfg.r) is int and type(cfg.alpha) is float
    (tmp_path / "bad.yaml").write_text("model: m\ndata: d\nout: o\ntrain_on_prompt: 'no'\nr: 2.5\n")
    with pytest.raises(ValueError) as info:
        parsed(["--config", str(tmp_path / "bad.yaml")])
    assert "train_on_prompt: expected true or false, got 'no'" in str(info.value)
    assert "r: expected a whole number, got 2.5" in str(info.value)


def test_plan_takes_a_runs_train_config(tmp_path, capsys):
    # `qdora plan --config RUN/train_config.json`: the settings plan shares with train are read, the
    # rest skipped (it used to list ~30 "unknown setting" errors); a real unknown key is still one.
    settings = dataclasses.asdict(TrainConfig(model="m", data="d", out="o", method="qdora", r=8, alpha=16,
                                              batch_size=2, cutoff_len=512))
    (tmp_path / "train_config.json").write_text(json.dumps(settings))
    assert main(["plan", "--model", "SmolLM2-135M", "--config", str(tmp_path / "train_config.json"), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    text = json.dumps(planned)
    assert '"r": 8' in text and '"batch_size": 2' in text, text[:500]
    (tmp_path / "typo.json").write_text(json.dumps({**settings, "rnak": 8}))
    assert main(["plan", "--model", "SmolLM2-135M", "--config", str(tmp_path / "typo.json")]) == 2
    assert "unknown setting 'rnak'" in capsys.readouterr().err


def test_plan_without_a_model_says_where_to_give_one(tmp_path, capsys):
    (tmp_path / "setting.json").write_text(json.dumps({"r": 8, "seq_len": 512}))
    assert main(["plan", "--config", str(tmp_path / "setting.json")]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["plan", "--config", str(tmp_path / "setting.json"), "--model", "SmolLM2-135M", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["seq_len"] == 512


def test_keep_full_precision_is_an_option_and_a_config_key(tmp_path):
    base = ["--model", "m", "--data", "d", "--out", "o"]
    assert parsed(base).adapter_config().keep_full_precision == ("lm_head",)  # AdapterConfig's default
    cfg = parsed([*base, "--keep-full-precision", "lm_head,experts"])
    assert cfg.keep_full_precision == cfg.adapter_config().keep_full_precision == ("lm_head", "experts")
    (tmp_path / "run.yaml").write_text("model: m\ndata: d\nout: o\nkeep-full-precision: [lm_head, experts]\n")
    assert parsed(["--config", str(tmp_path / "run.yaml")]).adapter_config().keep_full_precision == \
        ("lm_head", "experts")
    (tmp_path / "run.json").write_text(json.dumps({"model": "m", "data": "d", "out": "o",
                                                   "keep_full_precision": "lm_head,experts.gate_up_proj"}))
    assert parsed(["--config", str(tmp_path / "run.json")]).adapter_config().keep_full_precision == \
        ("lm_head", "experts.gate_up_proj")


@pytest.mark.parametrize("argv, hint", [
    (["train", "--model", "m", "--data", "d", "--out", "o", "--max-stepz", "4"],
     "--max-stepz (did you mean --max-steps?)"),
    (["plan", "--model", "Llama-3-8B", "--batchsize", "2"], "--batchsize (did you mean --batch-size?)"),
    (["demo", "--stepz", "3"], "--stepz (did you mean --steps?)"),
])
def test_a_mistyped_option_names_the_nearest_one(argv, hint, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: unrecognized arguments: {hint}" in err, err
