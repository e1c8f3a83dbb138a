"""`qdora.patch_peft`: PEFT's DoRA computed by qdora's autograd function, against PEFT itself."""

import warnings

import bitsandbytes as bnb
import pytest
import torch
from conftest import FP32_TOL, assert_close
from models import build, llama3_config
from torch import nn

from qdora import linear4bit_from_linear

peft = pytest.importorskip("peft")
from qdora.integrations.peft import PeftPatch, patch_peft, unpatch_peft  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 1024, (2, 11), generator=torch.Generator().manual_seed(4))


def base_model(quantized: bool):
    """The tiny Llama-3 (every output width a multiple of 64), its linears but lm_head in NF4 or not."""
    model = build(llama3_config(hidden_size=64, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4))
    if quantized:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and name != "lm_head":
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, linear4bit_from_linear(mod))
    return model


def dora_model(quantized=True, dropout=0.0, targets=TARGETS, seed=0, **kw):
    model = peft.get_peft_model(base_model(quantized), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, target_modules=targets, **kw))
    torch.manual_seed(seed)
    with torch.no_grad():  # make the adapter matter: B random, m moved off ||W0||
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    return model


def step(model):
    """Logits and the gradients of every trainable tensor, for one loss."""
    model.zero_grad(set_to_none=True)
    out = model(IDS, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("quantized", [True, False], ids=["nf4", "plain"])
def test_patched_equals_peft_forward_and_gradients(quantized):
    model = dora_model(quantized)
    model.train()
    logits, grads = step(model)
    patch = patch_peft(model)
    assert len(patch.layers) == 14 and patch.skipped == {}
    assert not torch.allclose(logits, step(base_model(quantized))[0], atol=1e-3)  # the adapter matters
    patched_logits, patched_grads = step(model)
    assert_close(patched_logits, logits, FP32_TOL, "logits")
    assert sorted(patched_grads) == sorted(grads)
    kinds = {"lora_A": 0, "lora_B": 0, "lora_magnitude_vector": 0}
    for name, g in grads.items():
        assert_close(patched_grads[name], g, FP32_TOL, name)
        kinds[next(k for k in kinds if k in name)] += 1
    assert kinds == {"lora_A": 14, "lora_B": 14, "lora_magnitude_vector": 14}


def test_unpatch_gives_peft_its_forward_back(tmp_path):
    model = dora_model()
    model.eval()
    with torch.no_grad():
        before = model(IDS).logits
    with patch_peft(model) as patch:
        assert isinstance(patch, PeftPatch)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert "forward" in layer.__dict__
    assert "forward" not in layer.__dict__ and not hasattr(model, "_qdora_peft_patch")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)
    patch_peft(model)
    assert unpatch_peft(model) == 14 and unpatch_peft(model) == 0


def test_bad_input_is_refused_clearly():
    model = dora_model()
    patch_peft(model)
    with pytest.raises(ValueError, match="already patched by qdora.patch_peft"):
        patch_peft(model)
    lora_only = peft.get_peft_model(base_model(True), peft.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"no PEFT LoRA layer with a DoRA adapter.*use_dora=True"):
        patch_peft(lora_only)


