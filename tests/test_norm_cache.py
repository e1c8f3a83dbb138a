"""The eval-mode row-norm cache never serves a stale norm, whatever writes the adapter: every
optimizer transformers offers that builds here, in-place updates that bump no version counter
(`p.data.mul_()`, fused AdamW), whole-tensor swaps, dtype and device moves."""

import copy

import pytest
import torch
from conftest import FP32_TOL, assert_close
from oracle import dora_reference
from torch import nn

from qdora import QDoRALinear, linear4bit_from_linear
from qdora.core import function
from qdora.core.layer import VeRAProjections


def make_layer(in_f=96, out_f=48, r=4, vera=None):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    layer = QDoRALinear(linear4bit_from_linear(lin), r=r, alpha=2 * r, vera=vera)
    with torch.no_grad():  # make the adapter matter
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return layer


def uncached(layer, x):
    """The forward with the cache emptied first: the norm computed from the current tensors."""
    layer._norm_cache = None
    with torch.no_grad():
        return layer(x)


def oracle(layer, x):
    A, B = (t.detach().double() for t in layer.direction_factors())
    return dora_reference(x.double(), layer.dequantized_base().double(), A, B,
                          layer.magnitude.detach().double(), layer.scaling, eps=layer.eps)


@pytest.mark.parametrize("write", [
    "data.mul_", "data.copy_", "data[:]=", "data=", "foreach_add_", "load_state_dict", "swap back"])
def test_direct_writes_are_seen(write):
    layer = make_layer().eval()
    x = torch.randn(3, 96)
    with torch.no_grad():
        layer(x)  # fills the cache
        B = layer.lora_B
        before = B.detach().clone()
        if write == "data.mul_":
            B.data.mul_(1.5)
        elif write == "data.copy_":
            B.data.copy_(torch.randn_like(B))
        elif write == "data[:]=":
            B.data[:] = 0.7
        elif write == "data=":
            B.data = torch.randn_like(B)
        elif write == "foreach_add_":
            torch._foreach_add_([B.data, layer.lora_A.data], 0.3)
        elif write == "load_state_dict":
            state = layer.state_dict()
            state["lora_B"] = torch.randn_like(B)
            layer.load_state_dict(state, strict=False)
        elif write == "swap back":  # the cache's own tensors must not be the ones it compares against
            B.data.mul_(2.0)
            layer(x)
            B.data.copy_(before)
        y = layer(x)
    assert not torch.equal(layer.lora_B.detach(), before) or write == "swap back"
    assert torch.equal(y, uncached(layer, x))
    assert_close(y, oracle(layer, x), FP32_TOL, f"eval forward after {write}")


def test_a_hit_is_served_without_recomputing_the_norm(monkeypatch):
    """The cache still works: an unchanged adapter costs no `W0·Aᵀ` pass (`need_P` stays False)."""
    layer = make_layer().eval()
    x = torch.randn(1, 96)
    calls = []
    original = function.factored_norm_sq
    monkeypatch.setattr(function, "factored_norm_sq", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
        y3 = layer(x)
    assert len(calls) == 1
    assert torch.equal(y1, y2) and torch.equal(y2, y3)


def test_dtype_and_device_moves_and_scaling_are_seen():
    layer = make_layer().eval()
    x = torch.randn(3, 96)
    with torch.no_grad():
        layer(x)
        layer.scaling *= 2
        assert torch.equal(layer(x), uncached(layer, x))
        layer.lora_B.data = layer.lora_B.data.to(torch.float64)  # same values, another dtype
        layer(x)
        layer.lora_B.data = layer.lora_B.data.to(torch.float32) * 1.1
        assert torch.equal(layer(x), uncached(layer, x))


def test_vera_direction_is_checked_too():
    vera = VeRAProjections(4, 96, 48, seed=1)
    layer = make_layer(vera=vera).eval()
    x = torch.randn(3, 96)
    with torch.no_grad():
        layer(x)
        layer.vera_lambda_d.data.mul_(3.0)
        assert torch.equal(layer(x), uncached(layer, x))
        layer(x)
        vera.A.mul_(0.5)  # the shared projections are inputs of the norm as well
        assert torch.equal(layer(x), uncached(layer, x))


def test_inference_mode_norm_is_not_reused_under_autograd():
    """A norm cached inside `torch.inference_mode()` cannot be saved for a backward later."""
    layer = make_layer().eval()
    x = torch.randn(3, 96)
    with torch.inference_mode():
        layer(x)
    y = layer(x.requires_grad_())  # eval mode, grad on: must not raise
    y.sum().backward()
    assert layer.lora_A.grad is not None


# ---- every optimizer transformers offers, trained in eval mode (no dropout) ---------------------
def _optimizer_names():
    from transformers.training_args import OptimizerNames
    return [o.value for o in OptimizerNames]


# The names that must build on any CPU with the locked packages: a skip of these is a failure.
MUST_BUILD = {"adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"}


def _build(name, params, tmp_path):
    import transformers
    args = transformers.TrainingArguments(output_dir=str(tmp_path), optim=name, learning_rate=1e-2,
                                          use_cpu=True, report_to=[])
    holder = nn.Module()
    holder.params = nn.ParameterList(params)
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, holder)
    return cls(params, **kwargs)


@pytest.mark.parametrize("name", _optimizer_names())
def test_training_in_eval_mode_equals_training_in_train_mode(name, tmp_path):
    """Eval mode without dropout computes what train mode computes; only eval mode caches. So the two
    runs must agree to the bit, step after step, whatever the optimizer writes and however."""
    trained = make_layer()
    runs = {}
    for mode in ("train", "eval"):
        layer = copy.deepcopy(trained).train(mode == "train")
        params = [p for p in layer.parameters() if p.requires_grad]
        try:
            opt = _build(name, params, tmp_path)
        except Exception as e:  # noqa: BLE001  (a missing package, CUDA-only, or a model-level optimizer)
            if name in MUST_BUILD:
                raise
            pytest.skip(f"{name} does not build here: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        if hasattr(opt, "train"):  # schedule-free optimizers keep a mode of their own
            opt.train()
        torch.manual_seed(1)
        losses = []
        for _ in range(4):
            x, dy = torch.randn(5, 96), torch.randn(5, 48)
            loss = (layer(x) * dy).sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        layer.eval()
        with torch.no_grad():
            x = torch.randn(3, 96)
            runs[mode] = (losses, layer(x), layer)
    assert runs["train"][0] == runs["eval"][0], f"{name}: losses {runs['train'][0]} vs {runs['eval'][0]}"
    assert torch.equal(runs["eval"][1], runs["train"][1])
    assert torch.equal(runs["eval"][1], uncached(runs["eval"][2], x))
