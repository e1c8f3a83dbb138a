"""DoRA with a VeRA direction: layer math against the fp64 oracle, shared projections, adapter I/O."""

import pytest
import torch
from conftest import FP32_TOL, assert_close
from models import build, llama2_config
from oracle import dora_reference
from torch import nn

from qdora import AdapterConfig, QDoRALinear, add_adapters, linear4bit_from_linear, load_adapter, save_adapter
from qdora.core.layer import VeRAProjections
from qdora.export.merge import merged_weight


def vera_layer(in_f, out_f, r, quantized=True, use_dora=True, norm="detached", projections=None):
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    base = linear4bit_from_linear(lin) if quantized else lin
    vera = projections or VeRAProjections(r, in_f, out_f, seed=3)
    layer = QDoRALinear(base, r=r, alpha=1.0, use_dora=use_dora, norm=norm, adapter_dtype=torch.float32,
                        vera=vera, vera_d_init=0.1)
    with torch.no_grad():  # make the adapter matter: λ_b ≠ 0, λ_d not constant, m ≠ ||W0||
        layer.vera_lambda_b.normal_(0, 0.5)
        layer.vera_lambda_d.uniform_(0.05, 0.3)
        if use_dora:
            layer.magnitude_delta.normal_(0, 0.3)
    return layer


# r = 40 > out = 24: VeRA's shared rank may exceed a layer's width (LoRA's may not).
@pytest.mark.parametrize("in_f,out_f,r", [(64, 48, 8), (128, 24, 40), (192, 67, 5)])
@pytest.mark.parametrize("norm", ["detached", "exact"])
@pytest.mark.parametrize("use_dora", [True, False])
def test_forward_and_gradients_match_oracle(in_f, out_f, r, norm, use_dora):
    layer = vera_layer(in_f, out_f, r, use_dora=use_dora, norm=norm)
    x = torch.randn(2, 7, in_f)
    dy = torch.randn(2, 7, out_f)
    xl = x.detach().clone().requires_grad_()
    y = layer(xl)
    y.backward(dy)

    # Oracle: materialize W0 + diag(λ_b)·B·diag(λ_d)·A in fp64, gradients by fp64 autograd.
    W0 = layer.dequantized_base().double()
    leaf = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    xr, d, b = leaf(x), leaf(layer.vera_lambda_d), leaf(layer.vera_lambda_b)
    A = layer.vera.A[:, :in_f].double() * d[:, None]
    B = layer.vera.B[:out_f].double() * b[:, None]
    m = leaf(layer.magnitude) if use_dora else None
    y_ref = dora_reference(xr, W0, A, B, m, 1.0, exact=norm == "exact", eps=layer.eps)
    y_ref.backward(dy.double())

    assert_close(y, y_ref, FP32_TOL, "y")
    assert_close(xl.grad, xr.grad, FP32_TOL, "dx")
    assert_close(layer.vera_lambda_d.grad, d.grad, FP32_TOL, "dλ_d")
    assert_close(layer.vera_lambda_b.grad, b.grad, FP32_TOL, "dλ_b")
    if use_dora:
        assert_close(layer.magnitude_delta.grad, m.grad, FP32_TOL, "dm")
    assert layer.vera.A.grad is None and not layer.vera.A.requires_grad  # projections stay frozen


def test_step_zero_is_the_base_and_only_lambdas_train():
    lin = nn.Linear(64, 32, bias=False)
    base = linear4bit_from_linear(lin)
    layer = QDoRALinear(base, r=16, alpha=1.0, adapter_dtype=torch.float32, vera=VeRAProjections(16, 64, 32))
    x = torch.randn(5, 64)
    assert_close(layer(x), x @ layer.dequantized_base().t(), FP32_TOL, "step 0 == base")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_d", "vera_lambda_b", "magnitude_delta"}
    assert layer.lora_A is None and layer.lora_B is None and layer.scaling == 1.0


def _vera_model(seed=0):
    torch.manual_seed(seed)
    return build(llama2_config())


def test_projections_are_shared_by_every_layer_and_sliced_per_shape():
    model = _vera_model()
    cfg = AdapterConfig(method="qdora", r=8, direction="vera", adapter_dtype="float32", dropout=0.0)
    add_adapters(model, cfg, verbose=False)
    layers = [m for m in model.modules() if isinstance(m, QDoRALinear)]
    assert len({id(layer.vera) for layer in layers}) == 1
    vera = layers[0].vera
    assert vera.A.shape == (8, max(m.in_features for m in layers))
    assert vera.B.shape == (max(m.out_features for m in layers), 8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(8 + 2 * m.out_features for m in layers)  # λ_d, λ_b and Δm per layer
    assert not any(k.startswith("vera") or ".vera." in k for k in model.state_dict())


def test_save_load_roundtrip_restores_outputs_and_merge(tmp_path):
    cfg = AdapterConfig(method="qdora", r=8, direction="vera", adapter_dtype="float32", dropout=0.0,
                        projection_seed=11)
    model = add_adapters(_vera_model(), cfg, verbose=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QDoRALinear)}
    with torch.no_grad():
        for layer in layers.values():
            layer.vera_lambda_b.normal_(0, 0.5)
            layer.magnitude_delta.normal_(0, 0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    saved = save_adapter(model, tmp_path / "adapter")

    other = add_adapters(_vera_model(), cfg.replace(projection_seed=99), verbose=False)  # other projections
    load_adapter(other, saved, verbose=False)  # the saved projections win over the seed
    with torch.no_grad():
        assert torch.equal(other(ids).logits, ref)
    name, layer = next(iter(layers.items()))
    other_layer = dict(other.named_modules())[name]
    W = merged_weight(layer, torch.float32)
    A, B = (t.double() for t in layer.direction_factors())
    W_ref = layer.dequantized_base().double() + B @ A
    W_ref = layer.magnitude.double()[:, None] * W_ref / W_ref.norm(dim=1, keepdim=True)
    assert_close(W, W_ref, FP32_TOL, "merged VeRA-DoRA weight")
    assert torch.equal(merged_weight(other_layer, torch.float32), W)

    with pytest.raises(ValueError, match="PEFT has no .* VeRA"):
        save_adapter(model, tmp_path / "peft", format="peft")


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="direction='low-rank' is unknown"):
        AdapterConfig(direction="low-rank")
    with pytest.raises(ValueError, match="direction='vera' needs an adapter method"):
        AdapterConfig(method="full", direction="vera")
    with pytest.raises(ValueError, match="vera_d_init=0"):
        AdapterConfig(direction="vera", vera_d_init=0)
    assert AdapterConfig(direction="vera", r=256, alpha=7).scaling == 1.0
    with pytest.raises(ValueError, match="do not cover"):
        vera_layer(64, 48, 8, projections=VeRAProjections(8, 32, 48))
