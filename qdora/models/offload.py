"""Checkpointed layer inputs in host memory (`qdora.offload_activations`), as Unsloth's "offloaded
gradient checkpointing".

What and why: under gradient checkpointing each decoder layer keeps only its input hidden states
(`batch × tokens × hidden`) until the backward, and those dominate a long sequence: at 128K tokens on
Llama-3-8B (h = 4096, bf16) one is 131072 · 4096 · 2 B = 1 GiB, 32 GiB for the 32 layers. Here each is
copied to pinned host memory as the forward reaches the layer, the device copy is let go, and it comes
back just ahead of the layer's backward: the device holds two (the layer being recomputed, the one
being fetched), the host the rest (`stats.host_bytes_peak`, the figure `qdora plan
--offload-activations` prints). One more stays on the device, as with plain checkpointing: layer 0's
input where it is a leaf that needs a gradient (transformers' `enable_input_require_grads` makes the
embeddings' output one), kept by autograd for its `.grad`. Nothing here needs that gradient, so
`model.disable_input_require_grads()` frees it and its gradient, the adapters' gradients unchanged.

Mechanism: every `GradientCheckpointingLayer`'s `_gradient_checkpointing_func` (called by
transformers as `func(partial(forward, layer, **kwargs), hidden_states)`) becomes an autograd function
(`OffloadedCheckpoint`) whose forward runs the layer without a graph. On CUDA the input is copied to a
pinned CPU tensor with `copy_(non_blocking=True)` on a side stream that first waits for the compute
stream; an event marks the copy's end, and `record_stream` keeps the caching allocator from reusing
the device block before the copy has read it, so the copy overlaps this layer's compute and the next
ones'. When layer i's backward starts, it starts the host-to-device copy of layer i−1's input on the
side stream (prefetch depth 1), overlapping layer i's recompute and backward; layer i−1's backward
only waits for its event. The layers' order is kept per forward pass (a registry on the handle;
`pending` counts what it holds). Pinned buffers come per call from torch's caching host allocator,
which reuses freed blocks but rounds each up to a power of two: a pool of L fixed buffers would save
that rounding and the first step's `cudaHostAlloc` calls. (transformers' own
`activation_checkpointing_enable(offload=True)` wraps `checkpoint` in `save_on_cpu`: every saved
tensor, copied on the compute stream, no prefetch.)

Exactness: the backward restores the CPU (and device) RNG state and the autocast state of the forward,
as `torch.utils.checkpoint` does, recomputes the layer under grad and takes `torch.autograd.grad` of
its outputs with respect to its input and trainable parameters: the same ops on the same values as
plain non-reentrant checkpointing, dropout masks included, so the same gradients (bitwise on CPU;
`tests/test_offload.py`). The parameters are inputs of the autograd function, so a layer whose input
needs no gradient (after frozen embeddings) is still in the graph, and their gradients reach `.grad`
the normal way (accumulation, post-accumulate hooks); the recompute runs on aliases of them (same
storage), so a hook on a parameter runs once per backward, as with plain checkpointing.

Cost: each layer input crosses PCIe once each way (~50 GB/s to an H100 over PCIe 5 x16: ~20 ms per
GiB, hidden behind the ~0.3 s of a 128K-token Llama-3-8B layer's forward, ~2·10¹⁴ FLOP, and the ~1 s
of its recompute and backward, when the link is free). On a CPU device nothing is saved (host and
device are one memory); the path runs there, a real copy, counted, so that it is tested.

Limits: not with FSDP (a sharded layer's parameters are gathered only inside its forward, and the
gradients returned here would be for the whole, not the shards): `offload_activations` refuses a
model with an FSDP2-sharded module, and a caller offering both options should refuse the pair. Not
with an MoE that records router logits (`output_router_logits`): transformers 5.25 records them with
a forward hook on the router inside the layer (`utils/output_capturing.py`), so in a forward without
a graph they carry no gradient and the load-balancing loss would silently train nothing. A layer's
tensor arguments other than its hidden states must not need a gradient; a trainable parameter a
layer uses but does not own is refused at the first backward; `retain_graph=True` (a second backward
through the same graph) is not supported: the host copy goes at the first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from qdora.core.recompute import ForwardState
from qdora.models.head_loss import causal_lm


@dataclasses.dataclass
class OffloadStats:
    """What the offload did since the last forward pass that started with nothing held (one step, or
    one micro-batch), or since `reset()`."""

    to_host: int = 0
    """Layer inputs copied to the host."""
    to_device: int = 0
    """Layer inputs copied back for their backward."""
    bytes_to_host: int = 0
    """Bytes copied to the host (`numel × element size`, before the host allocator's rounding)."""
    host_bytes: int = 0
    """Bytes of layer inputs held on the host now."""
    host_bytes_peak: int = 0
    """The largest `host_bytes` seen."""

    def reset(self) -> None:
        """Zero the counters; what is held now stays held, and is the new peak."""
        self.to_host = self.to_device = self.bytes_to_host = 0
        self.host_bytes_peak = self.host_bytes


class HeldInput:
    """One layer input held on the host from its forward to its backward (on its way there and back)."""

    def __init__(self, handle: OffloadedActivations, x: torch.Tensor, position: int, forward_pass: list):
        self.handle, self.position, self.forward_pass = handle, position, forward_pass
        self.device, self.shape, self.dtype = x.device, x.shape, x.dtype
        self.nbytes = x.numel() * x.element_size()
        self.device_copy = self.ready = self.stored = None
        if x.device.type == "cuda":
            side = handle.side_stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))  # x is complete before it is read
            self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            with torch.cuda.stream(side):
                self.host.copy_(x, non_blocking=True)
                self.stored = torch.cuda.Event()
                self.stored.record(side)
            x.record_stream(side)  # its block is not reused before the copy has read it
        else:
            self.host = x.detach().to("cpu", copy=True)
        stats = handle.stats
        stats.to_host += 1
        stats.bytes_to_host += self.nbytes
        stats.host_bytes += self.nbytes
        stats.host_bytes_peak = max(stats.host_bytes_peak, stats.host_bytes)
        handle.pending += 1

    def fetch(self) -> None:
        """Start the copy back to the device (on CUDA, asynchronously on the side stream)."""
        if self.device_copy is not None:
            return
        if self.host is None:
            raise RuntimeError("offload_activations: this layer's input was already used by a backward; "
                               "retain_graph=True (a second backward through the same graph) is not supported")
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            side = self.handle.side_stream(self.device)
            self.device_copy = torch.empty(self.shape, dtype=self.dtype, device=self.device)  # compute stream's pool
            side.wait_stream(current)  # the block may have been freed by work still queued there
            with torch.cuda.stream(side):
                side.wait_event(self.stored)
                self.device_copy.copy_(self.host, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record(side)
            self.device_copy.record_stream(side)
        else:
            self.device_copy = self.host.to(self.device, copy=self.device.type == "cpu")
        self.handle.stats.to_device += 1

    def take(self) -> torch.Tensor:
        """The input back on its device, ready for the compute stream (fetched now if not prefetched)."""
        self.fetch()
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        x, self.device_copy = self.device_copy, None
        return x

    def prefetch_previous(self) -> None:
        """Start fetching the input of the layer before this one in the same forward pass."""
        previous = self.forward_pass[self.position - 1]() if self.position > 0 else None
        if previous is not None and previous.host is not None:
            previous.fetch()

    def release(self) -> None:
        if self.host is not None:
            self.host = self.device_copy = None
            self.handle.stats.host_bytes -= self.nbytes
            self.handle.pending -= 1

    def __del__(self):  # a graph freed without its backward (an evaluation with grad on, an error)
        self.release()


@dataclasses.dataclass
class _Call:
    """What the backward needs besides the tensors: the handle, the layer, `run(x)` (the layer's
    forward with its other arguments) and, after the forward, the held input."""

    handle: OffloadedActivations
    layer: nn.Module
    run: object
    slot: HeldInput | None = None


class OffloadedCheckpoint(torch.autograd.Function):
    """`call.run(x)` checkpointed with `x` held on the host (module docstring). Inputs: `x` and the
    layer's trainable parameters, so that both get gradients."""

    @staticmethod
    def forward(ctx, call: _Call, x: torch.Tensor, *params: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.state = ForwardState.capture(x)
        call.slot = call.handle.offload(x, call.layer)  # first: on CUDA the copy overlaps this layer's compute
        with torch.no_grad():
            out = call.run(x)
        ctx.call = call
        ctx.params = params  # not save_for_backward: saved-tensor hooks (save_on_cpu) must not move the weights
        outputs = out if isinstance(out, tuple) else (out,)
        ctx.mark_non_differentiable(*[t for t in outputs if isinstance(t, torch.Tensor) and not t.is_floating_point()])
        return out

    @staticmethod
    def backward(ctx, *grads):
        call, slot = ctx.call, ctx.call.slot
        x = slot.take()
        slot.prefetch_previous()  # overlaps this layer's recompute and backward
        wants_x = ctx.needs_input_grad[1]
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[2:]) if need]
        x = x.detach().requires_grad_(wants_x)
        aliases = {id(p): nn.Parameter(p.detach()) for p in params}
        # the aliases stay in the layer through the gradient too: a function inside it that recomputes in its own
        # backward (qdora.tiled_mlp) runs the layer's modules again there, and must use them
        with _swapped(call.layer, aliases):
            with ctx.state.rng(), ctx.state.autocast():
                out = call.run(x)
            slot.release()
            outputs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outputs, grads)
                     if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
            inputs = ([x] if wants_x else []) + [aliases[id(p)] for p in params]
            if pairs:
                call.handle.check_owned(call.layer, pairs, inputs)
                found = iter(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                                 allow_unused=True))
            else:
                found = iter([None] * len(inputs))
        dx = next(found) if wants_x else None
        return (None, dx, *[next(found) if need else None for need in ctx.needs_input_grad[2:]])


