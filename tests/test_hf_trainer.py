"""qdora models under transformers' Trainer and TRL's SFTTrainer (checkpoints hold the adapter), and a
patched PEFT model under SFTTrainer."""

import json
import warnings

import pytest
import torch
from conftest import FP32_TOL, assert_close
from models import build, llama3_config, save_bpe_tokenizer

from qdora import AdapterConfig, QDoRALinear, load_adapter, load_model
from qdora.data.examples import DEMO_DATA

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

CFG = AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_trainer")
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:24]
    texts = [r["instruction"] + " " + r["output"] for r in records]
    build(llama3_config(hidden_size=64, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4,
                        vocab_size=512, max_position_embeddings=512)).save_pretrained(root / "model")
    save_bpe_tokenizer(root / "model", texts)
    return root, texts


def tokenized(tokenizer, texts):
    rows = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=96).input_ids
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return datasets.Dataset.from_list(rows)


def arguments(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, save_steps=2,
                save_strategy="steps", report_to=[], use_cpu=True, gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": False}, seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def trainer(setup, out, adapter_format="peft", cfg=CFG, **kw):
    import qdora
    root, texts = setup
    torch.manual_seed(0)  # the adapters' initial A
    model, tok = load_model(root / "model", cfg=cfg, progress=False)
    return qdora.QDoRATrainer(model=model, args=arguments(out, **kw), train_dataset=tokenized(tok, texts),
                              data_collator=transformers.DataCollatorForSeq2Seq(tok, padding=True),
                              processing_class=tok, adapter_format=adapter_format)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_checkpoints_hold_the_adapter_and_resume_exactly(setup, tmp_path):
    whole = trainer(setup, tmp_path / "whole")
    whole.train()
    for step in (2, 4):
        saved = sorted(p.name for p in (tmp_path / "whole" / f"checkpoint-{step}").iterdir())
        assert "adapter_model.safetensors" in saved and "adapter_config.json" in saved
        assert not any(name.startswith("model") for name in saved), saved  # never the packed base
    assert len(losses(whole)) == 4 and losses(whole)[-1] < losses(whole)[0]

    # Stopped after step 2 and resumed from its checkpoint: the same run.
    first = trainer(setup, tmp_path / "split", max_steps=4)
    first.args.max_steps = 2  # the schedule is constant: stopping at 2 changes nothing before it
    first.train()
    resumed = trainer(setup, tmp_path / "split")
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    assert losses(resumed)[-2:] == pytest.approx(losses(whole)[-2:], rel=1e-6)
    # The PEFT-format checkpoint stores m; reloading sets magnitude_delta = m − ‖W0‖, which gives m
    # back to an ulp but the delta only to u·|m|, unbounded relative to the delta's own (small)
    # entries: compare m, what the model computes with, instead of the delta. Not bitwise: that ulp
    # of m changes the later steps' gradients, and two Adam steps carry it into A, B and m at O(u)
    # of each tensor's largest entry (FP32_TOL); a resume that lost the optimizer state or the
    # adapter is off by O(lr) = 5e-3 per step.
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        if a.requires_grad and not name.endswith("magnitude_delta"):
            assert_close(b, a, FP32_TOL, name)
    for (name, a), (_, b) in zip(whole.model.named_modules(), resumed.model.named_modules()):
        if isinstance(a, QDoRALinear) and a.use_dora:
            assert_close(b.magnitude.detach(), a.magnitude.detach(), FP32_TOL, f"{name}.magnitude")


def test_bf16_adapters_train_through_fp32_master_copies_and_resume_exactly(setup, tmp_path):
    from qdora import MasterWeights
    bf16 = CFG.replace(adapter_dtype="bfloat16")
    whole = trainer(setup, tmp_path / "whole", cfg=bf16, learning_rate=2e-5)
    whole.train()
    wrapped = getattr(whole.optimizer, "optimizer", whole.optimizer)  # accelerate's wrapper, then ours
    layers = [m for m in whole.model.modules() if isinstance(m, QDoRALinear)]
    assert isinstance(wrapped, MasterWeights) and len(wrapped.pairs) == 3 * len(layers) > 0  # A, B, m each
    for p, master in wrapped.pairs:
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(p, master.to(torch.bfloat16))
    # 4 steps at lr 2e-5 are below half a bf16 unit for most entries: the copies moved, the stored
    # values much less (without the copies these steps would be lost)
    lora_a = [(p, master) for p, master in wrapped.pairs if p.shape[0] == 4]
    first = whole.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert any(p is first.lora_A for p, _ in lora_a)
    torch.manual_seed(0)
    initial, _ = load_model(setup[0] / "model", cfg=bf16, progress=False)
    start = initial.get_submodule("model.layers.0.self_attn.q_proj").lora_A.detach().float()
    master = next(m for p, m in lora_a if p is first.lora_A)
    assert (master != start).float().mean() > 0.99
    assert (first.lora_A.detach().float() == start).float().mean() > 0.5

    first_half = trainer(setup, tmp_path / "split", cfg=bf16, learning_rate=2e-5)
    first_half.args.max_steps = 2
    first_half.train()
    resumed = trainer(setup, tmp_path / "split", cfg=bf16, learning_rate=2e-5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    assert losses(resumed)[-2:] == pytest.approx(losses(whole)[-2:], rel=1e-6)
    resumed_wrapped = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
    for (p, master), (q, again) in zip(wrapped.pairs, resumed_wrapped.pairs):
        assert torch.equal(again, master) and torch.equal(q, p)  # the copies were saved and read back


def test_the_saved_adapter_loads_in_qdora_and_in_peft(setup, tmp_path):
    peft = pytest.importorskip("peft")
    root, texts = setup
    run = trainer(setup, tmp_path / "run", max_steps=2, save_strategy="no")
    run.train()
    run.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "tokenizer.json").is_file()
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    model = run.model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    fresh, _ = load_model(root / "model", add=False, progress=False)
    load_adapter(fresh, tmp_path / "final", verbose=False)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, trained)
    base, _ = load_model(root / "model", add=False, progress=False)  # the same NF4 base, as PEFT sees it
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "final").eval()
    with torch.no_grad():
        assert_close(theirs(ids).logits, trained, FP32_TOL, "PEFT logits")


