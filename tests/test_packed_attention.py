"""`qdora.packed_sdpa`: SDPA over each packed sequence of a row, no `T × T` mask (Gemma 2's soft-capped scores: the
eager formula in tiles of queries). Held to an independent oracle (each sequence run alone, as its own batch) and to
transformers' own attention (SDPA; eager for Gemma 2) with its block-diagonal mask, for every verified model type:
logits and every gradient; padding and generation keep transformers' mask; the mask's bytes are gone; what it
refuses.

Tolerance: FP32_TOL (conftest.py). The pieces are the same SDPA calls on the same numbers as the masked row,
except that the masked kernel sums over (zero-weighted) masked keys too: fp32 rounding of sums of up to 64 terms."""

import re

import pytest
import torch
from conftest import BF16_TOL, FP32_TOL, assert_close

import qdora
from qdora.eval.bench.memory import peak_bytes
from qdora.models import packed_attention
from qdora.models.packed_attention import NAME, SOFTCAP_NAME, SOFTCAPPED, VERIFIED, packed_sdpa, sequence_starts
from qdora.models.shapes import SOFTCAP_TILE_BYTES

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096)
MOE = dict(num_experts_per_tok=2)
WINDOW = 4  # shorter than most test sequences, so that the windowed cases cut them into blocks
ARCHITECTURES = {  # case: (config class, extra fields); each model type once with full attention
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, head_dim=8, moe_intermediate_size=16, num_experts=4,
                                         decoder_sparse_step=1)),
    "mixtral": ("MixtralConfig", dict(MOE, num_local_experts=4)),
    "olmoe": ("OlmoeConfig", dict(MOE, num_experts=4)),
    "olmo2": ("Olmo2Config", {}),
    "phi3": ("Phi3Config", {"pad_token_id": 0, "sliding_window": None}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4096,
                                         "layer_types": ["full_attention", "full_attention"]}),
    # a soft cap that bites: the tiny model's scores reach several units
    "gemma2": ("Gemma2Config", {"head_dim": 8, "query_pre_attn_scalar": 8, "attn_logit_softcapping": 0.5,
                                "layer_types": ["full_attention", "full_attention"]}),
}
WINDOWED = {  # case: (config class, extra fields) with a sliding window of WINDOW tokens
    "mistral-window": ("MistralConfig", {"sliding_window": WINDOW}),
    "phi3-window": ("Phi3Config", {"pad_token_id": 0, "sliding_window": WINDOW, "num_key_value_heads": 4}),  # MHA
    "qwen2-window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0,
                                     "layer_types": ["sliding_attention", "sliding_attention"]}),
    "gemma3_text-window": ("Gemma3TextConfig", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": WINDOW,
                                                "layer_types": ["sliding_attention", "full_attention"]}),
    "gemma2-window": ("Gemma2Config", {"head_dim": 8, "query_pre_attn_scalar": 8, "attn_logit_softcapping": 0.5,
                                       "sliding_window": WINDOW,
                                       "layer_types": ["sliding_attention", "full_attention"]}),
}
FULL = {  # the same models with full attention, to show that the window matters in the test
    "mistral-window": {"sliding_window": None},
    "phi3-window": {"sliding_window": None},
    "qwen2-window": {"use_sliding_window": False, "layer_types": ["full_attention"] * 2},
    "gemma3_text-window": {"layer_types": ["full_attention"] * 2},
    "gemma2-window": {"layer_types": ["full_attention"] * 2},
}
CASES = {**ARCHITECTURES, **WINDOWED}
LENGTHS = [(5, 9, 1, 7), (12, 10)]  # two rows of 22 tokens: four sequences (one of a single token), then two


def own_attention(name):
    """The attention transformers runs the case's model with: eager for soft-capped scores, else SDPA."""
    return "eager" if name.removesuffix("-window") in SOFTCAPPED else "sdpa"