def test_peft_version_outside_the_range_is_refused(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.99.0")
    with pytest.raises(ValueError, match=r"supports peft >= 0.21, < 0.22.*found peft 0.99.0"):
        patch_peft(dora_model())


def test_layers_it_cannot_take_are_left_to_peft_in_one_warning():
    model = dora_model(targets=TARGETS + ["embed_tokens"])
    with pytest.warns(UserWarning, match=r"left 1 DoRA layer\(s\) to PEFT: base_model.model.model.embed_tokens: "
                                         r"Embedding \(DoRA on embeddings"):
        patch = patch_peft(model)
    assert len(patch.layers) == 14


def test_switching_disabling_and_merging_keep_working(tmp_path):
    model = dora_model()
    model.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                               target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.other" in name:
                p.normal_(0, 0.1)
    model.eval()

    def logits():
        with torch.no_grad():
            return model(IDS).logits
    reference = {}
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        reference[adapter] = logits()
    with model.disable_adapter():
        reference["base"] = logits()
    patch_peft(model)
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        assert_close(logits(), reference[adapter], FP32_TOL, adapter)
    with model.disable_adapter():
        assert torch.equal(logits(), reference["base"])  # PEFT's own path
    model.set_adapter("default")
    # PEFT's save and load are untouched by the patch.
    model.save_pretrained(tmp_path / "saved", selected_adapters=["default"])
    fresh = peft.PeftModel.from_pretrained(base_model(True), tmp_path / "saved").eval()
    with torch.no_grad():
        assert_close(fresh(IDS).logits, reference["default"], FP32_TOL, "reloaded")


def test_peft_merge_equals_the_patched_model():
    # A plain base: PEFT wraps a 4-bit base it did not load itself (no `is_loaded_in_4bit`) in its
    # generic lora.Linear, whose merge cannot write 4-bit weights (PEFT 0.21, patched or not).
    model = dora_model(quantized=False).eval()
    patch_peft(model)
    with torch.no_grad():
        patched = model(IDS).logits
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    with torch.no_grad():
        assert_close(merged(IDS).logits, patched, FP32_TOL, "merged")


def test_peft_merge_of_zero_rows_is_finite_and_equals_the_patched_model():
    """Rows with ||W0 row|| = 0 (real checkpoints have hundreds) get m = 0 from PEFT and keep it under
    training, so PEFT's merge computes 0/0 there; a patched model merges them to 0, as its forward."""
    base = base_model(quantized=False)
    zeroed = {"model.layers.0.self_attn.o_proj": [0, 5, 17], "model.layers.1.mlp.down_proj": [3]}
    with torch.no_grad():
        for name, rows in zeroed.items():
            base.get_submodule(name).weight[rows] = 0
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                                      target_modules=TARGETS))
    patch_peft(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        patched = model(IDS).logits
    assert torch.isfinite(patched).all()
    merged = model.merge_and_unload()
    for name, rows in zeroed.items():
        weight = merged.get_submodule(name).weight
        assert torch.isfinite(weight).all(), f"{name}: non-finite merged weights"
        assert torch.equal(weight[rows], torch.zeros_like(weight[rows]))
    with torch.no_grad():
        assert_close(merged(IDS).logits, patched, FP32_TOL, "merged")


def test_patched_layers_keep_the_exact_nf4_weights_through_eval_mode():
    # On AVX512-BF16 CPUs bitsandbytes repacks a Linear4bit at its first eval-mode forward; a patched
    # layer's base never is, so eval-mode outputs equal train-mode ones (dropout 0) before and after.
    model = dora_model()
    patch_peft(model)
    model.train()
    with torch.no_grad():
        trained = model(IDS).logits
    model.eval()
    with torch.no_grad():
        first, second = model(IDS).logits, model(IDS).logits
    assert torch.equal(first, trained) and torch.equal(second, trained)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_a_repacked_base_is_refused():
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    model = dora_model()
    base = model.base_model.model.model.layers[1].mlp.up_proj.base_layer
    weight = base.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    with pytest.raises(ValueError, match="repacked by bitsandbytes"):
        patch_peft(model)


def test_dropout_applies_to_the_adapter_input_only():
    # With dropout the patched layer computes g·(W0·x + s·B·A·drop(x)); in eval mode (no dropout)
    # it equals PEFT's, in train mode both differ from the dropout-free output.
    model = dora_model(dropout=0.3)
    model.eval()
    with torch.no_grad():
        reference = model(IDS).logits
    patch_peft(model)
    with torch.no_grad():
        assert_close(model(IDS).logits, reference, FP32_TOL, "eval mode")
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            dropped = model(IDS).logits
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, reference, atol=1e-4)
