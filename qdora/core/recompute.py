"""The state a forward ran under, for a backward that computes it again.

A function that saves less than autograd would (a checkpointed layer, tiles of an MLP, tiles of attention scores)
recomputes its forward in its backward. To get the forward's values, and so the same gradients, the recompute must
draw the same random numbers (dropout) and run under the same autocast state, as `torch.utils.checkpoint` does:
`ForwardState.capture(x)` in the forward; in the backward, `with state.rng():` around the recomputes (in the forward's
order: they draw from the restored generators in turn) and `with state.autocast():` around each recompute's forward
alone (not around `torch.autograd.grad`, whose ops follow the dtypes the forward chose).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.utils.checkpoint import get_device_states, set_device_states


@dataclasses.dataclass(frozen=True)
class ForwardState:
    """The CPU generator's state and that of every accelerator the inputs are on (None when not kept), and the autocast
    state of the inputs' device type and of the CPU: `(device_type, enabled, dtype, cache_enabled)` each."""

    device_type: str
    cpu_rng: torch.Tensor | None
    devices: list
    device_rng: list
    autocast_state: tuple

    @classmethod
    def capture(cls, *inputs: torch.Tensor, rng: bool = True) -> ForwardState:
        """The state now, for a forward of `inputs` (their device type: the first tensor's). `rng=False`: the forward
        draws no random numbers, so none are kept (their state is a few KB a call)."""
        device_type = next((t.device.type for t in inputs if isinstance(t, torch.Tensor)), "cpu")
        devices, states = get_device_states(*inputs) if rng else ([], [])
        types = dict.fromkeys([device_type] if device_type == "cpu" or not torch.amp.is_autocast_available(device_type)
                              else [device_type, "cpu"])
        autocast_state = tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t),
                                torch.is_autocast_cache_enabled()) for t in types)
        return cls(device_type, torch.get_rng_state() if rng else None, devices, states, autocast_state)

    @contextlib.contextmanager
    def rng(self):
        """The generators set to the captured states inside the block, and given back their own after it (nothing
        without captured states)."""
        with torch.random.fork_rng(devices=self.devices, enabled=self.cpu_rng is not None,
                                   device_type=self.device_type):
            if self.cpu_rng is not None:
                torch.set_rng_state(self.cpu_rng)
                if self.devices:
                    set_device_states(self.devices, self.device_rng, device_type=self.device_type)
            yield

    @contextlib.contextmanager
    def autocast(self):
        """The captured autocast state inside the block, with gradients on (a recompute runs inside a backward)."""
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype, cache in self.autocast_state:
                stack.enter_context(torch.amp.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache))
            stack.enter_context(torch.enable_grad())
            yield
