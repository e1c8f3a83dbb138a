"""The loss without the whole logits (`qdora.core.loss`, `qdora.chunked_loss`): the chunked function
against an fp64 oracle, forward and gradients; every verified model type's chunked loss and gradients
against its own unchunked ones (ignored labels, padding, packing, `shift_labels`, gradient accumulation's
token-count normalization, tied embeddings, an MoE's load-balancing loss, PEFT); what falls back and why;
the peak memory it saves.

Tolerance: `FP32_TOL` (tests/conftest.py), whose derivation (fp32 unit roundoff times the accumulation
length, relative to the largest reference entry) covers these sums: the longest is the logsumexp over
V = 101 (function) or the loss over N ≤ 37 rows, within its 1151 terms. Chunked against unchunked is
two fp32 results each within that bound of the exact value, so twice it."""

import copy
import inspect
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import BF16_TOL, FP32_TOL, assert_close, max_rel_err
from models import build, llama3_config

import qdora
from qdora import AdapterConfig, QDoRALinear, add_adapters
from qdora.core.loss import chunked_cross_entropy, cross_entropy_reference, default_chunk_tokens
from qdora.data.packing import collate_packed, pack
from qdora.models.head_loss import VERIFIED, chunked_loss, find_chunked_loss

transformers = pytest.importorskip("transformers")

N, H, V = 37, 24, 101  # V prime: a multiple of nothing


def oracle(h, W, y, b=None, softcap=None):
    """fp64 `Σ_{y ≠ -100} −log softmax(softcap(h·Wᵀ + b))[y]`, the whole logits formed."""
    logits = h.double() @ W.double().t() + (0 if b is None else b.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = y != -100
    return -F.log_softmax(logits, -1)[valid].gather(1, y[valid][:, None]).sum()


def inputs(bias=True, frozen=False):
    torch.manual_seed(0)
    h = torch.randn(N, H, requires_grad=True)
    W = (torch.randn(V, H) * 0.5).requires_grad_(not frozen)
    b = torch.randn(V).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,))
    y[7:14] = -100  # with chunk 7, rows 7..13 are one whole ignored chunk
    y[[0, 20, 36]] = -100
    return h, W, b, y


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("chunk", [1, 7, N - 1, N, N + 5])
def test_loss_and_gradients_equal_the_fp64_oracle(chunk, bias, softcap):
    h, W, b, y = inputs(bias)
    leaves = [t for t in (h, W, b) if t is not None]
    h64, W64, b64 = (None if t is None else t.detach().double().requires_grad_() for t in (h, W, b))
    expected = oracle(h64, W64, y, b64, softcap)
    want = torch.autograd.grad(expected / 7, [t for t in (h64, W64, b64) if t is not None])
    loss = chunked_cross_entropy(h, W, y, b, chunk_tokens=chunk, softcap=softcap)
    got = torch.autograd.grad(loss / 7, leaves)  # a caller's division reaches the backward as its scale
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= FP32_TOL * expected.item()
    for name, g, w in zip("hWb", got, want):
        assert_close(g, w, FP32_TOL, f"d{name}")
    assert got[0][y == -100].abs().max() == 0  # ignored rows get no gradient
    reference = cross_entropy_reference(h64, W64, y, b64, softcap=softcap)  # the unchunked path, in fp64
    assert abs(reference.item() - expected.item()) <= 1e-12 * expected.item()


def test_soft_capping_matters_here():
    h, W, b, y = inputs()
    assert abs(oracle(h, W, y, b, 2.0) - oracle(h, W, y, b)) > 0.1 * oracle(h, W, y, b)


def test_a_frozen_head_gets_no_gradient_and_the_input_gets_its_own():
    h, W, _, y = inputs(bias=False, frozen=True)
    loss = chunked_cross_entropy(h, W, y, chunk_tokens=5)
    loss.backward()
    assert W.grad is None
    h64 = h.detach().double().requires_grad_()
    oracle(h64, W, y).backward()
    assert_close(h.grad, h64.grad, FP32_TOL, "dh")


def test_no_supervised_token_gives_zero_loss_and_zero_gradients():
    h, W, b, y = inputs()
    loss = chunked_cross_entropy(h, W, torch.full_like(y, -100), b, chunk_tokens=4)
    loss.backward()
    assert loss.item() == 0 and all(torch.isfinite(t.grad).all() and t.grad.abs().max() == 0 for t in (h, W, b))
    empty = chunked_cross_entropy(h[:0], W, y[:0], b, chunk_tokens=4)  # no row at all
    assert empty.item() == 0


