"""Adapters served unmerged over one base (`qdora.serve.bank`) and the engine that decodes them together
(`qdora.serve.engine`), against the in-process model `qdora.load_adapter` builds: bit for bit for a
request alone, the same greedy tokens for rows batched with other adapters' rows."""

import threading

import pytest
import torch
from conftest import FP32_TOL, assert_close
from serving import PROMPTS, chat_ids, greedy, in_process, model_and_adapters

from qdora.serve.bank import AdapterBank, BankLinear
from qdora.serve.engine import Engine, Request, Sampling
from qdora.serve.load import base_config, open_bank, parse_adapters, read_specs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return model_and_adapters(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(files):
    model_dir, adapters = files
    bank, tok, _ = open_bank(model_dir, list(adapters.items()), progress=False)
    engine = Engine(bank, tok, max_batch=16).start()
    yield bank, tok, engine
    engine.stop()


@pytest.fixture(scope="module")
def oracles(files):
    model_dir, adapters = files
    return {name: in_process(model_dir, adapters.get(name)) for name in [None, *adapters]}


IDS = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(4))


def test_one_adapter_at_a_time_is_bitwise_the_in_process_model(served, oracles):
    bank, _, _ = served
    with torch.no_grad():
        for name, (model, _) in oracles.items():
            with bank.use(name):
                assert torch.equal(bank.model(IDS).logits, model(IDS).logits), name


def test_rows_of_different_adapters_in_one_batch(served, oracles):
    """Each row through its own adapter (or the base), in one forward: each row equal to that model alone
    (one pass over the base for the adapted rows; fp32 rounding of a bigger matmul at most)."""
    bank, _, _ = served
    routes = [[("pd", 0, 1), ("qd", 1, 2), (None, 2, 3)],           # base rows after the adapted ones
              [(None, 0, 1), ("ql", 1, 3)],                          # ql adapts only q, v, down
              [("qd", 0, 1), (None, 1, 2), ("qd", 2, 3)]]            # a base row between adapted ones
    with torch.no_grad():
        for route in routes:
            with bank.routing(route):
                mixed = bank.model(IDS).logits
            for name, b0, b1 in route:
                alone = oracles[name][0](IDS[b0:b1]).logits
                assert_close(mixed[b0:b1], alone, FP32_TOL, f"{name} in a mixed batch")


def test_the_bank_keeps_each_adapters_own_layers(served):
    bank, _, _ = served
    layers = dict(bank.model.named_modules())
    q = layers["model.layers.0.self_attn.q_proj"]
    k = layers["model.layers.0.self_attn.k_proj"]
    assert isinstance(q, BankLinear) and set(q.adapters) == {"qd", "ql", "pd"}
    assert set(k.adapters) == {"qd"}  # ql and pd do not adapt k_proj: their rows take the base's forward
    assert bank.adapters["ql"].method == "qlora" and bank.adapters["ql"].layers == 3 * 2
    assert q.adapters["ql"].g is None and q.adapters["qd"].g is not None


def test_greedy_answers_of_every_model_decoded_together_equal_generate(served, oracles):
    _, tok, engine = served
    requests = [engine.submit(Request(chat_ids(tok, p), adapter=name, sampling=Sampling(max_new_tokens=20)))
                for name in oracles for p in PROMPTS]
    steps = engine.stats.mixed_steps
    for r in requests:
        assert r.done.wait(120)
    assert engine.stats.mixed_steps > steps  # the rows of different adapters were decoded together
    for r in requests:
        model, _ = oracles[r.adapter]
        assert r.finish in ("stop", "length")
        assert r.tokens == greedy(model, tok, r.ids, 20), (r.adapter, tok.decode(r.ids))
        assert r.text == tok.decode(r.tokens, skip_special_tokens=True)


def test_streamed_text_adds_up_to_the_answer(served):
    _, tok, engine = served
    pieces = []
    r = engine.generate(Request(chat_ids(tok, PROMPTS[0]), adapter="qd", sampling=Sampling(max_new_tokens=16),
                                on_event=pieces.append), timeout=60)
    assert "".join(e.text for e in pieces) == r.text
    assert pieces[-1].finish == r.finish and all(e.finish is None for e in pieces[:-1])


def test_sampling_is_seeded_per_request(served):
    _, tok, engine = served
    ids = chat_ids(tok, PROMPTS[1])
    hot = Sampling(max_new_tokens=12, temperature=1.5, seed=7)
    alone = engine.generate(Request(ids, adapter="ql", sampling=hot), timeout=60).tokens
    again = engine.generate(Request(ids, adapter="ql", sampling=hot), timeout=60).tokens
    others = [engine.submit(Request(chat_ids(tok, p), adapter="qd", sampling=Sampling(max_new_tokens=12)))
              for p in PROMPTS]
    beside = engine.generate(Request(ids, adapter="ql", sampling=hot), timeout=60).tokens
    for r in others:
        r.done.wait(60)
    assert alone == again == beside
    other_seed = engine.generate(Request(ids, adapter="ql", sampling=Sampling(max_new_tokens=12, temperature=1.5,
                                                                                seed=8)), timeout=60).tokens
    assert other_seed != alone
    # top_p that keeps one token is greedy
    nucleus = Sampling(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3)
    greedy_ = engine.generate(Request(ids, adapter="ql", sampling=Sampling(max_new_tokens=12)), timeout=60).tokens
    assert engine.generate(Request(ids, adapter="ql", sampling=nucleus), timeout=60).tokens == greedy_


