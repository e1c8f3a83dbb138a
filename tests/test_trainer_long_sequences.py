"""The long-sequence calls in a user's own trainer (docs/peft-and-trainers.md): packed rows from transformers'
`DataCollatorWithFlattening` or TRL's `padding_free`, `qdora.packed_sdpa`, `qdora.tiled_layers` and
`qdora.offload_activations` under `qdora.QDoRATrainer` and TRL's `SFTTrainer`. The oracle is the same trainer on
transformers' own path (padded rows, or its masked SDPA over the same packed rows): the same loss curve and the same
trained adapters; and SDPA is never handed a mask.

Tolerance: the packed and padded rows are the same sums in other matmul shapes (fp32 rounding), through 3 SGD steps
(AdamW's normalized step would turn a rounding-level difference in a gradient near 0 into a step's): FP32_TOL on the
adapters (measured: 3.7e-7), rel 1e-5 on the losses (measured: 7.7e-8)."""

import pytest
import torch
from conftest import FP32_TOL, assert_close

import qdora
from qdora import AdapterConfig, load_model

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from test_hf_trainer import setup  # noqa: E402,F401  (the same model and texts as the Trainer tests)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

CFG = AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0)


def arguments(out, **kw):
    base = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return base


def rows(tokenizer, texts):
    """Examples of 24 to 90 tokens, so that padded rows hold padding."""
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text).input_ids[:24 + 6 * i]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    assert len({len(r["input_ids"]) for r in out}) > len(out) // 2
    return datasets.Dataset.from_list(out)


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def losses(run):
    return [e["loss"] for e in run.state.log_history if "loss" in e]


def padded_run(model_dir, texts, out, **kw):
    """`qdora.QDoRATrainer` trained on `DataCollatorForSeq2Seq`'s right-padded `rows` (`kw`: the trainer's options)."""
    torch.manual_seed(0)  # the adapters' initial A
    model, tok = load_model(model_dir, cfg=CFG, progress=False)
    trainer = qdora.QDoRATrainer(model=model, args=transformers.TrainingArguments(**arguments(out)),
                                 data_collator=transformers.DataCollatorForSeq2Seq(tok, padding=True),
                                 train_dataset=rows(tok, texts[:12]), processing_class=tok, **kw)
    trainer.train()
    return trainer