def test_bf16_and_autocast_follow_the_unchunked_path():
    h, W, b, y = inputs(bias=False)
    for hb, Wb, context in ((h.bfloat16(), W.bfloat16(), torch.autocast("cpu", enabled=False)),
                            (h, W, torch.autocast("cpu", dtype=torch.bfloat16))):
        with context:
            hb = hb.detach().requires_grad_()
            ours = chunked_cross_entropy(hb, Wb, y, chunk_tokens=5)
            (dh,) = torch.autograd.grad(ours, hb)
            hr = hb.detach().requires_grad_()
            theirs = cross_entropy_reference(hr, Wb, y)  # bf16 logits, upcast, as transformers
            (dh_ref,) = torch.autograd.grad(theirs, hr)
        assert abs(ours.item() - theirs.item()) <= BF16_TOL * theirs.item()
        assert dh.dtype == hb.dtype and max_rel_err(dh, dh_ref) <= BF16_TOL


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_a_chunk_below_one_is_one_line_before_any_work(bad):
    h, W, _, y = inputs(bias=False)
    with pytest.raises(ValueError, match=r"chunk_tokens=.* must be an integer >= 1") as info:
        chunked_cross_entropy(h, W, y, chunk_tokens=bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="chunk_tokens="):
        chunked_loss(build(llama3_config()), chunk_tokens=bad)
    with pytest.raises(ValueError, match="softcap=0"):
        chunked_cross_entropy(h, W, y, softcap=0)


def test_default_chunk_sizes():
    assert [default_chunk_tokens(v) for v in (32000, 49152, 128256, 256000, 7)] == [2097, 1365, 523, 262, 9586980]


# ---- in a model -------------------------------------------------------------------------------

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
ARCHITECTURES = {  # model type: (config class, extra fields, targets)
    "llama": ("LlamaConfig", {}, ("q_proj", "v_proj", "down_proj")),
    "mistral": ("MistralConfig", {"sliding_window": None}, ("q_proj", "v_proj")),
    "qwen2": ("Qwen2Config", {}, ("q_proj", "v_proj")),
    "qwen3": ("Qwen3Config", {"head_dim": 8}, ("q_proj", "v_proj")),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 0.5},
               ("q_proj", "v_proj")),  # tied embeddings, a soft cap that bites
    "gemma": ("GemmaConfig", {"head_dim": 8}, ("q_proj", "v_proj")),  # tied embeddings, scaled input
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 0.5,
                                         "sliding_window": 4}, ("q_proj", "v_proj")),  # a soft cap that bites
    "phi3": ("Phi3Config", {"pad_token_id": 0}, ("qkv_proj", "gate_up_proj")),
    "olmo2": ("Olmo2Config", {}, ("q_proj", "v_proj")),
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, head_dim=8, moe_intermediate_size=16, num_experts=4,
                                         decoder_sparse_step=1), ("q_proj", "gate")),
    "olmoe": ("OlmoeConfig", dict(MOE, num_experts=4), ("q_proj", "gate")),
    "mixtral": ("MixtralConfig", dict(MOE, num_local_experts=4), ("q_proj", "gate")),
}


def tiny(name, method="qdora", **extra):
    config_class, fields, targets = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **fields, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config)
    add_adapters(model, AdapterConfig(method=method, r=4, alpha=8, dropout=0.0, target_modules=targets),
                 verbose=False)
    with torch.no_grad():  # make the adapters matter
        for layer in model.modules():
            if isinstance(layer, QDoRALinear) and layer.lora_B is not None:
                layer.lora_B.normal_(0, 0.2)
    return model.train()


