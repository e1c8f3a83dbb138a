"""The tiled MLP (`qdora.tiled_mlp`, `qdora.models.tiled_mlp`): loss and every trainable gradient of tiny
Llama models (qdora adapters, gradient checkpointing on and off, tiles that divide the tokens and tiles
that do not) against the same model untiled, and a fully trained one against its fp64 copy; grads that
reach an MLP whose input needs none; dropout masks replayed in the backward; MoE blocks; a PEFT model;
short and no-grad calls untouched, bit for bit; the peak memory it saves; the refusals; `remove()`.

Tolerances: `FP32_TOL` (tests/conftest.py), derived from fp32 unit roundoff times the accumulation length
(≤ 1151 terms: here the longest sums are the logsumexp over V = 1024 and the weight gradients' sums over
T = 74 tokens), relative to the largest reference entry. Against the fp64 oracle: `FP32_TOL`. Tiled against
untiled fp32: two fp32 results each within that bound of the exact value, so twice it. Where no rounding
can differ (short calls, no-grad calls, after `remove()`), bit for bit."""

import contextlib
import copy

import pytest
import torch
from conftest import FP32_TOL, assert_close
from models import build, llama3_config, perturb

import qdora
from qdora import AdapterConfig, add_adapters
from qdora.models.tiled_mlp import TiledApply, find_tiled_mlp, tiled_mlp
from qdora.train.setup import prepare_for_training

transformers = pytest.importorskip("transformers")

TOL = 2 * FP32_TOL  # tiled against untiled: two fp32 results (module docstring)
B, S = 2, 37
T = B * S  # 74 tokens
ALL = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
IDS = torch.randint(0, 1024, (B, S), generator=torch.Generator().manual_seed(1))


def adapted(targets=ALL, dropout=0.0, gc=False, method="qdora"):
    model = build(llama3_config())
    add_adapters(model, AdapterConfig(method=method, r=4, alpha=8, dropout=dropout, target_modules=targets),
                 verbose=False)
    prepare_for_training(perturb(model), gradient_checkpointing=gc)
    return model


def run(model, ids=IDS, seed=None):
    """Loss and every trainable tensor's gradient of one forward + backward (`seed`: for dropout)."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = model(ids, labels=ids).loss
    kinds = graph(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads, kinds


def graph(t):
    """The class names of every node in `t`'s autograd graph."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


def assert_same(got, want, tol=TOL):
    (loss, grads, _), (ref, ref_grads, _) = got, want
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    assert sorted(grads) == sorted(ref_grads) and grads
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], tol, name)


# ---- the dense model against untiled and fp64 -----------------------------------------------------------------

