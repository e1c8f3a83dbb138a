import dataclasses

import pytest

from qdora import AdapterConfig


def test_defaults_are_valid_and_frozen():
    cfg = AdapterConfig()
    assert cfg.method == "qdora" and cfg.use_dora and cfg.quantized
    assert cfg.scaling == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 8


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="qdroa"), r"method='qdroa' is unknown; use one of full, lora, dora, qlora, qdora"),
    (dict(r=0), r"r=0 must be a positive integer"),
    (dict(r=-4), r"r=-4 must be a positive integer"),
    (dict(r=8.5), r"r=8.5 must be a positive integer"),
    (dict(alpha=0), r"alpha=0 must be a positive number"),
    (dict(alpha=float("nan")), r"alpha=nan must be a positive number"),
    (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout=-0.1 must be in \[0, 1\)"),
    (dict(norm="exactly"), r"norm='exactly' is unknown; use 'detached' \(default\) or 'exact'"),
    (dict(target_modules=()), r"target_modules is empty"),
    (dict(target_modules=("q_proj", "")), r"must be a tuple of non-empty strings"),
    (dict(target_modules=("re:q_proj(",)), r"is not a valid regex"),
    (dict(adapter_dtype="float8"), r"adapter_dtype='float8' is unknown"),
    (dict(compute_dtype="int8"), r"compute_dtype='int8' is unknown"),
    (dict(block_rows=0), r"block_rows=0 must be a positive integer"),
    (dict(nf4_blocksize=48), r"nf4_blocksize=48 is not supported by bitsandbytes"),
    (dict(quant_storage="int4"), r"quant_storage='int4' is unknown"),
    (dict(eps=0.0), r"eps=0.0 must be a small positive number"),
    (dict(method="qlora", magnitude_only_modules=("o_proj",)), r"needs a DoRA method"),
])
def test_invalid_values_are_named_with_a_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kwargs)


def test_all_problems_are_reported_in_one_error():
    with pytest.raises(ValueError) as info:
        AdapterConfig(method="nope", r=0, alpha=-1, dropout=2.0, norm="x")
    text = str(info.value)
    for fragment in ("method='nope'", "r=0", "alpha=-1", "dropout=2.0", "norm='x'"):
        assert fragment in text


def test_normalisation_and_derived_values():
    cfg = AdapterConfig(target_modules=["q_proj", "v_proj"], adapter_dtype="bf16", compute_dtype="fp32",
                        quant_storage="bf16", r=16, alpha=32, use_rslora=True)
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert cfg.adapter_dtype == "bfloat16" and cfg.compute_dtype == "float32"
    assert cfg.quant_storage == "bfloat16"
    assert cfg.scaling == pytest.approx(32 / 4)
    assert AdapterConfig(target_modules="q_proj").target_modules == ("q_proj",)


def test_full_needs_no_rank_and_lora_has_no_magnitude():
    assert not AdapterConfig(method="full", r=0).use_dora
    assert not AdapterConfig(method="qlora").use_dora
    assert not AdapterConfig(method="dora").quantized


def test_half_rank_keeps_the_scale():
    cfg = AdapterConfig(r=32, alpha=64)
    half = cfg.half_rank()
    assert (half.r, half.alpha, half.scaling) == (16, 32, cfg.scaling)
    with pytest.raises(ValueError, match="half_rank\\(\\) needs r >= 2"):
        AdapterConfig(r=1, alpha=2).half_rank()


def test_dict_round_trip():
    cfg = AdapterConfig(method="dora", r=4, magnitude_only_modules=("o_proj",))
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown AdapterConfig fields \['rank'\]"):
        AdapterConfig.from_dict({"rank": 4})