def tiny(name, **override):
    config_class, fields = CASES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **fields, **override},
                                                 attn_implementation=own_attention(name))
    return transformers.AutoModelForCausalLM.from_config(config).train()


def packed_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (len(LENGTHS), sum(LENGTHS[0])), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    return ids, pos


def forward_backward(model, ids, pos):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # as training runs (no cache)
    (logits.float().square().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_every_verified_model_type_is_tested():
    assert set(ARCHITECTURES) == VERIFIED and set(FULL) == set(WINDOWED)


@pytest.mark.parametrize("name", sorted(CASES) + ["gemma2-tiles", "gemma2-window-tiles"])
def test_packed_rows_equal_each_sequence_alone_and_the_masked_sdpa(name, monkeypatch):
    """("-tiles": the soft-capped attention in tiles of 3 queries or fewer: 4 heads × 22 keys × 4 bytes × 3 rows.)"""
    tiles = name.endswith("-tiles")
    name = name.removesuffix("-tiles")
    if tiles:
        monkeypatch.setitem(SOFTCAP_TILE_BYTES, "cpu", 4 * 4 * 22 * 3)
        assert packed_attention.tile_rows(4, 22) == 3
    model = tiny(name)
    ids, pos = packed_batch()
    masked_logits, masked_grads = forward_backward(model, ids, pos)  # transformers' own, block-diagonal mask
    assert packed_sdpa(model) is model
    assert model.config._attn_implementation == (SOFTCAP_NAME if own_attention(name) == "eager" else NAME)
    logits, grads = forward_backward(model, ids, pos)
    assert_close(logits, masked_logits, FP32_TOL, "logits vs the masked SDPA")
    assert sorted(grads) == sorted(masked_grads) and grads
    for n in grads:
        assert_close(grads[n], masked_grads[n], FP32_TOL, n)
    model.eval().set_attn_implementation(own_attention(name))
    with torch.no_grad():  # the oracle: every sequence as a batch of its own, transformers' causal (windowed) SDPA
        for b, row in enumerate(LENGTHS):
            start = 0
            for n in row:
                alone = model(input_ids=ids[b:b + 1, start:start + n]).logits[0]
                assert_close(logits[b, start:start + n], alone, FP32_TOL, f"row {b} sequence at {start}")
                start += n
    if name in WINDOWED:  # the window matters here: the same weights with full attention give other logits
        full = tiny(name, **FULL[name])
        full.load_state_dict(model.state_dict())
        full_logits, _ = forward_backward(full, ids, pos)
        assert (full_logits - logits).abs().max() > 100 * FP32_TOL


@pytest.mark.parametrize("name", ["llama", "mistral-window", "gemma3_text-window", "gemma2-window"])
def test_padding_and_generation_keep_transformers_mask(name):
    """Padded rows and decoding with a cache keep transformers' mask; a prompt longer than the window is prefilled
    in the window's blocks, then decoded against transformers' sliding cache."""
    model = tiny(name).eval()
    ids, pos = packed_batch()
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # a padded row: transformers' SDPA mask, block-diagonal and padded
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        want_gen = model.generate(ids[:1, :9], max_new_tokens=6, do_sample=False)
        packed_sdpa(model)
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        got_gen = model.generate(ids[:1, :9], max_new_tokens=6, do_sample=False)
    real = mask.bool()
    assert_close(got[real], want[real], FP32_TOL, "padded packed rows")
    assert torch.equal(got_gen, want_gen)


@pytest.mark.parametrize("case", ["packed", "windowed"])
def test_no_tokens_by_tokens_mask_is_allocated(case):
    """A row of 2,048 tokens, packed in 8 sequences (Llama), or one sequence under a 64-token sliding window
    (Mistral): transformers' SDPA allocates its `T × T` boolean mask (4 MiB, more than the rest of this tiny model's
    forward); the pieces, and the window's blocks (64 × 127 booleans each), need none."""
    T = 2048
    if case == "packed":
        model = tiny("llama").eval()
        pos = torch.arange(T).remainder(T // 8)[None]
    else:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.MistralConfig(**COMMON, sliding_window=64, attn_implementation="sdpa")).eval()
        pos = torch.arange(T)[None]
    ids = torch.randint(3, 97, (1, T), generator=torch.Generator().manual_seed(2))

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, position_ids=pos, use_cache=False).logits

    want = forward()
    masked = peak_bytes(forward)
    packed_sdpa(model)
    assert_close(forward(), want, FP32_TOL, case)
    ours = peak_bytes(forward)
    # at least the mask's own T x T booleans apart (measured, packed: 24.3 MB against 2.8 MB; the mask's build makes
    # several T x T temporaries)
    assert masked >= T * T and ours < masked - T * T, (masked, ours)


