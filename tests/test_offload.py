"""Checkpointed layer inputs held in host memory (`qdora.offload_activations`): against plain
non-reentrant gradient checkpointing (as `qdora.train.setup.prepare_for_training` enables it), loss and
every trainable gradient, with and without dropout (the RNG replay), with a frozen first layer, over two
steps and two accumulated micro-batches, on a Qwen3-MoE, under PEFT and on a layer returning a tuple;
the copies it makes (count,
bytes, host peak, order of the prefetch, nothing left after a step); what it refuses; and on CUDA, the
same equality and the device memory it saves in the backward.

Tolerance on CPU: none, the results are compared bitwise (`torch.equal`). The offloaded backward runs
the same ops on the same values as checkpointing's recompute (the layer input comes back as an exact
copy, the RNG and autocast state are restored the same way), and CPU kernels are deterministic, so
nothing can round differently; measured: every loss and gradient here is bitwise equal."""

import contextlib
import functools
import gc
import weakref

import pytest
import torch
from conftest import FP32_TOL, assert_close
from models import build, llama3_config

import qdora
from qdora import AdapterConfig, QDoRALinear, add_adapters, offload_activations
from qdora.models.offload import HeldInput, OffloadedActivations
from qdora.train.setup import prepare_for_training

transformers = pytest.importorskip("transformers")

L, B, T, H = 3, 2, 16, 64
"""Layers, batch, tokens, hidden size of the tiny Llama (`tests/models.py`'s `llama3_config`)."""
HELD = B * T * H * 4
"""Bytes of one layer input (fp32)."""
ALL = ("q_proj", "v_proj", "up_proj", "down_proj")


def adapted(targets=ALL, dropout=0.0, method="qdora", layers=L, device="cpu", **config):
    """The tiny Llama with adapters that matter (B ≠ 0) and checkpointing enabled the qdora way."""
    model = build(llama3_config(num_hidden_layers=layers, **config)).to(device)
    add_adapters(model, AdapterConfig(method=method, r=4, alpha=8, dropout=dropout, target_modules=targets,
                                      compute_dtype="float32"), verbose=False)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QDoRALinear) and layer.lora_B is not None:
                layer.lora_B.normal_(0, 0.2)
    prepare_for_training(model)
    return model