@pytest.mark.parametrize("gc", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("tile", [1, 16, 37, T - 1, T, None])
def test_loss_and_gradients_equal_the_untiled_model(tile, gc):
    model = adapted(gc=gc)
    untiled = run(model)
    with tiled_mlp(model, tile) as handle:
        assert handle.layers == 2 and handle.tile_tokens == (tile or 64)  # default: hidden_size
        tiled = run(model)
    assert ("TiledApplyBackward" in tiled[2]) == (handle.tile_tokens < T)  # T <= tile: the MLP's own forward
    assert_same(tiled, untiled)
    assert any(".mlp." in n for n in tiled[1]) and any(".self_attn." in n for n in tiled[1])


@pytest.mark.parametrize("tile", [1, 16, 37])
def test_fully_trained_model_equals_its_fp64_copy(tile):
    """An independent oracle: the same weights in fp64, untiled. (NF4 layers have no fp64 forward, so
    the adapted models are checked against their own untiled fp32 forward above.)"""
    model = build(llama3_config()).train().requires_grad_(True)
    oracle = run(copy.deepcopy(model).double())
    with tiled_mlp(model, tile):
        tiled = run(model)
    assert "TiledApplyBackward" in tiled[2]
    assert_same(tiled, oracle, FP32_TOL)
    assert tiled[1]["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32


def test_gradients_reach_an_mlp_whose_input_needs_none():
    """Only the MLPs are adapted, everything else frozen: the first layer's MLP input comes from frozen
    embeddings and attention, so only the parameters put the tiled function in the graph."""
    model = adapted(targets=MLP)
    needs = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, args: needs.append(args[0].requires_grad))
    untiled = run(model)
    with tiled_mlp(model, 16):
        tiled = run(model)
    hook.remove()
    assert needs == [False, False]
    first = {n: g for n, g in tiled[1].items() if n.startswith("model.layers.0.mlp.")}
    assert len(first) == 3 * 3 and all(g.abs().max() > 0 for g in first.values())  # A, B, m of 3 projections
    assert_same(tiled, untiled)


# ---- dropout: the backward replays the forward's masks ------------------------------------------------------

@contextlib.contextmanager
def tile_loop(model, tile):
    """The oracle for dropout: each MLP run tile by tile with plain autograd (no recompute, no RNG replay),
    so its masks are drawn in the same order as the tiled forward draws them."""
    mlps = [layer.mlp for layer in model.model.layers]
    for mlp in mlps:
        own = mlp.forward
        mlp.forward = lambda x, own=own: torch.cat(
            [own(t[None]).reshape(-1, x.shape[-1]) for t in x.reshape(-1, x.shape[-1]).split(tile)]).view_as(x)
    try:
        yield
    finally:
        for mlp in mlps:
            del mlp.forward


@pytest.mark.parametrize("gc", [False, True], ids=["plain", "checkpointed"])
def test_dropout_masks_are_replayed_in_the_backward(gc):
    model = adapted(dropout=0.3, gc=gc)
    with tile_loop(model, 16):
        oracle = run(model, seed=7)
    with tiled_mlp(model, 16):
        tiled = run(model, seed=7)
    assert_same(tiled, oracle)
    assert abs(run(model, seed=8)[0] - oracle[0]) > 1e-3  # another seed: other masks (the dropout bites)


@pytest.mark.parametrize("gc", [False, True], ids=["plain", "checkpointed"])
def test_dropout_on_one_projection_equals_untiled(gc):
    """With one masked projection per MLP the tiles draw the untiled mask's random words in the same
    order (`qdora.core.dropout.drop_mask`: 4 elements per word, and 16 · 224 is a multiple of 4)."""
    model = adapted(targets=("down_proj",), dropout=0.3, gc=gc)
    untiled = run(model, seed=7)
    with tiled_mlp(model, 16):
        tiled = run(model, seed=7)
    assert_same(tiled, untiled)


def test_the_dropout_check_fails_without_the_rng_replay(monkeypatch):
    model = adapted(dropout=0.3)
    with tile_loop(model, 16):
        oracle = run(model, seed=7)
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)  # the recompute draws fresh masks
    with tiled_mlp(model, 16):
        tiled = run(model, seed=7)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_same(tiled, oracle)


# ---- mixture of experts, PEFT ---------------------------------------------------------------------------

MOE = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=8, moe_intermediate_size=16, num_experts=4, decoder_sparse_step=1)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4)),
}


def moe(name, output_router_logits=False):
    config_class, extra = MOE[name]
    config = getattr(transformers, config_class)(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2,
        output_router_logits=output_router_logits, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    add_adapters(model, AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0,
                                      target_modules=("q_proj", "experts", "gate")), verbose=False)
    return perturb(model).train()


MOE_IDS = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("tile", [1, 5])
@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_loss_and_gradients_equal_the_untiled_model(name, tile):
    model = moe(name)
    untiled = run(model, MOE_IDS)
    with tiled_mlp(model, tile):
        tiled = run(model, MOE_IDS)
    assert "TiledApplyBackward" in tiled[2]
    assert_same(tiled, untiled)
    assert any(".experts." in n for n in tiled[1]) and any(".gate." in n for n in tiled[1])