def test_an_attention_call_without_position_ids_is_one_windowed_sequence_per_row():
    """Called without `position_ids` (no packing to find), each row is one sequence: still in the window's blocks,
    equal to the call that gives them, and to the full windowed mask's SDPA (the oracle, in fp64)."""
    from qdora.models.packed_attention import attention

    module = tiny("mistral-window").model.layers[0].self_attn  # GQA: 4 query heads on 2 key heads
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 19, 8, generator=g), torch.randn(2, 2, 19, 8, generator=g), torch.randn(2, 2, 19, 8,
                                                                                                             generator=g)
    without, _ = attention(module, q, k, v, None, scaling=8 ** -0.5, sliding_window=WINDOW)
    given, _ = attention(module, q, k, v, None, scaling=8 ** -0.5, sliding_window=WINDOW,
                          position_ids=torch.arange(19)[None])
    assert torch.equal(without, given)
    i, j = torch.arange(19)[:, None], torch.arange(19)[None]
    band = (j <= i) & (i - j < WINDOW)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1), attn_mask=band,
        scale=8 ** -0.5).transpose(1, 2)
    assert_close(without, want, FP32_TOL, "windowed attention without position_ids")


@pytest.mark.parametrize("window", [None, WINDOW])
def test_softcapped_attention_equals_the_fp64_formula_in_any_tiles(window, monkeypatch):
    """Gemma 2's attention, called directly: `softmax(c·tanh(q·kᵀ·scale / c) + mask)·v` in fp64 is the oracle, for
    one-query tiles and whole ones, with and without `position_ids` (two packed sequences), output and the gradients
    of q, k and v; the cap bites (without it the output differs)."""
    from qdora.models.packed_attention import attention

    module = tiny("gemma2").model.layers[0].self_attn  # 4 query heads on 2 key heads
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 19, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    cap, scale = 0.5, 8 ** -0.5
    starts = torch.tensor([0] * 11 + [1] * 8)  # sequences [0, 11) and [11, 19) of each row
    pos = torch.cat([torch.arange(11), torch.arange(8)])[None]
    i, j = torch.arange(19)[:, None], torch.arange(19)[None]
    seen = (j <= i) & ((i - j < window) if window else True)

    def oracle(packed):
        see = seen & (starts[:, None] == starts[None]) if packed else seen
        kk, vv = (t.double().repeat_interleave(2, 1) for t in (k, v))
        scores = torch.tanh(q.double() @ kk.transpose(2, 3) * scale / cap) * cap
        return (scores.masked_fill(~see, float("-inf")).softmax(-1) @ vv).transpose(1, 2)

    for budget in (4 * 4 * 19, 2**20):  # tiles of 1 query, each recomputed in the backward; one, kept by autograd
        monkeypatch.setitem(SOFTCAP_TILE_BYTES, "cpu", budget)
        for packed in (False, True):
            extra = {"position_ids": pos} if packed else {}
            got, _ = attention(module, q, k, v, None, scaling=scale, sliding_window=window, softcap=cap, **extra)
            want = oracle(packed)
            assert_close(got, want, FP32_TOL, f"output, {budget} bytes, packed={packed}")
            grads = torch.autograd.grad(got.square().sum(), (q, k, v))
            for name, a, b in zip("qkv", grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
                assert_close(a, b, FP32_TOL, f"d{name}, {budget} bytes, packed={packed}")
    uncapped, _ = attention(module, q, k, v, None, scaling=scale, sliding_window=window)
    assert (uncapped - got).abs().max() > 0.1


@pytest.mark.parametrize("case", ["packed", "masked", "dropout"])
def test_softcapped_tiles_backward_is_the_numerical_gradient(case, monkeypatch):
    """`torch.autograd.gradcheck` in fp64 (finite differences: an oracle independent of autograd's) of the tiled
    soft-capped attention, in tiles of 2 queries: packed sequences under a window; an additive mask given (as
    transformers gives one for padding), over all keys; attention dropout, whose backward must replay the forward's
    random numbers (each call seeds the generator, so the function differentiated is one fixed dropout mask)."""
    from qdora.models.packed_attention import attention

    monkeypatch.setitem(SOFTCAP_TILE_BYTES, "cpu", 4 * 4 * 9 * 2)
    module = tiny("gemma2").model.layers[0].self_attn
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, 9, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    extra = {"sliding_window": 3, "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])}
    mask = None
    if case == "masked":
        i, j = torch.arange(9)[:, None], torch.arange(9)[None]
        # row 1 right-padded (its last two keys hidden; a row that sees no key at all has no gradient to check)
        seen = (j <= i)[None, None] & torch.tensor([[1] * 9, [1] * 7 + [0, 0]]).bool()[:, None, None]
        mask = torch.zeros(2, 1, 9, 9, dtype=torch.float64).masked_fill(~seen, torch.finfo(torch.float64).min)
        extra = {}
    module.train()
    dropout = 0.3 if case == "dropout" else 0.0

    def f(q, k, v):
        torch.manual_seed(5)
        return attention(module, q, k, v, mask, dropout=dropout, scaling=8 ** -0.5, softcap=0.5, **extra)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))
    if case == "dropout":  # the dropout is there: another draw gives another output
        torch.manual_seed(6)
        other = attention(module, q, k, v, None, dropout=dropout, scaling=8 ** -0.5, softcap=0.5, **extra)[0]
        assert (other - f(q, k, v)).abs().max() > 0.01


