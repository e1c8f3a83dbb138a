"""`qdora plan --objective dpo|simpo`: a pair is two sequences, DPO's live reference adds its forward (a frozen
copy of the model for full fine-tuning), a precomputed reference adds nothing per step."""

import pytest

from qdora.plan.memory import PlanConfig, plan

BASE = dict(method="qdora", r=16, seq_len=2048, chunked_loss=True)


def test_a_pair_is_two_sequences_and_simpo_adds_nothing_else():
    sft2 = plan("Llama-3-8B", PlanConfig(**BASE, batch_size=2))
    simpo = plan("Llama-3-8B", PlanConfig(**BASE, batch_size=1, objective="simpo"))
    pre = plan("Llama-3-8B", PlanConfig(**BASE, batch_size=1, objective="dpo", precompute_reference=True))
    assert simpo.phases == sft2.phases == pre.phases
    assert simpo.config.batch_size == 1 and simpo.config.objective == "simpo"  # the plan keeps the setting asked


def test_the_live_reference_forward_is_a_phase_of_its_own():
    sft2 = plan("Llama-3-8B", PlanConfig(**BASE, batch_size=2))
    dpo = plan("Llama-3-8B", PlanConfig(**BASE, batch_size=1, objective="dpo"))
    extra = set(dpo.phases) - set(sft2.phases)
    assert extra == {"reference forward"}
    assert {k: dpo.phases[k] for k in sft2.phases} == sft2.phases
    assert dpo.phases["reference forward"] > dpo.phases["forward end (loss)"]  # the policy's activations kept


def test_full_fine_tuning_keeps_a_frozen_copy_unless_precomputed():
    full = dict(BASE, method="full")
    live = plan("SmolLM2-135M", PlanConfig(**full, objective="dpo"))
    pre = plan("SmolLM2-135M", PlanConfig(**full, objective="dpo", precompute_reference=True))
    copy = live.details["dpo reference: a frozen copy of the model"]
    assert copy > 200 * 2**20  # 135M parameters (plus the untied head) in bf16
    assert live.phases["optimizer step"] - pre.phases["optimizer step"] == copy


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="objective='orpo' is unknown"):
        PlanConfig(objective="orpo")
    with pytest.raises(ValueError, match="precompute_reference needs objective='dpo'"):
        PlanConfig(precompute_reference=True)