@pytest.mark.parametrize("tiling", [tiled_mlp, qdora.tiled_layers], ids=["mlp", "layers"])
def test_a_peft_model_is_tiled_through_its_base_model(tiling):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build(llama3_config()), peft.LoraConfig(r=4, target_modules=list(ALL)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.train()
    untiled = run(model)
    with tiling(model, 16) as handle:
        assert handle.layers == 2 and find_tiled_mlp(model) is handle
        tiled = run(model)
        loss = model(IDS, labels=IDS).loss
    assert "TiledApplyBackward" in tiled[2]
    # the MLPs; with the layers also the norms (the first input norm's input needs no gradient), q and v, final norm
    assert tiled_nodes(loss) == (2 if tiling is tiled_mlp else 2 * 5 - 1 + 1)
    assert_same(tiled, untiled)


# ---- calls left alone --------------------------------------------------------------------------------

def test_short_and_no_grad_calls_are_the_mlps_own_forward_bit_for_bit():
    model = adapted()
    short, long = IDS[:, :8], IDS  # 16 tokens, then 74
    want_short = model(short).logits
    with torch.no_grad():
        want_long = model.eval()(long).logits
    with tiled_mlp(model, 16):
        got_short = model.train()(short).logits  # grad enabled, train mode, T = tile
        with torch.no_grad():
            got_long = model.eval()(long).logits  # inference (eval mode, no grad): never tiled
    assert torch.equal(got_short, want_short) and torch.equal(got_long, want_long)
    assert not any("Tiled" in kind for kind in graph(got_short))


def test_a_training_forward_without_grad_is_tiled_too(monkeypatch):
    """An offloaded checkpoint's forward and a DPO reference's run in train mode without autograd: tiled, so
    their working set is one tile's too, and equal to untiled."""
    model = adapted(dropout=0.0)
    with torch.no_grad():
        want = model(IDS).logits
    mlp_class, calls = type(model.model.layers[0].mlp), []
    own = mlp_class.forward
    monkeypatch.setattr(mlp_class, "forward", lambda self, x: calls.append(tuple(x.shape)) or own(self, x))
    with tiled_mlp(model, 16), torch.no_grad():
        got = model(IDS).logits
    assert calls == [(1, 16, 64)] * 4 + [(1, 10, 64)] + [(1, 16, 64)] * 4 + [(1, 10, 64)]  # 74 tokens, 2 layers
    assert_close(got, want, TOL, "logits")


def test_remove_gives_the_forward_back():
    model = adapted()
    mlp = model.model.layers[1].mlp
    own = lambda x: type(mlp).forward(mlp, x)  # noqa: E731  (someone's instance forward, kept through it all)
    mlp.forward = own
    before = model(IDS).logits
    handle = tiled_mlp(model, 16)
    tiled = model(IDS).logits
    handle.remove()
    after = model(IDS).logits
    assert torch.equal(after, before) and "TiledApplyBackward" in graph(tiled)
    assert mlp.__dict__["forward"] is own and "forward" not in model.model.layers[0].mlp.__dict__
    assert not any(key.startswith("_qdora") for layer in model.model.layers for key in layer.mlp.__dict__)
    assert find_tiled_mlp(model) is None
    tiled_mlp(model, 8).remove()  # tiling again after remove() is fine


# ---- memory --------------------------------------------------------------------------------------------

def test_the_backward_peak_is_bounded_by_the_tile():
    peak_bytes = pytest.importorskip("qdora.eval.bench.memory").peak_bytes
    tokens, h, i, tile = 4096, 64, 256, 256
    mlp = transformers.models.llama.modeling_llama.LlamaMLP(llama3_config(hidden_size=h, intermediate_size=i))
    x = torch.randn(1, tokens, h, requires_grad=True)

    def step(tiled):
        y = TiledApply.apply(mlp.forward, tile, x, *mlp.parameters()) if tiled else mlp(x)
        y.backward(torch.ones_like(y))

    untiled, tiled = peak_bytes(lambda: step(False)), peak_bytes(lambda: step(True))
    # Untiled, autograd keeps gate, up, silu(gate) and their product: 4 tokens × i fp32 tensors (16 MiB),
    # then the backward adds their gradients. Tiled: y, dy and dx are tokens × h (1 MiB each, a quarter
    # of one tokens × i tensor), one tile's intermediates are tile × i (256 KiB each), and the weight
    # gradients with their fp32 sums 2 × 3 × h × i × 4 bytes (384 KiB).
    assert untiled >= 4 * tokens * i * 4
    assert tiled <= 4 * tokens * h * 4 + 12 * tile * i * 4 + 2 * 3 * h * i * 4  # 7.4 MiB
    assert tiled < untiled / 2


# ---- refusals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_a_tile_below_one_is_one_line_before_any_work(bad):
    model = build(llama3_config())
    with pytest.raises(ValueError, match=r"tile_tokens=.* must be an integer >= 1") as info:
        tiled_mlp(model, bad)
    assert "\n" not in str(info.value)
    assert "forward" not in model.model.layers[0].mlp.__dict__


def test_a_model_without_decoder_mlps_is_refused():
    with pytest.raises(ValueError, match="no decoder layer with an `mlp`"):
        tiled_mlp(torch.nn.Sequential(torch.nn.Linear(4, 4)), 8)


def test_tiling_twice_is_refused_until_removed():
    model = build(llama3_config())
    handle = qdora.tiled_mlp(model, 8)
    with pytest.raises(ValueError, match=r"already tiled \(tile_tokens=8\); call .remove\(\)") as info:
        tiled_mlp(model, 16)
    assert "\n" not in str(info.value)
    handle.remove()


def test_router_logits_are_refused():
    """transformers records router logits with a hook on the router: tiled, one per tile, without grad."""
    with pytest.raises(ValueError, match="output_router_logits=True.*Turn output_router_logits off") as info:
        tiled_mlp(moe("qwen3_moe", output_router_logits=True), 5)
    assert "\n" not in str(info.value)
    model = moe("qwen3_moe")
    with tiled_mlp(model, 5):
        with pytest.raises(ValueError, match="called with output_router_logits=True"):
            model(MOE_IDS, labels=MOE_IDS, output_router_logits=True)
        short = model(MOE_IDS[:, :2], labels=MOE_IDS[:, :2], output_router_logits=True)  # 4 tokens: not tiled
        assert len(short.router_logits) == 2 and short.router_logits[0].shape == (4, 4)
        run(model, MOE_IDS)  # the flag does not outlive the call


# ---- tiled layers: norms, trained attention projections, q/k norms, final norm, MLP -----------------------------

def tiled_nodes(t) -> int:
    """How many tiled functions `t`'s autograd graph holds."""
    seen, todo, count = set(), [t.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "TiledApplyBackward"
        todo += [n for n, _ in node.next_functions]
    return count


ATTENTION_ALL = ("q_proj", "k_proj", "v_proj", "o_proj") + MLP


@pytest.mark.parametrize("gc", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("tile", [1, 16, None])
def test_tiled_layers_equal_the_untiled_model(tile, gc):
    model = adapted(targets=ATTENTION_ALL, gc=gc)
    untiled = run(model)
    with qdora.tiled_layers(model, tile) as handle:
        assert handle.parts == "layers" and handle.layers == 2 and find_tiled_mlp(model) is handle
        tiled = run(model)
        loss = model(IDS, labels=IDS).loss
    if not gc:  # (checkpointed, the graph holds the layers' checkpoints instead)
        # per layer: 2 norms, 4 projections, the MLP; the first layer's input norm needs no gradient (frozen
        # embeddings) and runs whole; the final norm
        assert tiled_nodes(loss) == 2 * 7 - 1 + 1
    assert "TiledApplyBackward" in tiled[2]
    assert_same(tiled, untiled)
    assert {n.split(".")[4] for n in tiled[1] if ".self_attn." in n} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_tiled_layers_tile_only_the_projections_that_train():
    """q and v adapted, k and o frozen: untiled, a frozen projection keeps nothing, so it is not tiled."""
    model = adapted(targets=("q_proj", "v_proj"))
    with qdora.tiled_layers(model, 16):
        loss = model(IDS, labels=IDS).loss
    # per layer: 2 norms (the first layer's input norm runs whole), q, v, the MLP (its input needs grad); final norm
    assert tiled_nodes(loss) == 2 * 5 - 1 + 1
    untiled = run(model)
    with qdora.tiled_layers(model, 16):
        assert_same(run(model), untiled)


@pytest.mark.parametrize("tile", [1, 16])
def test_fully_trained_tiled_layers_equal_their_fp64_copy(tile):
    """Every weight trains, the norms' too: against the fp64 copy, untiled."""
    model = build(llama3_config()).train().requires_grad_(True)
    oracle = run(copy.deepcopy(model).double())
    with qdora.tiled_layers(model, tile):
        tiled = run(model)
    assert "TiledApplyBackward" in tiled[2]
    assert_same(tiled, oracle, FP32_TOL)
    assert tiled[1]["model.layers.0.input_layernorm.weight"].abs().max() > 0


@pytest.mark.parametrize("gc", [False, True], ids=["plain", "checkpointed"])
def test_tiled_layers_replay_dropout(gc):
    model = adapted(targets=ATTENTION_ALL, dropout=0.3, gc=gc)
    with qdora.tiled_layers(model, 16):
        first = run(model, seed=3)
        second = run(model, seed=3)
    assert_same(first, second, 0.0)  # the same seed draws the same masks, forward and recompute
    untiled = run(model, seed=3)
    # the tiles' masks are their own draws: the loss differs from untiled beyond rounding (`TOL`)
    assert abs(first[0].item() - untiled[0].item()) > TOL * abs(untiled[0].item())


def test_qwen3_query_and_key_norms_are_tiled_per_token():
    """Qwen3 normalizes each head of q and k: `(b, s, heads, head_dim)` inputs, tiled whole tokens at a time."""
    config = transformers.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    add_adapters(model, AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0, target_modules=ATTENTION_ALL),
                 verbose=False)
    perturb(model).train()
    ids = MOE_IDS
    untiled = run(model, ids)
    shapes = []
    norm_class = type(model.model.layers[0].self_attn.q_norm)
    own = norm_class.forward
    with qdora.tiled_layers(model, 5):
        norm_class.forward = lambda self, x: shapes.append(tuple(x.shape)) or own(self, x)
        try:
            tiled = run(model, ids)
        finally:
            norm_class.forward = own
    assert (1, 1, 5 * 4, 8) in shapes and (1, 1, 5 * 2, 8) in shapes  # 5 tokens × 4 query heads, × 2 kv heads
    assert_same(tiled, untiled)


def test_gemma3_four_norms_a_layer_and_its_window_tile_exactly():
    """Gemma 3 (text): four norms per layer (before and after attention and MLP), q/k norms, scaled embeddings, a
    local (sliding-window) and a global layer; every norm is tiled, and the model equals untiled."""
    config = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           query_pre_attn_scalar=8, sliding_window=4, max_position_embeddings=64,
                                           layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config)
    add_adapters(model, AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0, target_modules=ATTENTION_ALL),
                 verbose=False)
    perturb(model).train()
    untiled = run(model, MOE_IDS)
    with qdora.tiled_layers(model, 5) as handle:
        norms = [m for m in handle._modules if "Norm" in type(m).__name__]
        assert len(norms) == 2 * (4 + 2) + 1  # per layer: 4 of its own, q and k; then the final norm
        tiled = run(model, MOE_IDS)
    assert_same(tiled, untiled)