def test_softcapped_tiles_recompute_under_the_forwards_autocast(monkeypatch):
    """Under CPU autocast to bf16 with fp32 q, k, v, in tiles of 2 queries: the output has the dtype and values of the
    formula run whole under the same autocast (the oracle), and the backward computes the tiles again under it too:
    dq equal to the oracle's (without the autocast state it differed by 5.9e-3 here); dk and dv, summed over tiles
    in fp32, within BF16_TOL of the oracle's bf16 sums."""
    from types import SimpleNamespace

    from qdora.models.packed_attention import attention, capped_tile

    monkeypatch.setitem(SOFTCAP_TILE_BYTES, "cpu", 4 * 4 * 19 * 2)
    module = SimpleNamespace(head_dim=8, training=True)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 19, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = attention(module, q, k, v, None, scaling=8 ** -0.5, softcap=0.5)
        want = capped_tile(q, k, v, None, 0, None, 8 ** -0.5, 0.5)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    grad = torch.randn(got.shape, generator=g)
    ours, theirs = torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)
    assert torch.equal(ours[0], theirs[0])
    for name, a, b in zip("kv", ours[1:], theirs[1:]):
        assert_close(a, b, BF16_TOL, f"d{name}")


@pytest.mark.parametrize("window", [None, 16, 512, 4096])
def test_tile_rows_are_the_most_whose_scores_fit(window, monkeypatch):
    """`tile_rows` against a search over every row count: the most queries whose tile, `rows × min(keys, rows +
    window − 1)` scores a head (all keys without a window), stays within the budget; under a window with a budget
    larger than `window` rows need, the keys grow with the rows (a fixed `2·window` bound let 2,048-query tiles of
    a 512-token window hold 160 MiB of scores on a 64 MiB budget)."""
    from qdora.models.packed_attention import tile_rows

    for mib, heads, keys in [(1, 4, 100), (1, 16, 16384), (4, 8, 1024), (4, 8, 4096), (64, 8, 4096), (64, 16, 1024),
                             (128, 16, 16384)]:
        monkeypatch.setitem(SOFTCAP_TILE_BYTES, "cpu", mib << 20)
        budget = (mib << 20) // (4 * heads)

        def span(rows):
            return keys if window is None or window >= keys else min(keys, rows + window - 1)

        fits = [r for r in range(1, keys + 1) if r * span(r) <= budget]
        got = tile_rows(heads, keys, window=window)
        assert min(got, keys) == (max(fits) if fits else 1), (mib, heads, keys, got)