def test_save_pretrained_and_a_plain_trainer_write_the_adapter_not_the_packed_base(setup, tmp_path):
    peft = pytest.importorskip("peft")
    root, texts = setup
    torch.manual_seed(0)
    model, tok = load_model(root / "model", cfg=CFG, progress=False)
    run = transformers.Trainer(model=model, args=arguments(tmp_path / "run", max_steps=2, save_strategy="no"),
                               train_dataset=tokenized(tok, texts),
                               data_collator=transformers.DataCollatorForSeq2Seq(tok, padding=True),
                               processing_class=tok)
    run.train()
    run.save_model(str(tmp_path / "final"))
    saved = sorted(p.name for p in (tmp_path / "final").iterdir())
    assert "adapter_model.safetensors" in saved and "adapter_config.json" in saved, saved
    assert not any(name.startswith("model") for name in saved), saved  # never the packed base
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(root / "model")
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = model.eval()(ids).logits
    base, _ = load_model(root / "model", add=False, progress=False)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "final").eval()
    fresh, _ = load_model(root / "model", add=False, progress=False)
    load_adapter(fresh, tmp_path / "final", verbose=False)
    with torch.no_grad():
        assert_close(theirs(ids).logits, trained, FP32_TOL, "PEFT logits")
        assert torch.equal(fresh.eval()(ids).logits, trained)

    # what PEFT cannot express (a VeRA direction) is written in qdora's format
    vera, _ = load_model(root / "model", cfg=CFG.replace(direction="vera", r=8), progress=False)
    vera.save_pretrained(tmp_path / "vera")
    assert sorted(p.name for p in (tmp_path / "vera").iterdir()) == ["adapter.safetensors", "qdora_adapter.json"]
    vera.save_pretrained(tmp_path / "not-main", is_main_process=False)  # another rank: writes nothing
    assert not (tmp_path / "not-main").exists()
    with pytest.raises(ValueError, match="push_to_hub is not supported for a qdora model"):
        vera.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_the_qdora_format_and_errors(setup, tmp_path):
    import qdora
    run = trainer(setup, tmp_path / "run", adapter_format="qdora", max_steps=2)
    run.train()
    assert (tmp_path / "run" / "checkpoint-2" / "qdora_adapter.json").is_file()
    root, _ = setup
    plain, tok = load_model(root / "model", add=False, progress=False)
    with pytest.raises(ValueError, match="has no qdora adapters"):
        qdora.QDoRATrainer(model=plain, args=arguments(tmp_path / "x"))
    with pytest.raises(ValueError, match="adapter_format='gguf' is unknown"):
        qdora.QDoRATrainer(model=plain, args=arguments(tmp_path / "x"), adapter_format="gguf")
    # A checkpoint of another model is refused by name, not loaded.
    other = trainer(setup, tmp_path / "other", max_steps=2)
    other.model.model.layers[0].self_attn.q_proj.lora_A.data = torch.zeros(8, 64)  # rank 8 now
    with pytest.raises(ValueError, match=r"q_proj.lora_A: file shape \(4, 64\), model shape \(8, 64\)"):
        other.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


