"""Deployment exports: NF4 (a transformers bitsandbytes 4-bit checkpoint) and GGUF, with --check.

Oracles: transformers' own bitsandbytes save (`from_pretrained(merged, quantization_config=...)
.save_pretrained`) for NF4, byte for byte; transformers' GGUF loader (which un-permutes q/k and
rebuilds the tokenizer) and the gguf package's reader for GGUF; the in-memory adapted model's
logits for both."""

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from models import build, llama2_config, llama3_config, save_bpe_tokenizer, save_tokenizer

from qdora import AdapterConfig, QDoRALinear, load_model, merge_and_save, merged_weight, save_adapter
from qdora.cli import main
from qdora.export.drift import held_out_texts

CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def make_base(path, config):
    build(config).save_pretrained(path, max_shard_size="200KB")
    tok = save_bpe_tokenizer(path, held_out_texts(40), vocab_size=config.vocab_size - 20)
    tok.chat_template = CHAT
    tok.save_pretrained(path)


def adapt(path, method="qdora"):
    cfg = AdapterConfig(method=method, r=4, alpha=8, dropout=0.0, adapter_dtype="float32")
    model, tok = load_model(path, method=method, cfg=cfg, progress=False)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QDoRALinear):
                layer.lora_B.normal_(0, 0.2)
                if layer.use_dora:
                    layer.set_magnitude(layer.magnitude * (1 + 0.5 * torch.rand(layer.out_features)))
    return model.eval(), tok


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    make_base(root / "base", llama3_config(vocab_size=420, tie_word_embeddings=True))
    model, tok = adapt(root / "base")
    save_adapter(model, root / "adapter")
    return root, model, tok


def ids_of(tok, text="Question: what is 12 + 7? Answer: the sum is 19."):
    return tok(text, return_tensors="pt").input_ids


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def read_all(folder):
    from safetensors import safe_open
    out = {}
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


# ---- NF4 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
def test_nf4_export_is_what_transformers_saves_for_the_merged_model(llama3, tmp_path, double_quant):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qdora.export.nf4 import save_nf4
    root, model, tok = llama3
    save_nf4(model, tmp_path / "nf4", tok, double_quant=double_quant, max_shard_size="30KB")
    assert len(list((tmp_path / "nf4").glob("*.safetensors"))) > 1  # sharded, with an index
    index = json.loads((tmp_path / "nf4" / "model.safetensors.index.json").read_text())
    # The oracle: transformers quantizes the plain bf16 merged checkpoint itself and saves it.
    merge_and_save(model, tmp_path / "bf16", tokenizer=tok)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=q).save_pretrained(tmp_path / "ref")
    ours, ref = read_all(tmp_path / "nf4"), read_all(tmp_path / "ref")
    assert set(ours) == set(ref) == set(index["weight_map"])
    assert any(k.endswith("quant_state.bitsandbytes__nf4") for k in ours)
    assert any(k.endswith("nested_absmax") for k in ours) == double_quant
    different = [k for k in ref if ours[k].dtype != ref[k].dtype or not torch.equal(ours[k], ref[k])]
    assert not different, different[:5]
    config, ref_config = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("nf4", "ref"))
    assert config["quantization_config"] == ref_config["quantization_config"]
    assert (tmp_path / "nf4" / "tokenizer.json").is_file()
    # Plain transformers loads it as a 4-bit model; its weights are the merged ones within NF4's error.
    import bitsandbytes as bnb
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    layer = loaded.model.layers[1].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    W = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    merged = merged_weight(model.model.layers[1].mlp.up_proj, torch.float32)
    # NF4's largest gap between code values is 0.28 of a block's absmax: half of it bounds the error.
    assert (W - merged).abs().max() <= 0.15 * merged.abs().max()


def test_nf4_export_streams_one_layer_at_a_time(tmp_path):
    from qdora.eval.bench.memory import peak_bytes
    from qdora.export.nf4 import save_nf4
    config = llama3_config(hidden_size=128, intermediate_size=512, num_hidden_layers=4, vocab_size=256)
    build(config).save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base", 256)
    model, _ = adapt(tmp_path / "base")
    from qdora.core.nf4 import quantize_nf4
    largest_fp32 = 512 * 128 * 4
    whole_fp32 = sum(p.numel() for p in build(config).parameters()) * 4
    # bitsandbytes' quantizer alone, on the largest layer, measured the same way: its temporaries.
    one_quantization = peak_bytes(lambda: quantize_nf4(torch.randn(512, 128).bfloat16(), 64, False))
    peak = peak_bytes(lambda: save_nf4(model, tmp_path / "nf4", max_shard_size="100MB"))
    # One merged layer in fp32 and its quantization; never the whole model.
    assert peak < 2 * largest_fp32 + one_quantization < whole_fp32 / 2, (peak, one_quantization, whole_fp32)