def test_softcapped_training_keeps_no_tokens_by_tokens_scores(monkeypatch):
    """A forward and backward of Gemma 2 at 2,048 tokens: transformers' eager attention keeps its `heads × T × T`
    scores (64 MiB in fp32 here, several times over); the tiles of 64 queries hold one tile's at a time (measured:
    391.5 against 16.2 MiB at the peak)."""
    T, heads = 2048, 4
    monkeypatch.setitem(SOFTCAP_TILE_BYTES, "cpu", 4 * heads * T * 64)
    model = tiny("gemma2-window", sliding_window=256)
    ids = torch.randint(3, 97, (1, T), generator=torch.Generator().manual_seed(2))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, use_cache=False).logits.float().square().mean().backward()

    step()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    eager = peak_bytes(step)
    packed_sdpa(model)
    ours = peak_bytes(step)
    for n, p in model.named_parameters():
        assert_close(p.grad, want[n], FP32_TOL, n)
    scores = heads * T * T * 4
    assert eager > 2 * scores and ours < eager - 2 * scores, (eager, ours)


def test_sequence_starts():
    assert sequence_starts(torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [3, 4, 5, 6, 7, 8, 9, 10]])) == [[0, 3, 5, 6], [0]]


@pytest.mark.parametrize("switched", [False, True], ids=["transformers", "packed_sdpa"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_right_padded_rows_need_no_mask(name, switched):
    """Rows padded on the right (the second row's last 5 tokens, more than the window): without the attention mask,
    the real tokens' logits and every gradient of a loss over them equal those of transformers' own masked attention
    (the oracle), on transformers' attention and after `packed_sdpa`; `unmasked_right_padding` says so."""
    model = tiny(name)
    ids = torch.randint(3, 97, (2, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    real = mask.bool()

    def run(attention_mask):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
        (logits.float().square() * real[..., None]).mean().backward()  # the real tokens' outputs only
        return logits.detach()[real], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run(mask)
    if switched:
        packed_sdpa(model)
    assert packed_attention.unmasked_right_padding(model)
    got, grads = run(None)
    assert_close(got, want, FP32_TOL, "real tokens' logits")
    assert sorted(grads) == sorted(want_grads) and grads
    for n in grads:
        assert_close(grads[n], want_grads[n], FP32_TOL, n)


def test_unmasked_padding_drops_only_a_right_padding_mask_without_a_cache(sdpa_calls):
    """`unmasked_padding`'s hook: a right-padded mask is dropped (SDPA gets none; the real tokens' logits equal the
    masked model's), and a left-padded one, one beside `position_ids`, and a forward with a cache keep theirs (the same
    logits as without the hook, bitwise). On a PEFT model it hooks the base model's decoder; `remove()` undoes it; an
    unverified type gets no hook."""
    given = []  # whether SDPA was handed a mask, each call of the last forward
    model = tiny("llama").eval()
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    right, left = torch.ones_like(ids), torch.ones_like(ids)
    right[1, 7:] = 0
    left[1, :5] = 0

    def logits(mask, **kw):
        sdpa_calls.clear()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, **kw).logits
        given[:] = [masked for _, masked in sdpa_calls]
        return out

    want_right, want_left = logits(right, use_cache=False), logits(left, use_cache=False)
    want_cached = logits(right, use_cache=True, cache=transformers.DynamicCache(config=model.config))
    handle = qdora.unmasked_padding(model)
    got = logits(right, use_cache=False)
    assert given and not any(given)
    assert_close(got[right.bool()], want_right[right.bool()], FP32_TOL, "right-padded rows")
    assert torch.equal(logits(left, use_cache=False), want_left) and all(given)
    positions = torch.arange(12).remainder(6)[None]  # beside position_ids (two packed sequences a row) a mask stays
    handle.remove()
    want_positions = logits(right, use_cache=False, position_ids=positions)
    handle = qdora.unmasked_padding(model)
    assert torch.equal(logits(right, use_cache=False, position_ids=positions), want_positions) and all(given)
    assert torch.equal(logits(right, use_cache=True, cache=transformers.DynamicCache(config=model.config)),
                       want_cached) and all(given)
    handle.remove()
    assert torch.equal(logits(right, use_cache=False), want_right) and all(given)
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"])).eval()
    handle = qdora.unmasked_padding(model)
    logits(right, use_cache=False)
    assert given and not any(given)  # PEFT calls its base model's forward, past hooks on the model: the decoder's run
    handle.remove()
    logits(right, use_cache=False)
    assert all(given)
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4))
    assert qdora.unmasked_padding(gpt2) is None
    assert packed_attention.is_right_padding(right) and not packed_attention.is_right_padding(left)
    assert not packed_attention.is_right_padding(right[None]) and not packed_attention.is_right_padding(right * 2)


def test_right_padding_keeps_its_mask_where_the_loss_reads_it():
    """An MoE whose loss adds the router's load-balancing term over the real tokens (`output_router_logits`): without
    the mask the padding counts in it, and the loss changes; so do an unverified type, bidirectional attention and
    flash attention (whose mask skips the padding) keep it."""
    model = tiny("qwen3_moe", output_router_logits=True, router_aux_loss_coef=1.0)
    ids = torch.randint(3, 97, (2, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        masked, unmasked = (model(input_ids=ids, attention_mask=m, labels=labels, use_cache=False).loss
                            for m in (mask, None))
    assert abs(masked - unmasked) > 1e-4 * abs(masked)
    assert not packed_attention.unmasked_right_padding(model)
    assert packed_attention.unmasked_right_padding(tiny("qwen3_moe"))
    bidirectional = tiny("llama")
    bidirectional.config.use_bidirectional_attention = True
    flash = tiny("llama")
    flash.config._attn_implementation_internal = "flash_attention_2"
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4))
    assert not any(packed_attention.unmasked_right_padding(m) for m in (bidirectional, flash, gpt2))


def test_what_it_refuses_in_one_line():
    config = transformers.PhiConfig(**COMMON, attn_implementation="sdpa")
    with pytest.raises(ValueError, match=r"qdora.packed_sdpa: model type 'phi' is not one it is tested with"):
        packed_sdpa(transformers.AutoModelForCausalLM.from_config(config))
    eager = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**COMMON, attn_implementation="eager"))
    with pytest.raises(ValueError, match=r"the model's attention is 'eager', not 'sdpa'"):
        packed_sdpa(eager)
    gemma2 = tiny("gemma2")  # soft-capped scores: from eager only
    gemma2.config._attn_implementation = "flash_attention_2"  # (as a CUDA machine with flash-attn loads it)
    with pytest.raises(ValueError, match=r"the model's attention is 'flash_attention_2', not 'eager'"):
        packed_sdpa(gemma2)
    bidirectional = tiny("gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match=r"bidirectional \(use_bidirectional_attention=True\), not causal"):
        packed_sdpa(bidirectional)
    text = dict(COMMON, head_dim=8, query_pre_attn_scalar=8)  # a verified text model inside a multimodal one
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=14,
                  patch_size=7)
    multimodal = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, attn_implementation="sdpa"))
    with pytest.raises(ValueError, match=r"model type 'gemma3' is not one it is tested with"):
        packed_sdpa(multimodal)


