"""`qdora.MasterWeights`: bf16 parameters trained through fp32 copies lose no step. The oracle is
the same optimizer stepping fp32 parameters with the same gradients."""

import copy

import pytest
import torch

from qdora import MasterWeights


def params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(32, 16, generator=g) * 0.05).to(dtype)),
            torch.nn.Parameter(torch.randn(16, generator=g).to(dtype))]


def grads(step):
    g = torch.Generator().manual_seed(100 + step)
    # representable in bf16, so that the bf16 and the fp32 runs see the very same gradients
    return [torch.randn(32, 16, generator=g).bfloat16().float(), torch.randn(16, generator=g).bfloat16().float()]


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=2e-5, weight_decay=0.01),
    lambda ps: torch.optim.AdamW(ps, lr=2e-5, weight_decay=0.01, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9),
], ids=["adamw", "adamw-fused", "sgd"])
def test_the_copies_take_the_fp32_optimizers_steps_exactly(make):
    reference = [p.detach().float().clone().requires_grad_() for p in params(torch.bfloat16)]
    stored = params(torch.bfloat16)
    ref_opt, opt = make(reference), MasterWeights(make(stored))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))  # reaches the wrapped groups
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda step: 1.0 / (1 + step))
    for step in range(5):
        for p, q, g in zip(reference, stored, grads(step)):
            p.grad, q.grad = g.clone(), g.to(torch.bfloat16)
        ref_opt.step(), opt.step()
        sched.step(), ref_sched.step()
        opt.zero_grad(), ref_opt.zero_grad()
        assert all(q.grad is None for q in stored)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.defaults["lr"] / 6)
    for (p, master), ref in zip(opt.pairs, reference):
        assert torch.equal(master, ref.detach())             # every update kept
        assert torch.equal(p.detach(), ref.detach().bfloat16())  # the stored value: the copy rounded to nearest
    # without the copies, bf16 parameters keep most of their values: the steps were rounded away
    plain = params(torch.bfloat16)
    before = [p.detach().clone() for p in plain]
    plain_opt = torch.optim.AdamW(plain, lr=2e-5)
    for p, g in zip(plain, grads(0)):
        p.grad = g.to(torch.bfloat16)
    plain_opt.step()
    assert (plain[0].detach() == before[0]).float().mean() > 0.5


def test_fp32_parameters_are_left_to_the_optimizer():
    mixed = params(torch.float32)[:1] + params(torch.bfloat16, seed=1)[1:]
    opt = MasterWeights(torch.optim.AdamW(mixed, lr=1e-3))
    assert [p is mixed[1] for p, _ in opt.pairs] == [True]
    assert opt.param_groups[0]["params"][0] is mixed[0]


def test_the_copies_are_saved_and_read_back():
    first = params(torch.bfloat16)
    opt = MasterWeights(torch.optim.AdamW(first, lr=2e-5))
    for step in range(3):
        for p, g in zip(first, grads(step)):
            p.grad = g.to(torch.bfloat16)
        opt.step()
    state = copy.deepcopy(opt.state_dict())  # as saved: torch's optimizers load a state's tensors without copying
    assert sorted(state["state"][0]) == ["exp_avg", "exp_avg_sq", "master_weight", "step"]

    again = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = MasterWeights(torch.optim.AdamW(again, lr=2e-5))
    resumed.load_state_dict(state)
    assert resumed.param_groups is resumed.optimizer.param_groups and resumed.state is resumed.optimizer.state
    for (_, a), (_, b) in zip(opt.pairs, resumed.pairs):
        assert torch.equal(a, b) and not torch.equal(a, a.bfloat16().float())  # the copies, not the rounded values
    for p, q, g in zip(first, again, grads(3)):
        p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16)
    opt.step(), resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(first, again))

    # a state written by a plain optimizer (no copies): the copies start from the parameters
    plain = MasterWeights(torch.optim.AdamW(params(torch.bfloat16), lr=2e-5))
    without = {**state, "state": {i: {k: v for k, v in s.items() if k != "master_weight"}
                                  for i, s in state["state"].items()}}
    plain.load_state_dict(without)
    assert all(torch.equal(m, p.detach().float()) for p, m in plain.pairs)
    moment = plain.optimizer.state[plain.pairs[0][1]]["exp_avg"]
    assert torch.equal(moment, opt.optimizer.state[opt.pairs[0][1]]["exp_avg"])


def test_wrapping_is_refused_twice_or_after_a_step():
    ps = params(torch.bfloat16)
    opt = MasterWeights(torch.optim.AdamW(ps, lr=1e-3))
    with pytest.raises(ValueError, match="already keeps master weights"):
        MasterWeights(opt)
    stepped = torch.optim.AdamW(params(torch.bfloat16), lr=1e-3)
    for p in stepped.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    stepped.step()
    with pytest.raises(ValueError, match="AdamW has taken steps already; wrap it before its first step"):
        MasterWeights(stepped)


def test_the_benchmarks_first_step_measure():
    from qdora.eval.bench.adapter_dtype import first_step_unchanged
    assert first_step_unchanged("bfloat16", 2e-5, size=128, r=4) == 0.0
    assert first_step_unchanged("float32", 2e-5, size=128, r=4) == 0.0
    assert first_step_unchanged("bfloat16, no master copies", 2e-5, size=128, r=4) > 0.5