@contextlib.contextmanager
def _swapped(layer: nn.Module, aliases: dict):
    """`layer`'s parameters replaced by `aliases` (by id; same storage, new leaves) inside the block:
    the recompute's gradients are taken with respect to them, so a hook on a parameter
    (`p.register_hook`) runs once, in the outer backward, as with plain checkpointing."""
    swapped = [(m, name, p) for m in layer.modules() for name, p in m._parameters.items() if id(p) in aliases]
    for m, name, p in swapped:
        m._parameters[name] = aliases[id(p)]
    try:
        yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def _needs_grad(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(_needs_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_needs_grad(v) for v in value.values())
    return False


class OffloadedActivations:
    """The offload installed by `offload_activations` on one model. `stats`: what it copied (reset at
    each forward pass that starts with nothing held, or by `stats.reset()`); `pending`: layer inputs
    held now; `remove()`, or leaving a `with` block, gives the layers their checkpoint function back."""

    def __init__(self, lm: nn.Module, layers: list[nn.Module]):
        self.model = lm
        self.stats = OffloadStats()
        self.pending = 0
        self.active = False
        self._layers = layers
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        self._previous: list = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pass: list = []
        self._last = -1
        self._checked: set[int] = set()

    @property
    def host_bytes_peak(self) -> int:
        """The largest total of layer inputs held on the host at once (`stats.host_bytes_peak`)."""
        return self.stats.host_bytes_peak

    def _install(self) -> None:
        for layer in self._layers:
            self._previous.append(layer.__dict__.get("_gradient_checkpointing_func"))
            layer._gradient_checkpointing_func = _LayerCheckpoint(self, layer)
        self.active = True

    def remove(self) -> None:
        """Give every layer the checkpoint function it had before (plain checkpointing again)."""
        if not self.active:
            return
        for layer, previous in zip(self._layers, self._previous):
            if isinstance(layer.__dict__.get("_gradient_checkpointing_func"), _LayerCheckpoint):
                if previous is None:
                    del layer._gradient_checkpointing_func
                else:
                    layer._gradient_checkpointing_func = previous
        self.active = False

    def __enter__(self) -> OffloadedActivations:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def offload(self, x: torch.Tensor, layer: nn.Module) -> HeldInput:
        """Hold `layer`'s input `x` on the host, as the next layer of the current forward pass (a new
        pass starts when a layer comes again or an earlier one comes)."""
        index = self._index[id(layer)]
        if index <= self._last or not self._pass:
            if self.pending == 0:
                self.stats.reset()
            self._pass = []
        self._last = index
        slot = HeldInput(self, x, len(self._pass), self._pass)
        self._pass.append(weakref.ref(slot))
        return slot

    def check_owned(self, layer: nn.Module, pairs: list, inputs: list) -> None:
        """Once per layer: every trainable leaf its recomputed graph reaches is one of `inputs` (a
        trainable parameter owned elsewhere would get no gradient)."""
        if id(layer) in self._checked:
            return
        known, seen, stack = {id(t) for t in inputs}, set(), [o.grad_fn for o, _ in pairs]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) not in known:
                raise RuntimeError(f"offload_activations: {type(layer).__name__} uses a trainable tensor of shape "
                                   f"{tuple(variable.shape)} that is not one of its own parameters; it would get no "
                                   "gradient (use plain gradient checkpointing for this model)")
            stack.extend(n for n, _ in node.next_functions)
        self._checked.add(id(layer))