# ---- GGUF -------------------------------------------------------------------------------------

def load_gguf(folder):
    from transformers import AutoModelForCausalLM
    (file,) = Path(folder).glob("*.gguf")
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=file.name, dtype=torch.float32).eval(), file


@pytest.mark.parametrize("config", [llama2_config(vocab_size=420), llama3_config(vocab_size=420)],
                         ids=["llama2-mha", "llama3-gqa"])
def test_gguf_f32_reloads_with_transformers_as_the_adapted_model(tmp_path, config):
    from transformers import AutoTokenizer

    from qdora.export.gguf import save_gguf
    make_base(tmp_path / "base", config)
    model, tok = adapt(tmp_path / "base")
    file = save_gguf(model, tmp_path / "gguf", tok, quant="f32")
    reloaded, _ = load_gguf(tmp_path / "gguf")
    ids = ids_of(tok)
    # f32 throughout: only summation order differs, so q/k permutation, names and config round-trip.
    assert_close(logits(reloaded, ids), logits(model, ids), 1e-5, "GGUF f32 logits")
    assert reloaded.config.tie_word_embeddings is False and reloaded.config.num_key_value_heads == \
        config.num_key_value_heads
    gtok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    for text in held_out_texts(4):
        assert gtok(text).input_ids == tok(text).input_ids
    assert gtok.chat_template == CHAT


def test_gguf_types_follow_llama_cpp(llama3, tmp_path):
    import gguf

    from qdora.export.gguf import save_gguf
    root, model, tok = llama3
    t = gguf.GGMLQuantizationType
    for quant, main_type in (("q8_0", t.Q8_0), ("q4_0", t.Q4_0), ("f16", t.F16)):
        file = save_gguf(model, tmp_path / quant, tok, quant=quant)
        reader = gguf.GGUFReader(file)
        types = {x.name: x.tensor_type for x in reader.tensors}
        assert "output.weight" not in types  # tied: transformers re-ties it from its absence
        assert types["blk.0.attn_q.weight"] == main_type and types["blk.1.ffn_down.weight"] == main_type
        assert types["blk.0.attn_norm.weight"] == t.F32
        # With a 4-bit type the (tied) output head stays 8-bit, as llama.cpp keeps it high.
        assert types["token_embd.weight"] == (t.Q8_0 if quant == "q4_0" else main_type)
        assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
        assert reader.fields["tokenizer.chat_template"].contents() == CHAT
        # Each reloaded weight is the merged one within the type's rounding (independent of the permutation).
        reloaded, _ = load_gguf(tmp_path / quant)
        merged = merged_weight(model.model.layers[0].self_attn.k_proj, torch.float32)
        W = reloaded.model.layers[0].self_attn.k_proj.weight
        bound = {"q8_0": 1 / 127, "q4_0": 1 / 7, "f16": 1e-3}[quant]  # half a step of the block's scale, x2
        assert (W - merged).abs().max() <= bound * merged.abs().max()


def test_gguf_refuses_what_it_cannot_write_before_loading(tmp_path, capsys, monkeypatch):
    from transformers import MistralConfig, MistralForCausalLM

    import qdora.models.loading
    monkeypatch.setattr(qdora.models.loading, "load_model",
                        lambda *a, **k: pytest.fail("model loaded before the check"))
    cfg = dict(vocab_size=420, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2)
    MistralForCausalLM(MistralConfig(**cfg)).save_pretrained(tmp_path / "mistral")
    save_bpe_tokenizer(tmp_path / "mistral", held_out_texts(10), vocab_size=300)
    build(llama3_config(vocab_size=256)).save_pretrained(tmp_path / "wordlevel")
    save_tokenizer(tmp_path / "wordlevel", 256)
    make_base(tmp_path / "llama", llama3_config(vocab_size=420))
    adapter = tmp_path / "adapter"
    save_adapter(adapt(tmp_path / "llama")[0], adapter)
    (tmp_path / "exists").mkdir()
    cases = [
        ("mistral", ["--format", "gguf"], "supports the Llama family .* this model is 'mistral'"),
        ("wordlevel", ["--format", "gguf"], "not a byte-level BPE one"),
        ("llama", ["--format", "gguf", "--quant", "q4_k_m"], "GGUF type 'q4_k_m' is unknown; choose one of f32"),
        ("llama", ["--format", "gguf", "--dtype", "float16"], "--dtype does not apply to --format gguf"),
        ("llama", ["--format", "nf4", "--quant", "q8_0"], "--quant q8_0 applies to --format gguf only"),
        ("llama", ["--double-quant"], "--double-quant applies to --format nf4 only"),
        ("llama", ["--format", "nf4", "--out", str(tmp_path / "exists")], "exists; pass --overwrite"),
    ]
    capsys.readouterr()
    for model, extra, expected in cases:
        args = ["merge", "--model", str(tmp_path / model), "--adapter", str(adapter), "--out", str(tmp_path / "o"),
                *extra]
        assert main(args) == 2, (model, extra)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("qdora merge: error: "), err
        assert re.search(expected, err), err
    assert not (tmp_path / "o").exists()


