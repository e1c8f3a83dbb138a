"""`ForwardState`: a backward's recompute draws the forward's random numbers and runs under its autocast state
(the offloaded checkpoint, the tiled MLP and Gemma 2's attention tiles recompute under it; their own tests hold
their gradients to the unrecomputed path's)."""

import torch
import torch.nn.functional as F

from qdora.core.recompute import ForwardState


def test_rng_replays_the_forward_draws_and_gives_the_generator_back():
    torch.manual_seed(0)
    x = torch.ones(64)
    state = ForwardState.capture(x)
    forward = [torch.rand(5), F.dropout(x, 0.5)]  # the forward's draws, in order
    torch.rand(3)  # other work between the forward and the backward draws too
    after = torch.get_rng_state()
    with state.rng():
        assert torch.equal(torch.rand(5), forward[0])
        assert torch.equal(F.dropout(x, 0.5), forward[1])
    assert torch.equal(torch.get_rng_state(), after)


def test_rng_off_keeps_no_state_and_touches_no_generator():
    x = torch.ones(4)
    state = ForwardState.capture(x, rng=False)
    assert state.cpu_rng is None and state.devices == []
    torch.manual_seed(1)
    expected = torch.rand(8)
    torch.manual_seed(1)
    with state.rng():
        assert torch.equal(torch.rand(8), expected)  # the generator goes on, not set back


def test_autocast_is_the_forward_state_and_grad_is_on():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        inside = ForwardState.capture(a)
    outside = ForwardState.capture(a)
    assert inside.autocast_state == (("cpu", True, torch.bfloat16, False),)
    with torch.no_grad():  # a backward's recompute; here the caller's state is the opposite of the forward's
        with inside.autocast():
            assert torch.is_grad_enabled()
            assert (a @ b).dtype == torch.bfloat16
            assert not torch.is_autocast_cache_enabled()
        with torch.autocast("cpu", dtype=torch.bfloat16), outside.autocast():
            assert not torch.is_autocast_enabled("cpu")
            assert (a @ b).dtype == torch.float32
    assert torch.is_autocast_cache_enabled()