class _LayerCheckpoint:
    """The checkpoint function of one layer: what transformers calls in place of `checkpoint`."""

    def __init__(self, handle: OffloadedActivations, layer: nn.Module):
        self.handle, self.layer = handle, layer

    def __call__(self, run, *args, **kwargs):
        name = type(self.layer).__name__
        keywords = {**getattr(run, "keywords", {}), **kwargs}
        if keywords.get("output_router_logits"):
            raise ValueError(f"offload_activations: {name} was asked for router logits (output_router_logits=True), "
                             "which a forward without a graph records without gradient; pass "
                             "output_router_logits=False or remove the offload")
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            raise ValueError(f"offload_activations: {name}'s first positional argument must be its hidden states "
                             "(a floating-point tensor)")
        others = [(f"positional argument {i}", v) for i, v in enumerate(args[1:], 1)] + \
            [(f"keyword argument {k!r}", v) for k, v in keywords.items()]
        for where, value in others:
            if _needs_grad(value):
                raise ValueError(f"offload_activations: {where} of {name} requires grad; only the hidden states "
                                 "(the first positional argument) may")
        x = args[0]
        params = [p for p in self.layer.parameters() if p.requires_grad]
        if not (x.requires_grad or params):  # nothing to differentiate: no graph, nothing to hold
            with torch.no_grad():
                return run(*args, **kwargs)
        rest = args[1:]  # the closure must not hold `args`: args[0] is the input this offloads
        call = _Call(self.handle, self.layer, lambda h: run(h, *rest, **kwargs))
        return OffloadedCheckpoint.apply(call, x, *params)