def tokens(seed=1, device="cpu", shape=(B, T)):
    return torch.randint(0, 1024, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def step(model, ids, seed=7, micro=1):
    """Loss and every trainable gradient of one step (of `micro` accumulated micro-batches of `ids`)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = []
    for chunk in ids.chunk(micro):
        loss = model(chunk, labels=chunk).loss / micro
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters()
                                 if p.requires_grad and p.grad is not None}


def assert_equal(got, want):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert torch.equal(loss, ref_loss), (loss, ref_loss)
    assert sorted(grads) == sorted(ref_grads) and grads
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), f"{name}: max difference {(grads[name] - g).abs().max():.3e}"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_loss_and_gradients_equal_plain_checkpointing_bitwise(dropout):
    model = adapted(dropout=dropout)
    ids = tokens()
    plain = step(model, ids)
    assert all(g.abs().max() > 0 for g in plain[1].values())  # every adapter tensor gets a gradient
    if dropout:  # the masks matter: another RNG state gives another loss
        assert not torch.equal(step(model, ids, seed=8)[0], plain[0])
    with offload_activations(model) as handle:
        assert_equal(step(model, ids), plain)
        assert handle.stats.to_host == handle.stats.to_device == L
    assert not handle.active
    assert_equal(step(model, ids), plain)  # removed: plain checkpointing again


def test_remove_restores_the_checkpoint_function_it_replaced():
    model = adapted()
    layers = list(model.model.layers)
    before = [layer._gradient_checkpointing_func for layer in layers]
    handle = offload_activations(model)
    assert isinstance(handle, OffloadedActivations)
    assert all(layer._gradient_checkpointing_func is not f for layer, f in zip(layers, before))
    handle.remove()
    handle.remove()  # twice is harmless
    assert all(layer._gradient_checkpointing_func is f for layer, f in zip(layers, before))
    assert qdora.offload_activations is offload_activations


@pytest.mark.parametrize("case", ["mlp-only", "middle-layer-only"])
def test_gradients_reach_adapters_when_the_first_layer_input_needs_none(case):
    model = adapted(targets=("up_proj", "down_proj"))
    with_input_grads = step(model, tokens())
    model.disable_input_require_grads()  # the embeddings' output needs no gradient: nor does layer 0's input
    if case == "middle-layer-only":
        for name, p in model.named_parameters():
            p.requires_grad_(p.requires_grad and ".layers.1." in name)
    ids = tokens()
    plain = step(model, ids)
    assert all(g.abs().max() > 0 for g in plain[1].values())
    with offload_activations(model) as handle:
        assert_equal(step(model, ids), plain)
        # a layer whose input needs no gradient and that has no trainable parameter builds no graph
        assert handle.stats.to_host == (L if case == "mlp-only" else L - 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(plain[1]) == trainable
    if case == "mlp-only":  # the input's gradient changes none of the adapters'
        assert_equal(plain, with_input_grads)


def test_copies_per_step_host_peak_and_nothing_left_after_backward():
    model = adapted(dropout=0.1)
    ids = tokens()
    with offload_activations(model) as handle:
        for _ in range(2):  # the counters start again with each step; nothing is carried over
            out = model(ids, labels=ids)
            stats = handle.stats
            assert (stats.to_host, stats.to_device, handle.pending) == (L, 0, L)
            assert stats.bytes_to_host == stats.host_bytes == L * HELD
            out.loss.backward()
            assert (stats.to_host, stats.to_device, handle.pending) == (L, L, 0)
            assert stats.bytes_to_host == L * HELD and stats.host_bytes == 0
            assert stats.host_bytes_peak == handle.host_bytes_peak == L * HELD
        model(ids, labels=ids)  # a forward whose graph is dropped without a backward lets its copies go
        assert handle.pending == 0 and handle.stats.host_bytes == 0
        handle.stats.reset()
        assert (handle.stats.to_host, handle.stats.host_bytes_peak) == (0, 0)


@pytest.mark.parametrize("offloaded", [False, True])
def test_the_layer_inputs_themselves_are_let_go_between_forward_and_backward(offloaded):
    """Offloading saves device memory only if nothing else keeps the device tensors: after the forward, every
    layer's input (not its host copy) is gone; plain checkpointing keeps them all (the control)."""
    model = adapted(dropout=0.1)
    inputs = []

    def remember(layer, args, kwargs):
        inputs.append(weakref.ref(args[0] if args else kwargs["hidden_states"]))

    hooks = [layer.register_forward_pre_hook(remember, with_kwargs=True) for layer in model.model.layers]
    if offloaded:  # as qdora train does: else autograd keeps the embeddings' output, a leaf that asks for a gradient
        model.disable_input_require_grads()
    ids = tokens()
    with offload_activations(model) if offloaded else contextlib.nullcontext():
        loss = model(ids, labels=ids).loss
        gc.collect()
        alive = [r() is not None for r in inputs]
        loss.backward()
    for hook in hooks:
        hook.remove()
    assert len(alive) == L and alive == [not offloaded] * L


def test_each_backward_prefetches_the_input_of_the_layer_before_it(monkeypatch):
    model = adapted()
    ids = tokens()
    fetched = []
    fetch = HeldInput.fetch

    def spy(held):
        if held.device_copy is None:  # a copy starts, not a fetch already done
            fetched.append((held.position, held.handle.pending))
        fetch(held)

    monkeypatch.setattr(HeldInput, "fetch", spy)
    with offload_activations(model):
        model(ids, labels=ids).loss.backward()
    # layer 2's backward fetches its own input and starts layer 1's while all three are still held;
    # layer 1's finds its own there and starts layer 0's; layer 0's finds its own there
    assert fetched == [(2, 3), (1, 3), (0, 2)]


def test_two_steps_and_accumulated_micro_batches_equal_plain_checkpointing():
    ids = tokens(shape=(2 * B, T))
    results = []
    for offload in (False, True):
        model = adapted(dropout=0.1)
        handle = offload_activations(model) if offload else None
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        torch.manual_seed(3)  # once: the second step's masks come from the RNG the first left
        steps = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            losses = []
            for chunk in ids.chunk(2):
                loss = model(chunk, labels=chunk).loss / 2
                loss.backward()
                losses.append(loss.detach())
            steps.append((torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.requires_grad}))
            optimizer.step()
        if handle:
            assert handle.stats.to_host == L and handle.pending == 0  # per micro-batch
        results.append(steps)
    for got, want in zip(results[1], results[0]):
        assert_equal(got, want)
    assert not torch.equal(results[0][0][0], results[0][1][0])  # the step changed something


