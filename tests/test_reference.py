"""Adapters off and on (`qdora.disable_adapter` and the model's own methods), and TRL's `DPOTrainer` on a
qdora model through `qdora.AdapterCheckpoints` and on a PEFT model patched by `qdora.patch_peft`: the
reference is the model itself with its adapters off (magnitude included), no copy loaded from disk, so at
the first step the rewards are exactly 0 and the loss is log 2."""

import math

import pytest
import torch
from models import perturb
from serving import make_model_dir

import qdora
from qdora import AdapterConfig, load_adapter, load_model, save_adapter
from qdora.integrations.reference import BaseReference

CFG = AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0, adapter_dtype="float32")
IDS = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("ref"))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_adapters_off_is_the_base_bit_for_bit_and_on_again_is_the_fine_tune(model_dir, tmp_path):
    base, _ = load_model(model_dir, method="qdora", add=False, progress=False)
    tuned, _ = load_model(model_dir, method="qdora", cfg=CFG, progress=False)
    perturb(tuned)  # B and the magnitude away from their start: the fine-tune differs from the base
    tuned.eval()
    adapted = logits(tuned)
    assert not torch.equal(adapted, logits(base))
    with tuned.disable_adapter():
        assert torch.equal(logits(tuned), logits(base))
        with qdora.disable_adapter(tuned):  # nested: still off, and still off after the inner block
            pass
        assert torch.equal(logits(tuned), logits(base))
    assert torch.equal(logits(tuned), adapted)
    tuned.disable_adapters()
    assert torch.equal(logits(tuned), logits(base))
    tuned.enable_adapters()
    assert torch.equal(logits(tuned), adapted)
    # a loaded adapter has the same switches
    save_adapter(tuned, tmp_path / "a")
    loaded, _ = load_model(model_dir, method="qdora", add=False, progress=False)
    load_adapter(loaded, tmp_path / "a", verbose=False)
    with loaded.eval().disable_adapter():
        assert torch.equal(logits(loaded), logits(base))


def test_a_model_without_adapters_has_no_reference(model_dir):
    base, _ = load_model(model_dir, method="qdora", add=False, progress=False)
    with pytest.raises(ValueError, match="has no qdora adapters to switch"):
        BaseReference(base)
    with pytest.raises(ValueError, match="merged model has none"):
        qdora.disable_adapters(base)


def _pairs():
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "What is the capital of France?", "chosen": " Paris is the capital.",
             "rejected": " The sky is blue."},
            {"prompt": "Name a fruit:", "chosen": " apple", "rejected": " one two three"},
            {"prompt": "Count: one two", "chosen": " three four", "rejected": " pear plum"},
            {"prompt": "The grass is", "chosen": " green.", "rejected": " Paris."}]
    return datasets.Dataset.from_list(rows)


def _dpo_args(tmp_path, **kw):
    trl = pytest.importorskip("trl")
    return trl.DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1,
                         logging_steps=1, report_to=[], use_cpu=True, learning_rate=1e-3, save_strategy="no",
                         bf16=False, **kw)


def _first_log(trainer) -> dict:
    trainer.train()
    return next(h for h in trainer.state.log_history if "rewards/chosen" in h)


@pytest.mark.parametrize("precompute", [False, True])
def test_trl_dpo_on_a_qdora_model_uses_the_model_itself_as_reference(model_dir, tmp_path, precompute):
    trl = pytest.importorskip("trl")
    model, tok = load_model(model_dir, method="qdora", cfg=CFG, progress=False)

    class QDoRADPOTrainer(qdora.AdapterCheckpoints, trl.DPOTrainer):
        pass

    params_before = sum(p.numel() for p in model.parameters())
    trainer = QDoRADPOTrainer(model=model, args=_dpo_args(tmp_path, precompute_ref_log_probs=precompute),
                              train_dataset=_pairs(), processing_class=tok)
    assert isinstance(trainer.ref_model, BaseReference)  # it computed the precomputed log-probs too
    assert sum(p.numel() for p in trainer.ref_model.parameters()) == 0
    assert sum(p.numel() for p in model.parameters()) == params_before  # no second model
    log = _first_log(trainer)
    assert log["rewards/chosen"] == 0.0 and log["rewards/rejected"] == 0.0 and log["rewards/margins"] == 0.0
    # fp32's −log σ(0) is log 2 to an ulp (6e-8); TRL's logged loss is an fp32 mean of such terms
    assert log["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_trl_dpo_on_a_patched_peft_model(model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    base, tok = load_model(model_dir, method="qlora", cfg=AdapterConfig(method="qlora"), add=False, progress=False)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, task_type="CAUSAL_LM",
                                                      target_modules=["q_proj", "v_proj", "up_proj"]))
    qdora.patch_peft(model)
    trainer = trl.DPOTrainer(model=model, args=_dpo_args(tmp_path), train_dataset=_pairs(), processing_class=tok)
    assert trainer.ref_model is None  # TRL switches PEFT's adapters off for the reference
    log = _first_log(trainer)
    assert log["rewards/chosen"] == 0.0 and log["rewards/rejected"] == 0.0
    assert log["loss"] == pytest.approx(math.log(2), abs=1e-6)  # as above: fp32's log 2, averaged by TRL