def test_a_transformers_4bit_model_trains_with_qdora_adapters(setup, tmp_path):
    import qdora
    root, texts = setup
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model", quantization_config=cfg,
                                                              device_map="cpu", dtype=torch.float32)
    qdora.keep_standard_layout(model)
    qdora.add_adapters(model, CFG, verbose=False)
    tok = transformers.AutoTokenizer.from_pretrained(root / "model")
    run = qdora.QDoRATrainer(model=model, args=arguments(tmp_path / "run", max_steps=2),
                             train_dataset=tokenized(tok, texts),
                             data_collator=transformers.DataCollatorForSeq2Seq(tok, padding=True))
    run.train()
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not hasattr(model, "_hf_peft_config_loaded") or model._hf_peft_config_loaded is not True


def sft_trainer(setup, out, model, tok, **kw):
    trl = pytest.importorskip("trl")
    import qdora
    root, texts = setup

    class QDoRASFTTrainer(qdora.AdapterCheckpoints, trl.SFTTrainer):
        pass
    config = trl.SFTConfig(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=5e-3,
                           lr_scheduler_type="constant", logging_steps=1, save_steps=2, report_to=[], use_cpu=True,
                           gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                           seed=0, data_seed=0, max_length=96, dataset_text_field="text", packing=False,
                           disable_tqdm=True, bf16=False, **kw)
    return QDoRASFTTrainer(model=model, args=config, processing_class=tok,
                           train_dataset=datasets.Dataset.from_list([{"text": t} for t in texts]))


def test_sft_trainer_trains_a_qdora_model_and_checkpoints_its_adapter(setup, tmp_path):
    root, _ = setup
    model, tok = load_model(root / "model", cfg=CFG, progress=False)
    run = sft_trainer(setup, tmp_path / "sft", model, tok)
    run.train()
    saved = sorted(p.name for p in (tmp_path / "sft" / "checkpoint-4").iterdir())
    assert "adapter_model.safetensors" in saved and not any(n.startswith("model") for n in saved)
    assert sum(isinstance(m, QDoRALinear) for m in run.model.modules()) == 10
    assert losses(run)[-1] < losses(run)[0]


def test_sft_loss_curves_of_patched_and_unpatched_peft_agree(setup, tmp_path):
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    import qdora
    root, texts = setup
    curves = {}
    for patched in (False, True):
        base, tok = load_model(root / "model", add=False, progress=False)
        torch.manual_seed(0)
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                                          target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
        if patched:
            qdora.patch_peft(model)
        run = trl.SFTTrainer(model=model, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list([{"text": t} for t in texts]),
                             args=trl.SFTConfig(output_dir=str(tmp_path / f"p{patched}"), max_steps=20,
                                                per_device_train_batch_size=2, learning_rate=5e-3, logging_steps=1,
                                                save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                                                max_length=96, dataset_text_field="text", disable_tqdm=True,
                                                bf16=False,
                                                gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run.train()
        curves[patched] = losses(run)
    assert len(curves[True]) == 20
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)
