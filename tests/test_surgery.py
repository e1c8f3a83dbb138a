import bitsandbytes as bnb
import pytest
import torch
from conftest import assert_close
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qdora import AdapterConfig, QDoRALinear, add_adapters, linear4bit_from_linear, param_report

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def tiny_llama(intermediate=128, layers=2):
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def adapted(names, model):
    return {n for n, m in model.named_modules() if isinstance(m, QDoRALinear)} & set(names) == set(names)


def test_qdora_wraps_targets_quantizes_and_freezes(capsys):
    model = tiny_llama()
    add_adapters(model, AdapterConfig(method="qdora", r=4, alpha=8, target_modules=TARGETS))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QDoRALinear)}
    assert len(layers) == 2 * len(TARGETS)
    assert all(n.rsplit(".", 1)[-1] in TARGETS for n in layers)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) and m.use_dora and m.r == 4 for m in layers.values())
    # Not targeted: frozen, quantized like a 4-bit load would; lm_head stays in full precision.
    assert isinstance(model.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude_delta") for n in trainable)
    report = param_report(model)
    expected = sum(m.lora_A.numel() + m.lora_B.numel() + m.magnitude_delta.numel() for m in layers.values())
    assert report.trainable == expected and report.adapted_modules == 10
    assert "trainable params: " + f"{expected:,}" in capsys.readouterr().out


def test_step_zero_logits_equal_the_quantized_model():
    model = tiny_llama()
    quantized = tiny_llama()
    for name, mod in list(quantized.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(quantized.get_submodule(parent), child, linear4bit_from_linear(mod))
    ids = torch.randint(0, 96, (2, 11))
    add_adapters(model, AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        assert_close(model(ids).logits, quantized(ids).logits, 1e-5, "logits")


def test_quantize_frozen_can_be_turned_off():
    model = tiny_llama()
    add_adapters(model, AdapterConfig(r=4, alpha=8, quantize_frozen=False), verbose=False)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear


def test_adopts_bnb_linear4bit_layers_in_place():
    model = tiny_llama()
    for name, mod in list(model.named_modules()):
        if name.endswith("v_proj"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear4bit_from_linear(mod))
    ptr = model.model.layers[0].self_attn.v_proj.weight.data_ptr()
    add_adapters(model, AdapterConfig(method="qdora", r=4, alpha=8, target_modules=("v_proj",)), verbose=False)
    layer = model.model.layers[0].self_attn.v_proj
    assert isinstance(layer, QDoRALinear) and layer.base_layer.weight.data_ptr() == ptr  # not re-quantized


def test_dora_and_lora_keep_an_unquantized_base():
    for method, use_dora in (("dora", True), ("lora", False)):
        model = tiny_llama()
        w = model.model.layers[1].mlp.up_proj.weight
        add_adapters(model, AdapterConfig(method=method, r=4, alpha=8, target_modules=TARGETS), verbose=False)
        layer = model.model.layers[1].mlp.up_proj
        assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight is w and layer.use_dora == use_dora
        model(torch.randint(0, 96, (1, 5))).logits.sum().backward()
        assert layer.lora_A.grad is not None and w.grad is None


def test_matching_by_suffix_exact_name_and_regex():
    model = tiny_llama()
    cfg = AdapterConfig(method="qdora", r=2, alpha=4,
                        target_modules=("model.layers.0.self_attn.q_proj", "re:.*layers\\.1\\.mlp\\.(up|down)_proj"))
    add_adapters(model, cfg, verbose=False)
    names = {n for n, m in model.named_modules() if isinstance(m, QDoRALinear)}
    assert names == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}


def test_magnitude_only_modules_train_only_m():
    model = tiny_llama()
    cfg = AdapterConfig(method="qdora", r=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj"),
                        magnitude_only_modules=("o_proj", "gate_proj", "up_proj", "down_proj"))
    add_adapters(model, cfg, verbose=False)
    o = model.model.layers[0].self_attn.o_proj
    q = model.model.layers[0].self_attn.q_proj
    assert o.r == 0 and o.lora_A is None and o.magnitude_delta.requires_grad
    assert q.r == 4
    report = param_report(model)
    assert (report.adapted_modules, report.magnitude_only_modules) == (6, 8)
    model.train()
    model(torch.randint(0, 96, (1, 5))).logits.sum().backward()
    assert o.magnitude_delta.grad is not None and o.magnitude_delta.grad.abs().sum() > 0


def test_half_rank_dora():
    model = tiny_llama()
    add_adapters(model, AdapterConfig(method="dora", r=8, alpha=16).half_rank(), verbose=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.r == 4 and layer.scaling == 2.0


def test_full_fine_tuning_trains_everything():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    add_adapters(model, AdapterConfig(method="full"), verbose=False)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, QDoRALinear) for m in model.modules())


def test_no_match_lists_the_linear_modules():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"(?s)target 'c_attn' matches no linear module.*leaf names: "
                                         r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        add_adapters(model, AdapterConfig(target_modules=("c_attn",)))


def test_applying_twice_is_an_error():
    model = tiny_llama()
    add_adapters(model, AdapterConfig(r=2, alpha=4), verbose=False)
    with pytest.raises(ValueError, match="model already has qdora adapters"):
        add_adapters(model, AdapterConfig(r=2, alpha=4), verbose=False)


def test_rank_too_large_for_a_layer_names_it():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"r=48 exceeds model.layers.0.self_attn.k_proj \(32x64\); use r <= 32"):
        add_adapters(model, AdapterConfig(r=48, alpha=96), verbose=False)


def test_method_mismatches_are_explained():
    model = tiny_llama()
    v = model.model.layers[0].self_attn.v_proj
    model.model.layers[0].self_attn.v_proj = linear4bit_from_linear(v)
    with pytest.raises(ValueError, match="expects an unquantized base; use method='qdora'"):
        add_adapters(model, AdapterConfig(method="dora"), verbose=False)
    with pytest.raises(ValueError, match="method='full' cannot train NF4 weights"):
        add_adapters(model, AdapterConfig(method="full"), verbose=False)


def test_qdora_training_step_on_a_tiny_llama_reduces_loss():
    model = tiny_llama()
    add_adapters(model, AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0, adapter_dtype="float32"),
                 verbose=False)
    model.train()
    ids = torch.randint(0, 96, (4, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("targets", [("all",), ("all-linear",)])
def test_all_linear_adapts_every_linear_but_the_output_head(targets):
    # As PEFT's `all-linear`; `qdora plan` already took both names.
    model = tiny_llama()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    add_adapters(model, AdapterConfig(method="qdora", r=4, alpha=8, target_modules=targets))
    adapted_names = sorted(n for n, m in model.named_modules() if isinstance(m, QDoRALinear))
    assert adapted_names == sorted(linears) and len(adapted_names) == 2 * 7
    assert not isinstance(model.lm_head, QDoRALinear)