def test_a_model_without_gradient_checkpointing_is_refused():
    model = build(llama3_config())
    add_adapters(model, AdapterConfig(method="lora", r=4, target_modules=("q_proj",)), verbose=False)
    with pytest.raises(ValueError, match="^--offload-activations needs gradient checkpointing: it is off on "
                                         "LlamaForCausalLM; enable it first") as info:
        offload_activations(model)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="it has no GradientCheckpointingLayer"):
        offload_activations(torch.nn.Linear(2, 2))


def test_a_tensor_argument_needing_a_gradient_is_refused():
    model = adapted()
    layer = model.model.layers[0]
    x = torch.randn(1, 4, H, requires_grad=True)
    cos, sin = model.model.rotary_emb(x, torch.arange(4)[None])
    with offload_activations(model):
        with pytest.raises(ValueError, match=r"keyword argument 'position_embeddings' of LlamaDecoderLayer requires "
                                             r"grad; only the hidden states") as info:
            layer(x, position_embeddings=(cos.requires_grad_(), sin))
        assert "\n" not in str(info.value)
        with pytest.raises(ValueError, match="first positional argument must be its hidden states"):
            layer(torch.arange(4)[None], position_embeddings=(cos.detach(), sin))
        assert layer(x, position_embeddings=(cos.detach(), sin)).requires_grad  # small kwargs are kept as they are


MOE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
           decoder_sparse_step=1, max_position_embeddings=64)


def tiny_moe(output_router_logits):
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**MOE,
                                                                          output_router_logits=output_router_logits))
    add_adapters(model, AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj"),
                                      compute_dtype="float32"), verbose=False)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QDoRALinear):
                layer.lora_B.normal_(0, 0.2)
    prepare_for_training(model)
    return model


def test_a_qwen3_moe_offloaded_equals_plain_checkpointing():
    model = tiny_moe(output_router_logits=False)
    ids = torch.randint(3, 97, (B, 13), generator=torch.Generator().manual_seed(1))
    plain = step(model, ids)
    with offload_activations(model) as handle:
        assert_equal(step(model, ids), plain)
        assert handle.stats.to_host == MOE["num_hidden_layers"]


def test_an_moe_recording_router_logits_is_refused():
    # transformers records router logits with a forward hook inside the layer: in a forward without a graph
    # they carry no gradient (plain checkpointing records them with one), so the load-balancing loss is dead
    with pytest.raises(ValueError, match="^--offload-activations cannot run an MoE with output_router_logits=True"):
        offload_activations(tiny_moe(output_router_logits=True))
    model = tiny_moe(output_router_logits=False)
    ids = torch.randint(3, 97, (B, 13), generator=torch.Generator().manual_seed(1))
    with offload_activations(model):  # asked for per call, it reaches each layer as a keyword
        with pytest.raises(ValueError, match="Qwen3MoeDecoderLayer was asked for router logits"):
            model(ids, labels=ids, output_router_logits=True)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT 0.21 reads it
def test_a_peft_model_is_offloaded_through_its_base_model():
    peft = pytest.importorskip("peft")
    model = build(llama3_config(num_hidden_layers=2))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                       init_lora_weights=False))
    prepare_for_training(model.get_base_model())
    ids = tokens()
    plain = step(model, ids)
    with offload_activations(model) as handle:
        assert handle.model is model.get_base_model()
        assert_equal(step(model, ids), plain)
        assert handle.stats.to_host == 2


# ---- CUDA -------------------------------------------------------------------------------------------

def cuda(test):
    """Marked `cuda` (pyproject's marker) and skipped, with the reason shown, without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@cuda
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_on_cuda_offloaded_equals_plain_checkpointing(dropout):
    # Tolerance 2 × FP32_TOL (tests/conftest.py): the same fp32 ops run on both paths, but some CUDA
    # backward kernels (attention's, index and scatter sums) add with atomics in no fixed order, so each
    # result is only within FP32_TOL of the exact one (and a kernel may be chosen differently for a forward
    # without a graph, so the loss gets the same bound).
    model = adapted(dropout=dropout, method="lora", device="cuda")
    ids = tokens(device="cuda")
    loss, grads = step(model, ids)
    with offload_activations(model) as handle:
        got_loss, got = step(model, ids)
        assert handle.stats.to_host == handle.stats.to_device == L and handle.pending == 0
    assert_close(got_loss, loss, 2 * FP32_TOL, "loss")
    assert sorted(got) == sorted(grads)
    for name, g in grads.items():
        assert_close(got[name], g, 2 * FP32_TOL, name)


def backward_peak(model, ids) -> int:
    """Bytes allocated at most during the backward, above what was allocated before the forward."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    loss = model(ids, labels=ids).loss
    torch.cuda.synchronize()  # every copy to the host has ended and let its device block go
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