# ---- --check, end to end through the command line ---------------------------------------------

@pytest.mark.parametrize("fmt", [["--format", "nf4"], ["--format", "gguf", "--quant", "f32"],
                                 ["--dtype", "float32"]], ids=["nf4", "gguf-f32", "fp32"])
def test_cli_check_reports_drift_beside_the_floor(llama3, tmp_path, capsys, fmt):
    root, model, tok = llama3
    out = tmp_path / "out"
    assert main(["merge", "--model", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out),
                 *fmt, "--check-json", str(tmp_path / "drift.json"), "--check-texts", "2"]) == 0
    text = capsys.readouterr().out
    assert "merged on the dequantized NF4 weights vs the adapted NF4 model" in text and "(floor)" in text
    report = json.loads((tmp_path / "drift.json").read_text())
    assert set(report["adapted"]) == set(report["base"]) == set(report["adapter"]) == {"probe", "held-out"}
    a, floor = report["adapted"]["held-out"], report["base"]["held-out"]
    effect = report["adapter"]["held-out"]  # adapted vs unadapted NF4 model: what the export must keep
    assert effect["tv_mean"] > 3 * a["tv_mean"] and effect["ppl"] != a["ppl_ref"]
    assert a["texts"] == 2 and a["tokens"] > 50
    if fmt[-1] in ("f32", "float32"):  # lossless formats: drift at fp32 rounding, floor exactly 0 or close
        assert a["max_rel"] < 1e-5 and a["argmax_agree"] == 1.0 and abs(a["ppl"] - a["ppl_ref"]) < 1e-3
        assert floor["max_abs"] < 1e-4
    else:  # NF4 again: the drift is of the size the floor shows for re-quantizing the base
        assert 0 < a["tv_mean"] < 0.1 and 0 < floor["tv_mean"] < 0.1
    assert not [p.name for p in tmp_path.iterdir() if ".base-" in p.name or ".tmp-" in p.name]


# ---- a full disk leaves nothing behind ---------------------------------------------------------

@pytest.mark.parametrize("fmt", [["--format", "nf4"], ["--format", "gguf"]], ids=["nf4", "gguf"])
def test_a_full_disk_is_one_line_and_leaves_no_folder(llama3, tmp_path, capsys, fmt):
    root, model, tok = llama3
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("needs root to mount a small tmpfs (test_a_write_error_leaves_no_folder covers the logic)")
    try:
        rc = main(["merge", "--model", str(root / "base"), "--adapter", str(root / "adapter"),
                   "--out", str(disk / "out"), *fmt])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "No space left on device" in err, err
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("fmt", ["nf4", "gguf"])
def test_a_write_error_leaves_no_folder(llama3, tmp_path, fmt, monkeypatch):
    root, model, tok = llama3
    calls = {"n": 0}

    def full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    if fmt == "nf4":
        import qdora.export.nf4 as module
        real = module.check_finite
        monkeypatch.setattr(module, "check_finite", full)
        run = lambda: module.save_nf4(model, tmp_path / "out", tok)  # noqa: E731
    else:
        import gguf

        import qdora.export.gguf  # noqa: F401
        real = gguf.GGUFWriter.write_tensor_data
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", lambda self, *a: full(self, *a))
        run = lambda: qdora.export.gguf.save_gguf(model, tmp_path / "out", tok)  # noqa: E731
    with pytest.raises(OSError, match="No space left"):
        run()
    assert calls["n"] == 3 and os.listdir(tmp_path) == []


# ---- a llama.cpp runtime, where one is installed ------------------------------------------------

def test_llama_cpp_generates_from_the_gguf(llama3, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="no llama.cpp runtime (llama-cpp-python) installed")
    from qdora.export.gguf import save_gguf
    root, model, tok = llama3
    file = save_gguf(model, tmp_path / "gguf", tok, quant="f32")
    llm = llama_cpp.Llama(model_path=str(file), n_ctx=128, verbose=False, logits_all=True)
    ids = ids_of(tok)[0].tolist()
    llm.eval(ids)
    import numpy as np
    ours = logits(model, ids_of(tok))[0]
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)]))
    assert_close(theirs.float(), ours, 1e-3, "llama.cpp logits")
