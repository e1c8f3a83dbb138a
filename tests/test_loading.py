"""The shard-by-shard NF4 loader, on tiny Llama-2- and Llama-3-shaped checkpoints built here."""

import json
import os

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from conftest import assert_close
from models import build, llama2_config, llama3_config, save_tokenizer
from oracle import nf4_roundtrip
from torch import nn

from qdora import AdapterConfig, QDoRALinear, load_model
from qdora.core.nf4 import QUANT_CHUNK
from qdora.models.loading import TRIM_EVERY, CheckpointReader

CONFIGS = {"llama2": llama2_config(), "llama3": llama3_config(),
           "llama3-tied": llama3_config(tie_word_embeddings=True)}


@pytest.fixture(params=sorted(CONFIGS))
def checkpoint(request, tmp_path):
    config = CONFIGS[request.param]
    model = build(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="150KB")
    save_tokenizer(tmp_path / "ckpt", config.vocab_size)
    return tmp_path / "ckpt", config


def test_checkpoint_is_sharded(checkpoint):
    path, _ = checkpoint
    assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(path.glob("model-*.safetensors"))) > 1


def test_qdora_load_quantizes_linears_as_they_arrive(checkpoint):
    path, config = checkpoint
    model, tok = load_model(path, method="qdora", cfg=AdapterConfig(r=4, alpha=8), progress=False)
    reader = CheckpointReader(path)
    assert tok is not None and tok.eos_token == "</s>"
    for name, mod in model.named_modules():
        if isinstance(mod, QDoRALinear):
            mod = mod.base_layer
        if isinstance(mod, bnb.nn.Linear4bit):
            original = reader.get(f"{name.removesuffix('.base_layer')}.weight")
            packed, state = bnbF.quantize_4bit(original, blocksize=64, compress_statistics=True, quant_type="nf4")
            assert torch.equal(mod.weight.data, packed), name  # NF4 of the checkpoint tensor, bit for bit
            assert torch.equal(mod.weight.quant_state.absmax, state.absmax), name
    linear_names = {n for n, m in build(config).named_modules() if isinstance(m, nn.Linear)}
    nf4 = {n.removesuffix(".base_layer") for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert nf4 == linear_names - {"lm_head"}
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32  # fp32 on CPU
    embed = model.model.embed_tokens.weight
    assert torch.equal(embed, reader.get("model.embed_tokens.weight").float())
    if config.tie_word_embeddings:
        assert model.lm_head.weight is embed
    assert not any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))


def test_step_zero_logits_equal_a_transformers_load_quantized_the_same_way(checkpoint):
    """Oracle: plain transformers in fp32 whose linear weights are the NF4 round trip (bitsandbytes
    quantization, plain-torch dequantization) of the checkpoint's bf16 weights."""
    from transformers import AutoModelForCausalLM
    path, config = checkpoint
    ours, _ = load_model(path, method="qdora", cfg=AdapterConfig(r=4, alpha=8, dropout=0.0), progress=False)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # bf16 values, upcast exactly
    reader = CheckpointReader(path)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, nn.Linear) and name != "lm_head":
                mod.weight.copy_(nf4_roundtrip(reader.get(f"{name}.weight")))
    ref = ref.eval()
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        assert_close(ours.eval()(ids).logits, ref(ids).logits, 1e-5, "logits")


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
def test_unquantized_methods_keep_the_weights(tmp_path, method):
    build(llama2_config()).save_pretrained(tmp_path / "ckpt", max_shard_size="150KB")
    model, tok = load_model(tmp_path / "ckpt", method=method, progress=False)
    assert tok is None  # no tokenizer files in this folder
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    reader = CheckpointReader(tmp_path / "ckpt")
    q = model.model.layers[0].self_attn.q_proj
    weight = q.weight if method == "full" else q.base_layer.weight
    assert torch.equal(weight, reader.get("model.layers.0.self_attn.q_proj.weight"))
    assert all(p.requires_grad for p in model.parameters()) == (method == "full")


@pytest.mark.slow
def test_loading_peaks_near_the_nf4_model_plus_one_shard(tmp_path):
    from qdora.eval.bench.load import measure
    config = llama2_config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, vocab_size=1024)
    build(config).save_pretrained(tmp_path / "ckpt", max_shard_size="20MB")  # fp32, ~210 MB on disk
    plain = measure(tmp_path / "ckpt", "transformers-fp32")
    ours = measure(tmp_path / "ckpt", "qlora")
    shard = max(p.stat().st_size for p in (tmp_path / "ckpt").glob("*.safetensors"))
    largest = 2816 * 1024
    assert ours["model_bytes"] < 0.25 * plain["model_bytes"]
    # RSS growth: the resident NF4 model, one mapped shard, one tensor read from it (fp32), the
    # quantizer's live temporaries for one chunk and the freed ones not yet returned to the OS
    # (~14 bytes per element each), and 16 MiB of allocator slack.
    bound = ours["model_bytes"] + shard + 4 * largest + 14 * (QUANT_CHUNK + TRIM_EVERY) + 16 * 2**20
    assert ours["peak_growth_bytes"] < bound, (ours, bound)
    print(f"peak RSS growth: qdora {ours['peak_growth_bytes'] / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, "
          f"transformers fp32 {plain['peak_growth_bytes'] / 2**20:.0f} MiB")
    assert ours["peak_growth_bytes"] < 0.6 * plain["peak_growth_bytes"], (ours, plain)