def test_stop_strings_and_lengths(served):
    _, tok, engine = served
    ids = chat_ids(tok, PROMPTS[2])
    full = engine.generate(Request(ids, adapter="pd", sampling=Sampling(max_new_tokens=24)), timeout=60)
    assert full.finish == "length" and len(full.tokens) == 24
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    assert stop.strip()
    cut = engine.generate(Request(ids, adapter="pd", sampling=Sampling(max_new_tokens=24, stop=(stop,))), timeout=60)
    assert cut.finish == "stop" and cut.text == full.text[:full.text.find(stop)]
    short = engine.generate(Request(ids, sampling=Sampling(max_new_tokens=3)), timeout=60)
    assert short.finish == "length" and len(short.tokens) == 3


def test_a_cancelled_request_leaves_the_batch(served):
    _, tok, engine = served
    started = threading.Event()
    r = Request(chat_ids(tok, PROMPTS[3]), adapter="qd", sampling=Sampling(max_new_tokens=200),
                on_event=lambda e: started.set())
    engine.submit(r)
    assert started.wait(60)
    r.cancel()
    assert r.done.wait(60) and r.finish == "cancelled"
    assert len(r.tokens) < 200
    for _ in range(100):
        if engine.running == 0:
            break
        threading.Event().wait(0.05)
    assert engine.running == 0


def test_bad_requests_are_refused_before_any_work(served):
    _, tok, engine = served
    ids = chat_ids(tok, PROMPTS[0])
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        engine.submit(Request(ids, adapter="nope"))
    with pytest.raises(ValueError, match="temperature=-1 must be"):
        engine.submit(Request(ids, sampling=Sampling(temperature=-1)))
    with pytest.raises(ValueError, match="top_p=0 must be"):
        engine.submit(Request(ids, sampling=Sampling(top_p=0)))
    with pytest.raises(ValueError, match="max_new_tokens=0 must be"):
        engine.submit(Request(ids, sampling=Sampling(max_new_tokens=0)))
    with pytest.raises(ValueError, match="the prompt has 256 tokens; the model's context is 256"):
        engine.submit(Request([5] * 256))
    with pytest.raises(ValueError, match="no tokens"):
        engine.submit(Request([]))


def test_adapters_come_and_go(files, served, oracles):
    model_dir, adapters = files
    bank, tok, engine = served
    with engine.lock:
        bank.add("qd2", adapters["qd"])
    ids = chat_ids(tok, PROMPTS[0])
    r = engine.generate(Request(ids, adapter="qd2", sampling=Sampling(max_new_tokens=10)), timeout=60)
    assert r.tokens == greedy(oracles["qd"][0], tok, ids, 10)
    with engine.lock:
        bank.remove("qd2")
    assert "qd2" not in bank.adapters
    assert all("qd2" not in layer.adapters for layer in bank.layers.values())
    with pytest.raises(ValueError, match="already loaded"):
        bank.add("qd", adapters["qd"])


def test_removing_every_adapter_gives_back_the_plain_base(files):
    model_dir, adapters = files
    bank, _, _ = open_bank(model_dir, [("ql", adapters["ql"])], progress=False)
    base, _ = in_process(model_dir, None)
    bank.remove("ql")
    assert not bank.layers and not any(isinstance(m, BankLinear) for m in bank.model.modules())
    with torch.no_grad():
        assert torch.equal(bank.model(IDS).logits, base(IDS).logits)


def test_a_foreign_adapter_is_refused(files, tmp_path):
    from models import build, llama3_config

    from qdora import AdapterConfig, add_adapters, save_adapter
    model_dir, _ = files
    other = add_adapters(build(llama3_config(hidden_size=32, vocab_size=512, intermediate_size=128)),
                         AdapterConfig(method="qdora", r=2, alpha=4), verbose=False)
    save_adapter(other, tmp_path / "other")
    bank, _, _ = open_bank(model_dir, [], progress=False)
    with pytest.raises(ValueError, match="other"):
        bank.add("other", tmp_path / "other")
    assert not bank.adapters and not bank.layers  # nothing left behind
    assert not any(isinstance(m, BankLinear) for m in bank.model.modules())


def test_adapter_options_are_checked_in_one_line(files, tmp_path):
    _, adapters = files
    assert parse_adapters([f"a={adapters['qd']}", str(adapters["ql"])]) == [("a", adapters["qd"]),
                                                                             ("ql", adapters["ql"])]
    with pytest.raises(ValueError, match="two adapters are named 'a'"):
        parse_adapters([f"a={adapters['qd']}", f"a={adapters['ql']}"])
    with pytest.raises(ValueError, match="give NAME=DIR or DIR"):
        parse_adapters(["=x"])
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        read_specs([("x", tmp_path / "missing")], "auto")
    with pytest.raises(ValueError, match="--base 'half' is unknown"):
        read_specs([], "half")


