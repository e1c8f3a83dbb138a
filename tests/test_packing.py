"""Packing: a packed row gives every example the loss and the gradients it has alone (no attention
across examples), checked against the same examples unpacked, on a real transformers model."""

import pytest
import torch
from models import build, llama3_config

import qdora
from qdora.data.examples import IGNORE_INDEX, collate
from qdora.data.packing import collate_packed, pack


def _examples(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = n // 3  # the first third is prompt
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_pack_places_whole_examples_in_order():
    examples = _examples([5, 4, 3, 6, 2], vocab=50)
    rows = pack(examples, cutoff_len=10)
    assert [len(r["input_ids"]) for r in rows] == [9, 9, 2]
    assert rows[0]["input_ids"] == examples[0]["input_ids"] + examples[1]["input_ids"]
    assert rows[0]["position_ids"] == list(range(5)) + list(range(4))
    # each example's first token is never a target, as unpacked (nothing precedes it)
    assert rows[0]["labels"] == [IGNORE_INDEX] + examples[0]["labels"][1:] + [IGNORE_INDEX] + examples[1]["labels"][1:]
    with pytest.raises(ValueError, match="longer than cutoff_len=4"):
        pack(examples, cutoff_len=4)
    batch = collate_packed(rows[1:], pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 3, 4, 5, 6]]
    assert "attention_mask" not in batch and (batch["labels"][1, 2:] == IGNORE_INDEX).all()


def _per_example_losses(logits, labels, segments):
    """Sum of token losses per example: `segments` lists (row, start, end) of each example."""
    logp = torch.log_softmax(logits.double(), -1)
    out = []
    for row, start, end in segments:
        target = labels[row, start + 1:end]
        lp = logp[row, start:end - 1].gather(-1, target.clamp_min(0)[:, None])[:, 0]
        out.append(-(lp * (target != IGNORE_INDEX)).sum())
    return torch.stack(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["qdora", "lora"])
def test_packed_equals_unpacked_losses_and_gradients(attn, method):
    config = llama3_config(vocab_size=128, intermediate_size=128, max_position_embeddings=256)
    config._attn_implementation = attn
    model = build(config)
    qdora.add_adapters(model, qdora.AdapterConfig(method=method, r=4, alpha=8, dropout=0.0,
                                                  adapter_dtype="float32"))
    with torch.no_grad():  # B = 0 at initialisation: make the adapters matter
        for m in model.modules():
            if isinstance(m, qdora.QDoRALinear):
                m.lora_B.normal_(0, 0.1)
    model.config.use_cache = False
    examples = _examples([7, 11, 5, 9], vocab=128, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(batch, segments):
        model.zero_grad(set_to_none=True)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        losses = _per_example_losses(logits, batch["labels"], segments)
        losses.sum().backward()
        return losses.detach(), [p.grad.double().clone() for p in params]

    # unpacked: one example per row (first token's label masked, as packing does: never a target anyway)
    masked = [{**ex, "labels": [IGNORE_INDEX] + ex["labels"][1:]} for ex in examples]
    plain = collate(masked, pad_token_id=0)
    plain_losses, plain_grads = run(plain, [(i, 0, len(ex["input_ids"])) for i, ex in enumerate(examples)])
    rows = pack(examples, cutoff_len=20)
    assert len(rows) == 2  # 7 + 11, 5 + 9
    packed = collate_packed(rows, pad_token_id=0)
    segments, row, pos = [], 0, 0
    for ex in examples:
        n = len(ex["input_ids"])
        if pos + n > 20:
            row, pos = row + 1, 0
        segments.append((row, pos, pos + n))
        pos += n
    packed_losses, packed_grads = run(packed, segments)
    torch.testing.assert_close(packed_losses, plain_losses, rtol=1e-5, atol=1e-5)
    # The two runs differ only in fp32 rounding: other matmul shapes (2 rows of 20 against 4 of
    # up to 11), other masks, padding. Per tensor, relative to its largest entry, each run is
    # taken within γ_K of the exact gradient, K = 128 the longest reduction here (vocab and
    # intermediate size; hidden 64, 40 tokens): 2·γ_K (1.5e-5) between the runs. That is one
    # reduction's worst case, not a proof for the network (~20 reductions deep, each error of
    # order √K·u in practice, O(1)-conditioned here); what matters is the separation: cross-example
    # attention or continuous positions move every gradient tensor by over 2·10⁴ times this.
    K = max(config.vocab_size, config.intermediate_size, config.hidden_size, 2 * 20)
    tol = 2 * K * 2.0 ** -24 / (1 - K * 2.0 ** -24)
    for (name, _), a, b in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), packed_grads,
                               plain_grads):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= tol, f"d{name}: {err:.2e} of its largest entry, over 2·γ_{K} = {tol:.2e}"
    # and cross-example attention would show: the same rows with one causal mask over each row differ
    leaky_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                         attention_mask=torch.ones_like(packed["input_ids"])).logits
    leaky = _per_example_losses(leaky_logits, packed["labels"], segments).detach()
    assert (leaky - plain_losses).abs().max() > 1e-3
    # the model's own loss (token mean) is the same packed and unpacked
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**plain).loss, rtol=1e-5, atol=1e-6)