def test_a_model_loaded_by_transformers_in_4bit_is_adapted_in_place(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    build(llama3_config(intermediate_size=256)).save_pretrained(tmp_path / "ckpt")
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=bnb_cfg, device_map="cpu",
                                                 dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    packed_ptr = q.weight.data_ptr()
    ids = torch.randint(0, 1024, (1, 7))
    # Train mode: in eval mode bitsandbytes' own CPU forward repacks the weight for an AVX512-BF16
    # kernel (and fails on these small shapes); qdora turns that off for the layers it adopts.
    model.train()
    with torch.no_grad():
        before = model(ids).logits
    from qdora import add_adapters
    add_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0), verbose=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QDoRALinear) and layer.base_layer.weight.data_ptr() == packed_ptr
    with torch.no_grad():
        assert_close(model(ids).logits, before, 1e-5, "step-0 logits")


def test_error_messages_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found: .*nowhere"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    ckpt = tmp_path / "ckpt"
    build(llama2_config()).save_pretrained(ckpt, max_shard_size="150KB")
    shards = sorted(ckpt.glob("model-*.safetensors"))
    # a truncated shard
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{shards[1].name}: corrupt or truncated safetensors file"):
        load_model(ckpt, progress=False)
    # a shard missing from the index
    os.remove(shards[1])
    missing = f"shard\\(s\\) listed in model.safetensors.index.json are missing: {shards[1].name}"
    with pytest.raises(FileNotFoundError, match=missing):
        load_model(ckpt, progress=False)
    # pickle checkpoints are refused, not loaded
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (ckpt / "config.json").rename(pickled / "config.json")
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not loaded"):
        load_model(pickled, progress=False)


def test_a_model_without_the_target_modules_lists_its_linears(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"(?s)target 'q_proj' matches no linear module.*leaf names: lm_head"):
        load_model(tmp_path / "gpt2", method="qdora", progress=False)


# ---- adopting a model that transformers loaded in 4-bit and that has already run ------------------
# On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit weight in place at its first eval-mode
# forward and rounds the NF4 scales to bf16 (lossy). All output widths below are multiples of 32, the
# block bitsandbytes' repacking needs.

REPACKABLE = llama3_config(hidden_size=64, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)
EVAL_IDS = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(11))


def _transformers_4bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu", dtype=torch.float32)


def _eval_forward(model):
    model.eval()
    with torch.no_grad():
        return model(EVAL_IDS).logits


def _repack(model):
    """What bitsandbytes' eval-mode CPU forward does to each layer on an AVX512-BF16 CPU (done by
    the forward itself where the CPU has it, by bitsandbytes' own function elsewhere)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16
    if has_avx512bf16():
        _eval_forward(model)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and not getattr(m.weight.quant_state, "packing_format_for_cpu", False):
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)


def test_a_4bit_model_that_ran_in_eval_mode_is_adopted_bit_for_bit(tmp_path):
    from qdora import keep_standard_layout, load_adapter, save_adapter
    build(REPACKABLE).save_pretrained(tmp_path / "ckpt")
    cfg = AdapterConfig(r=4, alpha=8, dropout=0.0)
    unrun = add_adapters_quietly(_transformers_4bit(tmp_path / "ckpt"), cfg)
    with torch.no_grad():  # make the adapter matter
        for layer in unrun.modules():
            if isinstance(layer, QDoRALinear):
                layer.lora_B.normal_(0, 0.1)
                layer.magnitude_delta.normal_(0, 0.1)
    save_adapter(unrun, tmp_path / "adapter")
    reference = _eval_forward(unrun)

    ran = _transformers_4bit(tmp_path / "ckpt")
    assert keep_standard_layout(ran) == 14  # 2 layers x 7 linears; lm_head stays unquantized
    base_logits = _eval_forward(ran)  # an eval-mode forward before the adapters
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in ran.modules() if isinstance(m, bnb.nn.Linear4bit))
    load_adapter(ran, tmp_path / "adapter", verbose=False)
    assert torch.equal(_eval_forward(ran), reference)
    assert not torch.allclose(base_logits, reference, atol=1e-3)  # the adapter matters


def add_adapters_quietly(model, cfg):
    from qdora import add_adapters
    return add_adapters(model, cfg, verbose=False)


def test_a_repacked_4bit_model_is_refused_with_the_fix(tmp_path):
    from qdora import keep_standard_layout, load_adapter, save_adapter
    build(REPACKABLE).save_pretrained(tmp_path / "ckpt")
    cfg = AdapterConfig(r=4, alpha=8, dropout=0.0)
    save_adapter(add_adapters_quietly(_transformers_4bit(tmp_path / "ckpt"), cfg), tmp_path / "adapter")
    model = _transformers_4bit(tmp_path / "ckpt")
    _repack(model)
    fix = (r"14 bnb.nn.Linear4bit layer\(s\) \(e.g. model.layers.0.self_attn.q_proj\) were repacked by bitsandbytes "
           r".* rounds their NF4 scales to bf16.* qdora.keep_standard_layout\(model\) right after loading it")
    with pytest.raises(ValueError, match=fix):
        add_adapters_quietly(model, cfg)
    with pytest.raises(ValueError, match=fix):
        load_adapter(model, tmp_path / "adapter", verbose=False)
    with pytest.raises(ValueError, match=fix):
        keep_standard_layout(model)
    assert not any(isinstance(m, QDoRALinear) for m in model.modules())  # refused before any change