def test_qdora_trainer_on_flattened_rows_with_every_long_sequence_call(setup, tmp_path, sdpa_calls):  # noqa: F811
    root, texts = setup

    def run(out, long):
        torch.manual_seed(0)  # the adapters' initial A
        model, tok = load_model(root / "model", cfg=CFG, progress=False)
        if long:  # the documented calls, in the documented order
            qdora.packed_sdpa(model)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            qdora.tiled_layers(model, 16)
            qdora.offload_activations(model)
            model.disable_input_require_grads()
            collator = transformers.DataCollatorWithFlattening()
            args = arguments(out)  # the trainer's gradient_checkpointing stays off: it would replace the offloading
        else:
            collator = transformers.DataCollatorForSeq2Seq(tok, padding=True)
            args = arguments(out, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = qdora.QDoRATrainer(model=model, args=transformers.TrainingArguments(**args), data_collator=collator,
                                     train_dataset=rows(tok, texts[:12]), processing_class=tok,
                                     keep_padding_mask=not long, packed_attention=long)  # else transformers' own
        trainer.train()
        return losses(trainer), adapters(model)

    padded, padded_adapters = run(tmp_path / "padded", long=False)
    assert any(masked for _, masked in sdpa_calls)  # padded rows: transformers hands SDPA its mask
    sdpa_calls.clear()
    packed, packed_adapters = run(tmp_path / "packed", long=True)
    assert len(packed) == 3 and packed == pytest.approx(padded, rel=1e-5)
    assert sorted(packed_adapters) == sorted(padded_adapters)
    assert all(padded_adapters[n].abs().max() > 1e-4 for n in padded_adapters if "lora_B" in n)  # B left 0: trained
    for name, value in packed_adapters.items():
        assert_close(value, padded_adapters[name], FP32_TOL, name)
    assert sdpa_calls and not any(masked for _, masked in sdpa_calls)
    assert max(length for length, _ in sdpa_calls) <= 90  # one example at a time, not the row


def test_sft_trainer_padding_free_attends_per_sequence_by_itself(setup, tmp_path, sdpa_calls):  # noqa: F811
    """`AdapterCheckpoints` on TRL's `SFTTrainer(padding_free=True)` runs the model on `qdora.packed_sdpa` while it
    trains (no call of the user's), against `packed_attention=False` (transformers' block-diagonal mask), and gives the
    model its own attention back after."""
    trl = pytest.importorskip("trl")
    root, texts = setup

    class QDoRASFTTrainer(qdora.AdapterCheckpoints, trl.SFTTrainer):
        pass

    def run(out, packed):
        torch.manual_seed(0)
        model, tok = load_model(root / "model", cfg=CFG, progress=False)
        args = trl.SFTConfig(**arguments(out), padding_free=True, max_length=None, bf16=False)
        data = rows(tok, texts[:12]).select_columns(["input_ids"])  # tokenized and cut already, as TRL asks
        trainer = QDoRASFTTrainer(model=model, args=args, processing_class=tok, train_dataset=data,
                                  packed_attention=packed)
        trainer.train()
        assert model.config._attn_implementation == "sdpa"
        return losses(trainer), adapters(model)

    masked, masked_adapters = run(tmp_path / "masked", packed=False)
    assert any(m for _, m in sdpa_calls)  # transformers' block-diagonal mask over the flattened row
    row = max(length for length, _ in sdpa_calls)
    sdpa_calls.clear()
    packed, packed_adapters = run(tmp_path / "packed", packed=True)
    assert len(packed) == 3 and packed == pytest.approx(masked, rel=1e-5)  # (switched: SDPA got no mask, below)
    for name, value in packed_adapters.items():
        assert_close(value, masked_adapters[name], FP32_TOL, name)
    assert sdpa_calls and not any(m for _, m in sdpa_calls) and max(length for length, _ in sdpa_calls) < row


def test_qdora_trainer_gives_right_padded_rows_no_mask(setup, tmp_path, sdpa_calls, monkeypatch):  # noqa: F811
    """`DataCollatorForSeq2Seq`'s right-padded rows: by default the decoder gets no mask while training (SDPA is never
    handed one), with the same loss curve and adapters as `keep_padding_mask=True` (transformers' masked SDPA, the
    oracle); after `train()` the model's masks are its own again. The rows are not packed and the model has no window
    or soft cap: its attention is not switched (`packed_sdpa` is not called)."""
    from qdora.models import packed_attention

    switched = []
    packed_sdpa = packed_attention.packed_sdpa
    monkeypatch.setattr(packed_attention, "packed_sdpa", lambda model: switched.append(1) or packed_sdpa(model))
    root, texts = setup

    def run(out, **kw):
        trainer = padded_run(root / "model", texts, out, **kw)
        return losses(trainer), adapters(trainer.model), trainer.model

    kept, kept_adapters, _ = run(tmp_path / "kept", keep_padding_mask=True)
    assert any(masked for _, masked in sdpa_calls)
    sdpa_calls.clear()
    dropped, dropped_adapters, model = run(tmp_path / "dropped")
    assert sdpa_calls and not any(masked for _, masked in sdpa_calls)
    assert len(dropped) == 3 and dropped == pytest.approx(kept, rel=1e-5)
    for name, value in dropped_adapters.items():
        assert_close(value, kept_adapters[name], FP32_TOL, name)
    sdpa_calls.clear()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        model(input_ids=torch.full((2, 8), 5), attention_mask=mask)
    assert all(masked for _, masked in sdpa_calls)  # the hook went with train()
    assert not switched


def test_trl_dpo_pairs_reach_the_decoder_without_a_mask(setup, tmp_path, sdpa_calls):  # noqa: F811
    """TRL's `DPOTrainer` (whose `padding_free` is off in this TRL) pads chosen and rejected replies on the right:
    under `AdapterCheckpoints` they train without a mask, with the same losses and rewards as with it."""
    trl = pytest.importorskip("trl")
    root, _ = setup

    class QDoRADPOTrainer(qdora.AdapterCheckpoints, trl.DPOTrainer):
        pass

    pairs = datasets.Dataset.from_list([
        {"prompt": "What is the capital of France?", "chosen": " Paris is the capital.", "rejected": " The sky."},
        {"prompt": "Name a fruit:", "chosen": " apple", "rejected": " one two three four five"},
        {"prompt": "Count: one two", "chosen": " three four", "rejected": " pear"},
        {"prompt": "The grass is", "chosen": " green, as grass is.", "rejected": " Paris."}])

    def run(out, **kw):
        torch.manual_seed(0)
        model, tok = load_model(root / "model", cfg=CFG, progress=False)
        args = trl.DPOConfig(**arguments(out, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                                          learning_rate=1e-2, max_steps=2), bf16=False)
        trainer = QDoRADPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok, **kw)
        trainer.train()
        return [e for e in trainer.state.log_history if "loss" in e]

    kept = run(tmp_path / "kept", keep_padding_mask=True)
    assert any(masked for _, masked in sdpa_calls)
    sdpa_calls.clear()
    dropped = run(tmp_path / "dropped")
    assert sdpa_calls and not any(masked for _, masked in sdpa_calls)
    keys = ("loss", "rewards/chosen", "rewards/rejected")
    assert len(dropped) == 2 and dropped[-1]["rewards/margins"] != 0.0
    for a, b in zip(dropped, kept):  # as the module's loss tolerance; abs 1e-6 for rewards, which start at 0
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-5, abs=1e-6)


def test_qdora_trainer_trains_gemma2_in_soft_capped_tiles(setup, tmp_path, monkeypatch):  # noqa: F811
    """Gemma 2 (eager attention in transformers, `heads × T × T` scores kept): `QDoRATrainer` trains it on
    "qdora_softcap"'s tiles by itself, with the loss curve of `packed_attention=False` (transformers' eager
    attention, the oracle), and gives it eager attention back after."""
    from qdora.models import packed_attention

    root, texts = setup
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=1.0, sliding_window=8,
        max_position_embeddings=512)).save_pretrained(tmp_path / "gemma2")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "gemma2" / file).write_bytes((root / "model" / file).read_bytes())
    tiles = []
    capped_tile = packed_attention.capped_tile
    monkeypatch.setattr(packed_attention, "capped_tile", lambda *a, **k: tiles.append(1) or capped_tile(*a, **k))

    def run(out, **kw):
        trainer = padded_run(tmp_path / "gemma2", texts, out, **kw)
        assert trainer.model.config._attn_implementation == "eager"
        return losses(trainer)

    theirs = run(tmp_path / "eager", packed_attention=False)
    assert not tiles
    ours = run(tmp_path / "tiles")
    assert tiles and len(ours) == 3 and ours == pytest.approx(theirs, rel=1e-5)