def offload_activations(model: nn.Module) -> OffloadedActivations:
    """Hold every checkpointed decoder layer's input in host memory from its forward to its backward
    (module docstring). `model`: a transformers model (or a PEFT model around one) with gradient
    checkpointing already enabled (`qdora.train.setup.prepare_for_training`; enabling it again
    afterwards puts plain checkpointing back). Returns the handle; `handle.remove()` or leaving
    `with offload_activations(model):` restores plain checkpointing."""
    lm = causal_lm(model)
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    enabled = [m for m in layers if m.gradient_checkpointing]
    if not enabled:
        why = "it has no GradientCheckpointingLayer" if not layers else "it is off"
        raise ValueError(f"--offload-activations needs gradient checkpointing: {why} on {type(lm).__name__}; "
                         "enable it first (model.activation_checkpointing_enable(activation_checkpointing_kwargs="
                         "{'use_reentrant': False}), or drop --no-gradient-checkpointing)")
    config = getattr(lm, "config", None)
    if getattr(config, "output_router_logits", False):
        raise ValueError("--offload-activations cannot run an MoE with output_router_logits=True: the router logits "
                         "recorded in a forward without a graph carry no gradient, so the load-balancing loss would "
                         "train nothing; set config.output_router_logits=False or drop --offload-activations")
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule  # only where torch was built with distributed

        if any(isinstance(m, FSDPModule) for m in lm.modules()):
            raise ValueError("--offload-activations does not work with FSDP (its layers' parameters are sharded); "
                             "drop one of them")
    handle = OffloadedActivations(lm, enabled)
    handle._install()
    return handle
