import pathlib

import pytest
import torch
from conftest import FP32_TOL, assert_close
from models import build, llama3_config
from torch import nn

from qdora import AdapterConfig, QDoRALinear, add_adapters, linear4bit_from_linear, load_adapter, save_adapter

peft = pytest.importorskip("peft")


def quantized_base(seed=0):
    """The tiny Llama with every linear but lm_head in NF4, as qdora quantizes it (deterministic).
    intermediate_size is a multiple of 64 here: for rows that are not whole NF4 blocks (e.g. a
    224-wide down_proj) bitsandbytes 0.50's CPU dequantization, which PEFT uses, is wrong
    (see tests/test_nf4.py), and the comparison would measure that bug."""
    model = build(llama3_config(intermediate_size=256), seed)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear4bit_from_linear(mod))
    return model


def adapted(cfg, seed=0):
    model = add_adapters(quantized_base(seed), cfg, verbose=False)
    with torch.no_grad():  # make the adapter matter
        for layer in model.modules():
            if isinstance(layer, QDoRALinear):
                if layer.lora_B is not None:
                    layer.lora_B.normal_(0, 0.1)
                if layer.magnitude_delta is not None:
                    layer.magnitude_delta.normal_(0, 0.1)
    return model.eval()


IDS = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(3))
CFG = AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0, adapter_dtype="float32")


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_qdora_format_round_trips_bitwise(tmp_path):
    cfg = CFG.replace(adapter_dtype="bfloat16", magnitude_only_modules=("o_proj",))
    model = adapted(cfg)
    save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter.safetensors", "qdora_adapter.json"]
    fresh = quantized_base()
    load_adapter(fresh, tmp_path / "ad", verbose=False)  # adds the adapters from the saved config
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert n1 == n2 and p1.dtype == p2.dtype and torch.equal(p1, p2), n1
    assert torch.equal(logits(model), logits(fresh))


def test_peft_loads_our_adapter_with_the_same_logits(tmp_path):
    model = adapted(CFG)
    save_adapter(model, tmp_path / "ad", format="peft")
    theirs = peft.PeftModel.from_pretrained(quantized_base(), tmp_path / "ad").eval()
    assert not torch.allclose(logits(model), logits(quantized_base()), atol=1e-3)  # adapter matters
    assert_close(logits(theirs), logits(model), FP32_TOL, "PEFT logits")


def test_peft_trained_dora_adapter_loads_into_qdora(tmp_path):
    theirs = peft.get_peft_model(quantized_base(), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # a few real PEFT training steps
        loss = theirs(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(quantized_base(), tmp_path / "peft", verbose=False)
    assert sum(isinstance(m, QDoRALinear) and m.use_dora for m in ours.modules()) == 10
    assert_close(logits(ours), logits(theirs), FP32_TOL, "logits")


def test_mismatches_are_listed(tmp_path):
    save_adapter(adapted(CFG), tmp_path / "r4")
    other = adapted(CFG.replace(r=8, alpha=16, target_modules=("q_proj", "v_proj", "o_proj")))
    with pytest.raises(ValueError) as info:
        load_adapter(other, tmp_path / "r4")
    text = str(info.value)
    assert "model.layers.0.self_attn.q_proj.lora_A: file shape (4, 64), model shape (8, 64)" in text
    assert "model.layers.0.self_attn.o_proj: in the model, not in the file" in text
    assert "model.layers.1.mlp.up_proj: in the file, not in the model" in text
    lora = adapted(CFG.replace(method="qlora"))
    with pytest.raises(ValueError, match=r"magnitude_delta: in the file but the model has no such tensor "
                                         r"\(the file is DoRA, the model LoRA\)"):
        load_adapter(lora, tmp_path / "r4")


def test_error_paths(tmp_path):
    with pytest.raises(ValueError, match="PEFT cannot represent magnitude-only modules"):
        save_adapter(adapted(CFG.replace(magnitude_only_modules=("o_proj",))), tmp_path / "x", format="peft")
    with pytest.raises(ValueError, match="format='gguf' is unknown"):
        save_adapter(adapted(CFG), tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match="has no qdora adapters"):
        save_adapter(quantized_base(), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        load_adapter(quantized_base(), tmp_path / "missing")
    (tmp_path / "pickled").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "pickled" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="holds neither qdora_adapter.json"):
        load_adapter(quantized_base(), tmp_path / "pickled")
    save_adapter(adapted(CFG), tmp_path / "bad")
    weights = tmp_path / "bad" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match=r"adapter.safetensors: not a readable safetensors file"):
        load_adapter(quantized_base(), tmp_path / "bad")


def test_saving_leaves_no_temporary_files(tmp_path):
    save_adapter(adapted(CFG), tmp_path / "ad", format="peft")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_no_pickle_loading_anywhere_in_the_library():
    root = pathlib.Path(__file__).resolve().parent.parent
    for folder in ("qdora", "kernels", "eval"):
        for source in (root / folder).rglob("*.py"):
            text = source.read_text()
            for call in ("torch.load(", "pickle.load", "import pickle", "weights_only=False"):
                assert call not in text, f"{source} uses {call}"


def test_peft_reads_our_adapter_on_a_transformers_4bit_base_kept_in_standard_layout(tmp_path):
    # A base loaded by transformers in 4-bit: on CPUs with AVX512-BF16 bitsandbytes repacks its
    # weights at the first eval-mode forward, which PEFT's DoRA then misreads (its own forward runs
    # the base layer first). qdora.keep_standard_layout right after loading prevents that.
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qdora import keep_standard_layout
    build(llama3_config(hidden_size=64, intermediate_size=256, num_attention_heads=8,
                        num_key_value_heads=4)).save_pretrained(tmp_path / "ckpt")
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=bnb_cfg,
                                                    device_map="cpu", dtype=torch.float32)
    ours = add_adapters(base(), CFG, verbose=False)
    with torch.no_grad():
        for layer in ours.modules():
            if isinstance(layer, QDoRALinear):
                layer.lora_B.normal_(0, 0.1)
                layer.magnitude_delta.normal_(0, 0.1)
    save_adapter(ours.eval(), tmp_path / "ad", format="peft")
    theirs_base = base()
    keep_standard_layout(theirs_base)
    theirs = peft.PeftModel.from_pretrained(theirs_base, tmp_path / "ad").eval()
    logits(theirs)  # a first eval-mode forward (where bitsandbytes would repack)
    assert_close(logits(theirs), logits(ours), FP32_TOL, "PEFT logits after an eval-mode forward")


def test_an_adapter_names_its_base_and_refuses_another(tmp_path):
    # Loaded on a model of another shape: one line naming both, not a list of every key that misses.
    save_adapter(adapted(CFG), tmp_path / "a")
    other = build(llama3_config(intermediate_size=256, hidden_size=128))
    with pytest.raises(ValueError, match=r"^adapter .* was trained on another base model \(hidden_size 64 in the "
                                         r"adapter's base, 128 here.*load it on the base it was trained on$"):
        load_adapter(other, tmp_path / "a", verbose=False)


def test_an_nf4_base_quantized_otherwise_is_named(tmp_path):
    # Trained on a double-quantized NF4 base, loaded on one quantized without: a warning that names it.
    save_adapter(adapted(CFG), tmp_path / "a")
    model = build(llama3_config(intermediate_size=256))
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear4bit_from_linear(mod, double_quant=False))
    with pytest.warns(UserWarning, match=r"quantized otherwise \(double_quant True then, False here\)"):
        load_adapter(model, tmp_path / "a", verbose=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same quantization: no word
        load_adapter(quantized_base(), tmp_path / "a", verbose=False)