def batch():
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(model, inputs, **kw):
    """Loss, output and every trainable tensor's gradient of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same(chunked, whole, tol=2 * FP32_TOL):
    (out, grads), (ref, ref_grads) = chunked, whole
    assert abs(out.loss.item() - ref.loss.item()) <= tol * abs(ref.loss.item())
    assert sorted(grads) == sorted(ref_grads) and grads
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], tol, name)


def test_every_verified_model_type_is_tested():
    assert set(ARCHITECTURES) == VERIFIED


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_chunked_model_loss_and_gradients_equal_the_unchunked(name):
    model = tiny(name)
    whole = run(model, batch())
    with chunked_loss(model, chunk_tokens=5) as handle:
        assert handle.active and find_chunked_loss(model) is handle
        chunked = run(model, batch())
        assert chunked[0].logits is None
        if "num_experts_per_tok" in ARCHITECTURES[name][1]:  # the load-balancing loss is in it, as unchunked
            assert chunked[0].aux_loss is not None and any("gate" in n for n in chunked[1])
    assert_same(chunked, whole)
    assert "forward" not in model.__dict__ and model(**batch()).logits is not None  # removed


def test_packing_shift_labels_and_the_token_count_of_an_accumulated_step():
    model = tiny("llama")
    g = torch.Generator().manual_seed(2)
    examples = [{"input_ids": torch.randint(3, 97, (n,), generator=g).tolist()} for n in (5, 9, 4, 7, 6, 8)]
    for ex in examples:
        ex["labels"] = [-100, -100] + ex["input_ids"][2:]
    rows = pack(examples, cutoff_len=16)
    micro = [collate_packed(rows[:2], 0), collate_packed(rows[2:4], 0)]
    count = torch.tensor(sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro))

    def step():
        model.zero_grad(set_to_none=True)
        losses = [model(**m, num_items_in_batch=count) for m in micro]
        for out in losses:
            out.loss.backward()
        return (type(losses[0])(loss=sum(o.loss for o in losses)),
                {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    shifted = dict(micro[0], shift_labels=F.pad(micro[0]["labels"], (0, 1), value=-100)[:, 1:].contiguous())
    whole, whole_shifted = step(), run(model, shifted)
    with chunked_loss(model, chunk_tokens=3):
        assert_same(step(), whole)
        assert_same(run(model, shifted), whole_shifted)
        assert_same(run(model, micro[0]), whole_shifted)  # shift_labels given is the same shift


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_trained_head_tied_or_not(tied):
    model = tiny("llama", method="full", tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied and model.lm_head.weight.requires_grad
    whole = run(model, batch())
    with chunked_loss(model, chunk_tokens=4):
        assert_same(run(model, batch()), whole)


def test_a_peft_lora_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)
    model = peft.get_peft_model(build(llama3_config(vocab_size=97, num_hidden_layers=1)), lora)
    whole = run(model, batch())
    handle = qdora.chunked_loss(model, chunk_tokens=6)
    assert handle.model is model.get_base_model()
    assert_same(run(model, batch()), whole)
    handle.remove()
    assert model(**batch()).logits is not None


def test_what_runs_the_models_own_forward():
    model = tiny("llama").eval()
    ids = batch()["input_ids"]
    before = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    handle = chunked_loss(model, chunk_tokens=4)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False), before)
    assert model(ids).logits.shape == (2, 13, 97)  # no labels
    assert model(**batch(), return_dict=False)[1].shape == (2, 13, 97)
    assert "labels" in inspect.signature(model.forward).parameters  # what Trainer and generate() read
    with pytest.raises(ValueError, match="already has the chunked loss"):
        chunked_loss(model)
    with handle.paused():
        assert model(**batch()).logits is not None
    assert model(**batch()).logits is None
    twin = copy.deepcopy(model)  # a copy computes with its own weights
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    assert twin(**batch()).loss.item() != model(**batch()).loss.item()


def test_a_wrapper_put_around_it_keeps_working_after_remove():
    model = tiny("llama")
    handle = chunked_loss(model)
    inner = model.forward
    model.forward = lambda *a, **k: inner(*a, **k)  # as accelerate wraps a forward
    handle.remove()
    assert model(**batch()).logits is not None and not handle.active and find_chunked_loss(model) is None


def test_heads_and_models_it_cannot_compute_keep_their_own_loss():
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**COMMON))
    add_adapters(model, AdapterConfig(r=4, dropout=0.0, target_modules=("q_proj", "lm_head")), verbose=False)
    with pytest.warns(UserWarning, match="output head is QDoRALinear"):
        handle = chunked_loss(model)
    assert not handle.active and model(**batch()).logits is not None
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=97))
    with pytest.warns(UserWarning, match="model type 'gpt2'"):
        assert not chunked_loss(gpt2).active
    llama = tiny("llama")
    chunked_loss(llama)
    llama.lm_head = torch.nn.Sequential(llama.lm_head)  # replaced after: said once, at the call
    with pytest.warns(UserWarning, match="output head is Sequential"):
        assert llama(**batch()).logits is not None


# ---- peak memory ------------------------------------------------------------------------------

def test_no_tokens_by_vocabulary_tensor_is_allocated():
    peak_bytes = pytest.importorskip("qdora.eval.bench.memory").peak_bytes
    tokens, vocab = 2048, 32000
    model = tiny("llama", vocab_size=vocab, max_position_embeddings=tokens)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    whole = peak_bytes(lambda: model(ids, labels=ids).loss.backward())
    with chunked_loss(model, chunk_tokens=256):
        chunked = peak_bytes(lambda: model(ids, labels=ids).loss.backward())
    logits = tokens * vocab * 4  # 250 MiB; measured: 759.5 MiB whole, 41.8 MiB chunked
    assert whole > 2.5 * logits  # the logits, their gradient and the softmax, at least
    assert chunked < logits / 4  # one 256 × V chunk (an eighth of the logits) alive at a time, and the rest
    assert whole - chunked > 2.5 * logits


def test_the_documented_call_runs_as_written(capsys):
    pytest.importorskip("peft")
    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "peft-and-trainers.md"
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S) if "chunked_loss(" in c]
    scope = {}
    exec(compile(code, str(page), "exec"), scope)
    assert capsys.readouterr().out.splitlines() == ["None True None", "torch.Size([2, 256, 32000])"]
    assert all(p.grad is not None for p in scope["model"].parameters() if p.requires_grad)
    assert "forward" not in scope["base"].__dict__  # removed


# The CUDA kernel libraries (qdora.core.loss, `kernel=`). Liger's Triton kernels run here in Triton's CPU
# interpreter (conftest.py sets TRITON_INTERPRET=1 without a GPU); Cut Cross-Entropy's do not run in it, so
# its exactness is tested on a GPU only (tests/test_cuda.py), and here only its refusals.
def _liger(softcap=None):
    pytest.importorskip("liger_kernel")
    import os
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpreted and not torch.cuda.is_available():
        pytest.skip("Liger's kernels need a GPU or TRITON_INTERPRET=1 (conftest.py sets it without a GPU)")
    if softcap is not None and interpreted:  # its kernel calls .to() on the cap, a Python float in the interpreter
        pytest.skip("Liger's soft-capping does not run in Triton's interpreter; tests/test_cuda.py checks it on a GPU")


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained-head", "frozen-head"])
def test_liger_kernel_equals_the_fp64_oracle(bias, softcap, frozen):
    _liger(softcap)
    h, W, b, y = inputs(bias, frozen=frozen)
    leaves = [t for t in (h, W, b) if t is not None and t.requires_grad]
    h64, W64, b64 = (None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (h, W, b))
    expected = oracle(h64, W64, y, b64, softcap)
    want = torch.autograd.grad(expected / 7, [t for t in (h64, W64, b64) if t is not None and t.requires_grad])
    loss = chunked_cross_entropy(h, W, y, b, softcap=softcap, kernel="liger")
    got = torch.autograd.grad(loss / 7, leaves)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= FP32_TOL * expected.item()
    for name, g, w in zip("hWb", got, want):
        assert_close(g, w, FP32_TOL, f"d{name}")
    assert got[0][y == -100].abs().max() == 0


def test_liger_kernel_with_no_supervised_token_gives_zero():
    _liger()
    h, W, b, y = inputs()
    loss = chunked_cross_entropy(h, W, torch.full_like(y, -100), b, kernel="liger")
    loss.backward()
    assert loss.item() == 0 and all(t.grad.abs().max() == 0 for t in (h, W, b))


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "gemma2"])
def test_a_model_with_the_liger_kernel_equals_its_unchunked_loss(name):
    """`qdora.chunked_loss(model, kernel="liger")`: the loss and every adapter's gradient, as the model's own
    (qwen3_moe: the load-balancing loss added; gemma2: tied embeddings and a soft cap that bites)."""
    model = tiny(name)
    _liger(model.config.get_text_config().final_logit_softcapping if name == "gemma2" else None)
    whole = run(model, batch())
    with chunked_loss(model, kernel="liger") as handle:
        assert handle.kernel == "liger"
        assert_same(run(model, batch()), whole)


def test_kernel_refusals_are_one_line_before_any_work():
    h, W, b, y = inputs()
    with pytest.raises(ValueError, match=r"kernel='triton': use one of torch, liger, cce"):
        chunked_cross_entropy(h, W, y, b, kernel="triton")
    pytest.importorskip("cut_cross_entropy")
    with pytest.raises(ValueError, match=r"kernel='cce' runs Triton kernels on CUDA tensors, got cpu"):
        chunked_cross_entropy(h, W, y, kernel="cce")
    with pytest.raises(ValueError, match=r"kernel='triton'"):
        chunked_loss(tiny("llama"), kernel="triton")


def test_a_missing_kernel_library_names_the_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # importing it now raises ImportError
    from qdora.core.loss import check_loss_kernel
    with pytest.raises(ValueError, match=r"needs cut-cross-entropy .*pip install cut-cross-entropy"):
        check_loss_kernel("cce")