def test_exported_from_the_package():
    assert qdora.packed_sdpa is packed_sdpa and qdora.unmasked_padding is packed_attention.unmasked_padding


@pytest.mark.parametrize("args", [["--sequences", "4"], ["--sequences", "1", "--window", "32"]])
def test_the_heap_measurement_runs(capsys, args):
    from qdora.eval.bench.packed_attention import main
    assert main(["--tokens", "512", *args]) == 0
    out = capsys.readouterr().out
    sdpa, ours = (float(x.replace(",", "")) for x in re.findall(r"([\d,.]+) MiB", out))
    assert sdpa > ours + 512 * 512 / 2**20  # at least the mask's bytes apart
    assert ("32-token sliding window" in out) == ("--window" in args)


def test_the_padded_measurement_runs(capsys):
    from qdora.eval.bench.packed_attention import main
    assert main(["--padded", "--tokens", "512"]) == 0
    out = capsys.readouterr().out
    masked, unmasked = (float(x.replace(",", "")) for x in re.findall(r"([\d,.]+) MiB", out))
    assert masked > unmasked + 2 * 512 * 512 / 2**20  # at least the mask's booleans apart
    with pytest.raises(SystemExit):
        main(["--padded", "--softcap", "--tokens", "512"])
    assert "--padded measures a Llama's padded rows" in capsys.readouterr().err


