"""Preference objectives (`qdora.core.preference`) and per-sequence log-probabilities without the whole logits
(`qdora.models.head_loss.sequence_logps`): against fp64 formulas, and DPO against TRL's `DPOTrainer` on the same
model and batch (loss and every gradient), the reference being the same qdora model with its adapters off."""

import math

import pytest
import torch
from conftest import FP32_TOL, assert_close
from models import perturb
from serving import make_model_dir

import qdora
from qdora import AdapterConfig, load_model
from qdora.core.preference import check_beta, dpo_loss, simpo_loss
from qdora.models.head_loss import sequence_logps

CFG = AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0, adapter_dtype="float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("pref"))


def test_the_losses_are_the_papers_formulas_in_fp64():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 - 20 for _ in range(4))
    nc, nr = torch.tensor([3, 5, 1, 7, 2, 4]), torch.tensor([2, 6, 4, 1, 3, 5])
    beta = 0.3
    out = dpo_loss(pc, pr, rc, rr, beta)
    delta = (pc - rc) - (pr - rr)
    assert torch.allclose(out.losses, torch.log1p(torch.exp(-beta * delta)))
    assert torch.allclose(out.chosen_rewards, beta * (pc - rc))
    assert torch.allclose(out.rejected_rewards, beta * (pr - rr))
    ipo = dpo_loss(pc, pr, rc, rr, beta, "ipo", nc, nr)
    assert torch.allclose(ipo.losses, ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2)
    simpo = simpo_loss(pc, pr, nc, nr, beta=2.0, gamma=0.5)
    assert torch.allclose(simpo.losses, torch.log1p(torch.exp(-(2.0 * (pc / nc - pr / nr) - 0.5))))
    # the policy equal to its reference: rewards 0, loss log 2, accuracy 0 (no pair ranked right)
    same = dpo_loss(pc, pr, pc, pr, beta)
    assert same.losses.eq(math.log(2)).all() and same.metrics()["rewards/margins"] == 0.0


def test_bad_values_are_refused_in_one_line():
    x = torch.zeros(2)
    for beta in (0, -0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="must be a number > 0"):
            check_beta(beta)
    with pytest.raises(ValueError, match="loss_type='hinge' is unknown"):
        dpo_loss(x, x, x, x, 0.1, "hinge")
    with pytest.raises(ValueError, match="needs the replies' token counts"):
        dpo_loss(x, x, x, x, 0.1, "ipo")
    with pytest.raises(ValueError, match="simpo_gamma=-1"):
        simpo_loss(x, x, x, x, 2.0, -1)


def _batch(vocab=512, rows=4, length=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0  # right padding, as TRL pads
    completion = torch.zeros_like(ids)
    for i, start in enumerate((5, 7, 4, 9)):
        completion[i, start:] = 1
    completion *= attention
    return ids, attention, completion


def test_sequence_logps_without_the_whole_logits_equal_the_fp64_formula(model_dir):
    model, _ = load_model(model_dir, method="qdora", cfg=CFG, progress=False)
    perturb(model)
    ids, attention, completion = _batch()
    logps, counts = sequence_logps(model, ids, attention, completion, chunk_tokens=3)
    grads = torch.autograd.grad(logps.sum() * 0.5 + logps[0], [p for p in model.parameters() if p.requires_grad])
    logits = model(input_ids=ids, attention_mask=attention).logits.double()[:, :-1]
    mask = completion[:, 1:].bool()
    picked = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    want = (picked * mask).sum(1)
    want_grads = torch.autograd.grad(want.sum() * 0.5 + want[0], [p for p in model.parameters() if p.requires_grad])
    assert counts.tolist() == mask.sum(1).tolist()
    assert_close(logps.double(), want, FP32_TOL, "logps")
    for got, ref in zip(grads, want_grads):
        assert_close(got.double(), ref, FP32_TOL, "gradient")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_equals_trl_dpotrainer_loss_and_gradients(model_dir, tmp_path, loss_type):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model, tok = load_model(model_dir, method="qdora", cfg=CFG, progress=False)
    perturb(model)  # the policy away from its reference: rewards and gradients are not trivial
    rows = [{"prompt": "What is the capital of France?", "chosen": " Paris is the capital.",
             "rejected": " The sky is blue."},
            {"prompt": "Name a fruit:", "chosen": " apple", "rejected": " one two three four"},
            {"prompt": "Count: one two", "chosen": " three four", "rejected": " pear"}]

    class QDoRADPOTrainer(qdora.AdapterCheckpoints, trl.DPOTrainer):
        pass

    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, report_to=[],
                         use_cpu=True, beta=0.2, loss_type=[loss_type], bf16=False, save_strategy="no")
    trainer = QDoRADPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trl_loss = trainer.compute_loss(model, batch)
    trl_grads = torch.autograd.grad(trl_loss, params)

    logps, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad(), model.disable_adapter():
        ref, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    (pc, pr), (rc, rr), (nc, nr) = logps.chunk(2), ref.chunk(2), counts.chunk(2)
    ours = dpo_loss(pc, pr, rc, rr, 0.2, loss_type, nc, nr)
    grads = torch.autograd.grad(ours.loss, params)
    assert not torch.equal(ours.chosen_rewards, torch.zeros_like(ours.chosen_rewards))
    assert_close(ours.loss.detach(), trl_loss.detach(), FP32_TOL, "loss")
    for got, ref_grad in zip(grads, trl_grads):
        assert_close(got, ref_grad, FP32_TOL, "gradient")