def test_the_base_is_quantized_as_the_adapters_was(files):
    _, adapters = files
    specs = read_specs([("qd", adapters["qd"])], "auto")
    assert base_config(specs, "auto").method == "qdora"
    assert base_config(specs, "full").method == "dora"
    assert base_config([], "auto").method == "qdora"


def test_a_model_with_adapters_cannot_be_a_bank(files):
    model_dir, adapters = files
    model, _ = in_process(model_dir, adapters["qd"])
    with pytest.raises(ValueError, match="add=False"):
        AdapterBank(model)



def test_min_tokens_holds_off_the_end_as_generate_does(served, oracles):
    _, tok, engine = served
    ids = chat_ids(tok, "hello")  # the base answers this one with EOS after 28 tokens
    early = engine.generate(Request(ids, sampling=Sampling(max_new_tokens=40)), timeout=60)
    assert early.finish == "stop" and len(early.tokens) == 28
    held = engine.generate(Request(ids, sampling=Sampling(max_new_tokens=40, min_tokens=35)), timeout=60)
    model, _ = oracles[None]
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=35, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert held.tokens == [t for t in want if t != tok.eos_token_id] and len(held.tokens) >= 35
    assert held.tokens[:28] == early.tokens


@pytest.mark.parametrize("cfg, base", [
    (dict(method="qdora", r=8, alpha=8, direction="vera", target_modules=("q_proj", "v_proj")), "nf4"),
    (dict(method="qdora", r=4, alpha=8, magnitude_only_modules=("o_proj",)), "nf4"),
    (dict(method="dora", r=4, alpha=8), "full"),
    (dict(method="lora", r=4, alpha=8, target_modules=("q_proj", "down_proj")), "full"),
])
def test_every_method_is_served_as_in_process(files, tmp_path, cfg, base):
    """VeRA directions, magnitude-only layers, and DoRA/LoRA over a full-precision base (`--base full`)."""
    from qdora import AdapterConfig, load_adapter, load_model, save_adapter
    model_dir, _ = files
    adapter_cfg = AdapterConfig(dropout=0.0, adapter_dtype="float32", **cfg)
    trained, _ = load_model(model_dir, method=adapter_cfg.method, cfg=adapter_cfg, progress=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every trained tensor away from its start
        for name, p in trained.named_parameters():
            if p.requires_grad and any(k in name for k in ("lora_B", "magnitude_delta", "vera_lambda")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    save_adapter(trained, tmp_path / "a")
    bank, _, specs = open_bank(model_dir, [("a", tmp_path / "a")], base="auto", progress=False)
    assert bank.quantized == (base == "nf4")
    reference, _ = load_model(model_dir, method=adapter_cfg.method, cfg=adapter_cfg, add=False, progress=False)
    load_adapter(reference, tmp_path / "a", verbose=False)
    with torch.no_grad(), bank.use("a"):
        assert torch.equal(bank.model(IDS).logits, reference.eval()(IDS).logits)


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_windowed_and_soft_capped_models_prefill_without_tokens_by_tokens_attention(tmp_path, kind):
    """A model with an 8-token sliding window (Mistral), or soft-capped scores under it too (Gemma 2): the bank runs it
    on `qdora.packed_sdpa` (window blocks; tiles of queries), and a prompt several windows long gets `model.generate`'s
    greedy answer on transformers' own attention (SDPA's windowed mask; eager scores), the oracle."""
    import transformers
    from models import chatml_tokenizer
    from serving import CORPUS

    from qdora import load_model

    dims = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=8, max_position_embeddings=256, tie_word_embeddings=False)
    config = (transformers.MistralConfig(**dims) if kind == "mistral" else transformers.Gemma2Config(
        **dims, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=1.0,
        layer_types=["sliding_attention", "full_attention"]))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits far apart: greedy answers do not hang on rounding
    model.save_pretrained(tmp_path / "m")
    chatml_tokenizer(CORPUS).save_pretrained(tmp_path / "m")
    bank, tok, _ = open_bank(tmp_path / "m", [], progress=False)
    assert bank.model.config._attn_implementation == ("qdora_sdpa" if kind == "mistral" else "qdora_softcap")
    oracle, _ = load_model(tmp_path / "m", method="qdora", add=False, progress=False)
    assert oracle.config._attn_implementation == ("sdpa" if kind == "mistral" else "eager")
    ids = chat_ids(tok, " ".join(CORPUS))
    assert len(ids) > 4 * 8
    engine = Engine(bank, tok, max_batch=4).start()
    try:
        request = engine.submit(Request(ids, sampling=Sampling(max_new_tokens=12)))
        assert request.done.wait(120)
    finally:
        engine.stop()
    assert request.tokens == greedy(oracle.eval(), tok, ids, 12) and len(request.tokens) > 0