def test_tiled_layers_keep_less_than_the_tiled_mlp():
    """Saved for the backward by one decoder layer (no checkpointing, fp32, DoRA on all its linears, dropout):
    the tiled MLP leaves the norms' and adapters' saved tensors; tiled layers keep each part's input and the
    attention's own tensors (q, k, v, its output)."""
    model = adapted(targets=ATTENTION_ALL, dropout=0.1)
    ids = torch.randint(0, 1024, (1, 128), generator=torch.Generator().manual_seed(2))

    def saved(tiling):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with tiling(model, 16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids)
        return sum(storages.values())

    h, q, kv, T = 64, 64, 16, 128
    layers, mlp = saved(qdora.tiled_layers), saved(tiled_mlp)
    # the tiled MLP keeps more, per layer at least: q, k, v's dropped input copies and o's (three `T·h` and
    # one `T·q` where tiled layers keep one `T·h` input), and DoRA's kept outputs of q, k and o (fp32: ×4)
    assert mlp - layers >= 2 * (3 * T * h + T * q - T * h + T * q + T * kv + T * h) * 4
    # per layer at most: the two norms' inputs, q/k/v's shared input, the MLP's input, q, k, v, the output
    # (T·4 bytes each per width), plus the embeddings', the final norm's and the loss's (T·1024 logits), and
    # 64 KiB for the small ones (rotary cos/sin, logsumexp, labels: T·(16 + 8 + 8 + 4) bytes here)
    assert layers <= 2 * (4 * T * h + (2 * q + 2 * kv) * T) * 4 + 2 * T * h * 4 + 2 * T * 1024 * 4 + 2**16