@cuda
def test_on_cuda_the_backward_peak_is_lower_by_the_offloaded_checkpoints():
    # 16 layers, h = 256, 8192 tokens (fp32): a layer input is 8 MiB, the checkpoints 128 MiB. When the
    # backward reaches the top layer, plain checkpointing holds all 16. The offload holds at most 4 then
    # (and from then on): layer 0's input (the embeddings' output, made a leaf that needs a gradient by
    # `enable_input_require_grads`: the graph keeps it for its .grad either way), the input of the layer
    # being recomputed, the one being prefetched, and the recomputed layer output, which plain
    # checkpointing's early-stopping recompute need not form. Everything else (weights, the head's and
    # the loss's tensors, a layer's recompute) is the same on both paths, so the backward's peak is about
    # 16 − 4 layer inputs lower; asserted: at least half the checkpoints (8), which leaves 4 of slack.
    # Adapters on q and v only, so weights and gradients are small beside the checkpoints.
    layers, tokens_, hidden = 16, 8192, 256
    model = adapted(targets=("q_proj", "v_proj"), method="lora", layers=layers, device="cuda", hidden_size=hidden,
                    intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                    max_position_embeddings=tokens_)
    ids = torch.randint(0, 256, (1, tokens_), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    held = tokens_ * hidden * 4
    backward_peak(model, ids)  # warm-up: kernels, workspaces, cuBLAS handles
    plain = backward_peak(model, ids)
    with offload_activations(model) as handle:
        backward_peak(model, ids)  # warm-up of the side stream and the pinned buffers
        offloaded = backward_peak(model, ids)
        assert handle.stats.host_bytes_peak == layers * held and handle.pending == 0
    assert plain - offloaded >= layers // 2 * held, (offloaded / 2**20, plain / 2**20)



class TupleLayer(transformers.modeling_layers.GradientCheckpointingLayer):
    """A layer returning a tuple (as transformers 4's did): hidden states, an integer tensor, None."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x, scale=None):
        y = x + self.drop(torch.tanh(self.proj(x))) * scale
        return y, y.argmax(-1), None


def test_a_layer_returning_a_tuple_equals_plain_checkpointing():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([TupleLayer() for _ in range(3)]).train()
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    layers[0].proj.requires_grad_(False)
    x0 = torch.randn(2, 5, 8)
    scale = torch.tensor(0.5)

    def run():
        layers.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        x = x0
        for layer in layers:
            x, index, none = layer(x, scale=scale)
            assert index.dtype == torch.int64 and not index.requires_grad and none is None
        x.square().sum().backward()
        return x.detach(), {n: p.grad for n, p in layers.named_parameters() if p.requires_grad}

    plain = run()
    with offload_activations(layers) as handle:
        assert_equal(run(), plain)
        assert handle.stats.to_host == 2  # layer 0: frozen, and its input needs no gradient


def test_a_trainable_tensor_the_layer_does_not_own_is_refused_at_the_backward():
    model = adapted()
    model.extra = torch.nn.Parameter(torch.zeros(H))
    model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, i, out: out + model.extra)
    ids = tokens()
    assert step(model, ids)[1]["extra"].abs().max() > 0  # plain checkpointing reaches it
    with offload_activations(model):
        with pytest.raises(RuntimeError, match=r"LlamaDecoderLayer uses a trainable tensor of shape \(64,\) that is "
                                               "not one of its own parameters"):
            step(model, ids)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_an_fsdp_sharded_model_is_refused():
    from torch.distributed.fsdp import FSDPModule  # only where torch has torch.distributed

    model = adapted()
    layer = model.model.layers[0]  # the class fully_shard gives a sharded module (without the sharding)
    layer.__class__ = type(f"FSDP{type(layer).__name__}", (FSDPModule, type(layer)), {})
    with pytest.raises(ValueError, match="^--offload-activations does not work with FSDP"):
        offload_activations(model)


def test_a_hook_on_a_parameter_runs_once_per_backward_as_with_plain_checkpointing():
    model = adapted()
    param = model.model.layers[1].self_attn.q_proj.lora_A
    calls = []
    param.register_hook(lambda g: calls.append(1) or g * 2)  # a hook that changes the gradient
    ids = tokens()
    plain = step(model, ids)
    with offload_activations(model):
        assert_equal(step(model, ids), plain)
    assert len(calls) == 2  # one per step