def test_the_prefill_measurement_runs(capsys):
    from qdora.eval.bench.packed_attention import main
    assert main(["--softcap", "--prefill", "--tokens", "1024"]) == 0
    out = capsys.readouterr().out
    eager, ours = (float(x.replace(",", "")) for x in re.findall(r"([\d,.]+) MiB", out))
    assert eager > ours + 8 * 1024 * 1024 * 4 / 2**20  # at least one layer's fp32 scores apart (8 heads)
    assert "a prefill" in out


def test_the_softcap_measurement_runs(capsys):
    from qdora.eval.bench.packed_attention import main
    assert main(["--softcap", "--tokens", "1024"]) == 0
    out = capsys.readouterr().out
    eager, ours = (float(x.replace(",", "")) for x in re.findall(r"([\d,.]+) MiB", out))
    assert eager > ours + 8 * 1024 * 1024 * 4 / 2**20  # at least one layer's fp32 scores apart (8 heads)
    assert "Gemma 2, 1,024 tokens" in out and "x eager's time" in out


def test_the_bench_refuses_softcap_options_without_softcap_and_bad_tiles(capsys):
    from qdora.eval.bench.packed_attention import main
    for args, said in ((["--no-eager"], "--no-eager, --device, --tile-mib and --prefill go with --softcap"),
                       (["--softcap", "--prefill", "--no-eager"], "--prefill measures eager attention and"),
                       (["--softcap", "--tile-mib", "4,x"], "--tile-mib='4,x' must be comma-separated whole numbers"),
                       (["--softcap", "--tile-mib", "0"], "--tile-mib='0' must be")):
        with pytest.raises(SystemExit):
            main(["--tokens", "512", *args])
        assert said in capsys.readouterr().err


def test_the_softcap_measurement_times_each_tile_size(capsys):
    from qdora.eval.bench.packed_attention import main
    assert main(["--softcap", "--no-eager", "--tokens", "256", "--tile-mib", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "qdora_softcap, 1 MiB tiles" in out and "qdora_softcap, 2 MiB tiles" in out and "eager" not in out
    assert SOFTCAP_TILE_BYTES["cpu"] == 4 * 2**20  # the default is back
