"""The chunked loss in a transformers causal LM: after `qdora.chunked_loss(model)`, `model(...,
labels=...)` computes the LM head and the cross-entropy over chunks of tokens (`qdora.core.loss`),
forward and backward, and no `tokens × vocab` tensor is ever formed.

How: the model's `forward` is wrapped (an instance attribute, as TRL's fused head and Liger do it).
Given labels, the wrapper runs the model's own forward without them, with the head's forward
replaced for that one call by one that keeps its input (the final hidden states, after whatever the
model does before its head) and returns an empty `(..., 0)` tensor. It then aligns the labels exactly
as transformers' `ForCausalLMLoss` does (`hidden[..., :-1, :]` predicts `labels[..., 1:]`; a given
`shift_labels`, as packed or sequence-parallel batches pass it, is used as it is), keeps the
supervised rows only, soft-caps the logits as the config says (`final_logit_softcapping`), sums the
loss chunk by chunk, divides it by `num_items_in_batch` (or by the supervised count: transformers'
mean) and adds an MoE's load-balancing loss as the model's forward does. The output is the model's
own output class with its loss and `logits=None`.

Without labels (generation, scoring), with `return_dict=False`, a `logits_to_keep`, or TRL's
`fused_lm_head=True` (TRL's own chunked head), the model's forward runs unchanged. Exact for the model
types whose forward was read and is tested against the unchunked loss (`VERIFIED`); another model
type, or a head that is not a plain `nn.Linear` (an adapted or quantized head, a PEFT wrapper),
keeps transformers' whole-logits loss, said in one warning. One difference, by design: a batch with
no supervised token gives a loss of 0 where transformers' mean gives NaN (0/0).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import types
import warnings

import torch
from torch import nn

from qdora.core.loss import IGNORE_INDEX, check_chunk_tokens, check_loss_kernel, chunked_cross_entropy

VERIFIED = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                      "qwen3_moe", "olmoe", "mixtral"})
"""Model types whose CausalLM forward applies nothing to the logits but `final_logit_softcapping` and
adds only the load-balancing loss to the cross-entropy (read in transformers 5; tested in
`tests/test_loss.py` against the unchunked loss, loss and every gradient)."""

_MARK = "_qdora_chunked_loss"
_KEYS = itertools.count()


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM in `model`: itself, or a PEFT model's base model."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def unsupported(lm: nn.Module) -> str | None:
    """Why the chunked loss cannot stand in for `lm`'s own loss, or None if it can."""
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type not in VERIFIED:
        return (f"model type {model_type!r} is not one whose loss it is tested against "
                f"({', '.join(sorted(VERIFIED))})")
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear:
        return f"the output head is {type(head).__name__}, not a plain torch.nn.Linear"
    return None


def find_chunked_loss(model: nn.Module) -> ChunkedLoss | None:
    """The active chunked loss installed on `model` (or on a PEFT model's base model), or None."""
    found = [v for k, v in causal_lm(model).__dict__.items() if k.startswith(_MARK) and v.active]
    return found[-1] if found else None


class ChunkedLoss:
    """The chunked loss of one model, as `chunked_loss` installed it. `active`: False where the model
    keeps its own loss (`reason` says why). `remove()`, or leaving a `with` block, gives the model its
    forward back."""

    def __init__(self, lm: nn.Module, chunk_tokens: int | None, kernel: str = "torch"):
        self.model = lm
        self.chunk_tokens = chunk_tokens
        """Tokens per chunk; None: `qdora.core.loss.default_chunk_tokens` of the vocabulary."""
        self.kernel = kernel
        """Who computes the loss: "torch", or a CUDA library, "liger" or "cce" (`qdora.core.loss`)."""
        self.reason = unsupported(lm)
        self.active = False
        self._previous = self._previous_attr = self._function = None
        self._key = f"{_MARK}_{next(_KEYS)}"
        self._warned = False

    def _install(self) -> None:
        lm = self.model
        self._previous_attr = lm.__dict__.get("forward")  # an instance forward (TRL's, accelerate's) or None
        self._previous = lm.forward
        self._signature = inspect.signature(self._previous)

        key = self._key  # the handle is looked up on the model called, so that a deep copy calls its own

        @functools.wraps(type(lm).forward)  # the original signature: Trainer and generate() read it
        def forward(model, *args, **kwargs):
            return model.__dict__[key].call(model, args, kwargs)

        self._function = forward
        lm.__dict__[key] = self
        lm.forward = types.MethodType(forward, lm)
        self.active = True

    def remove(self) -> None:
        """Give the model its forward back (if another wrapper was put around this one since, this
        one passes every call through instead)."""
        lm = self.model
        self.active = False
        if getattr(lm.__dict__.get("forward"), "__func__", None) is self._function:
            if self._previous_attr is None:
                del lm.forward
            else:
                lm.forward = self._previous_attr
            lm.__dict__.pop(self._key, None)

    @contextlib.contextmanager
    def paused(self):
        """Inside the block, the model's own forward: its loss from the whole logits, and its logits."""
        was, self.active = self.active, False
        try:
            yield self
        finally:
            self.active = was

    def __enter__(self) -> ChunkedLoss:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _named(self, args: tuple, kwargs: dict) -> dict | None:
        """The call's arguments by name (keyword arguments the forward takes as **kwargs included),
        or None if they cannot be read so."""
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError:
            return None
        named = dict(bound.arguments)
        for param in self._signature.parameters.values():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                named.update(named.pop(param.name, {}))
            elif param.kind is inspect.Parameter.VAR_POSITIONAL and named.pop(param.name, ()):
                return None
        return named

    def call(self, lm: nn.Module, args: tuple, kwargs: dict):
        """One forward of the model: the chunked loss when labels are given, else the model's own."""
        own = self._previous
        if not self.active or kwargs.get("fused_lm_head") or kwargs.get("return_dict") is False:
            return own(*args, **kwargs)
        named = self._named(args, kwargs)
        if named is None or named.get("labels") is None or named.get("logits_to_keep") not in (None, 0):
            return own(*args, **kwargs)
        reason = unsupported(lm)  # checked at every call: PEFT or a user may replace the head later
        if reason is not None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"qdora.chunked_loss: {reason}; the loss is computed from the whole logits",
                              stacklevel=3)
            return own(*args, **kwargs)
        labels, shift_labels = named.pop("labels", None), named.pop("shift_labels", None)
        num_items = named.pop("num_items_in_batch", None)
        ignore_index = named.pop("ignore_index", IGNORE_INDEX)
        head = lm.get_output_embeddings()
        out, hidden = head_input(lm, lambda: own(**named), "qdora.chunked_loss",
                                 "; remove the chunked loss (handle.remove()) for this model")
        if shift_labels is None:
            hidden, targets = hidden[..., :-1, :], labels[..., 1:]
        else:
            targets = shift_labels
        targets = targets.to(hidden.device)
        keep = targets != ignore_index
        total = chunked_cross_entropy(hidden[keep], head.weight, targets[keep], head.bias,
                                      chunk_tokens=self.chunk_tokens, ignore_index=ignore_index,
                                      softcap=getattr(lm.config, "final_logit_softcapping", None),
                                      kernel=self.kernel)
        if num_items is None:
            loss = total / keep.sum().clamp(min=1)
        else:
            loss = total / (num_items.to(total.device) if torch.is_tensor(num_items) else num_items)
        aux = out.get("aux_loss")
        if aux is not None:  # an MoE asked for its router logits: its forward adds this to the loss
            loss = loss + lm.router_aux_loss_coef * aux.to(loss.device)
        return type(out)(**{k: v for k, v in out.items() if k not in ("loss", "logits")}, loss=loss)


def head_input(lm: nn.Module, forward, who: str, fix: str = "") -> tuple:
    """`(output, hidden)`: `forward()` run with `lm`'s output head replaced, for that one call, by one that keeps
    its input (the final hidden states, after whatever the model does before its head) and returns an empty
    `(..., 0)` tensor: the model's own forward, without the `tokens × vocab` logits."""
    head = lm.get_output_embeddings()
    seen = []

    def keep_input(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x.new_zeros(*x.shape[:-1], 0)

    head_forward = head.__dict__.get("forward")
    head.forward = keep_input
    try:
        out = forward()
    finally:
        if head_forward is None:
            del head.forward
        else:
            head.forward = head_forward
    if len(seen) != 1:
        raise RuntimeError(f"{who}: {type(lm).__name__}'s forward ran its head {len(seen)} times (expected once){fix}")
    return out, seen[0]


def chunked_loss(model: nn.Module, chunk_tokens: int | None = None, kernel: str = "torch") -> ChunkedLoss:
    """Make `model(..., labels=...)` (a transformers causal LM, or a PEFT model around one) compute its
    loss with the LM head and the cross-entropy over chunks of `chunk_tokens` tokens (default: sized
    so that a chunk's fp32 logits take 256 MiB, `qdora.core.loss.default_chunk_tokens`), never
    forming the whole logits; `outputs.logits` is then None. Calls without labels are the model's own.
    Returns the handle: `.remove()` (or `with qdora.chunked_loss(model):`) undoes it. A model type or
    head it cannot compute exactly keeps its own loss, said in one warning (`handle.active` False).
    `kernel`: "torch" (qdora's own, every device), or on CUDA "liger" (liger-kernel) or "cce" (Cut
    Cross-Entropy), which size their own chunks (`qdora.core.loss`)."""
    if chunk_tokens is not None:
        check_chunk_tokens(chunk_tokens)
    check_loss_kernel(kernel)
    lm = causal_lm(model)
    existing = find_chunked_loss(lm)
    if existing is not None and existing.active:
        raise ValueError(f"{type(lm).__name__} already has the chunked loss (chunk_tokens={existing.chunk_tokens}); "
                         "call .remove() on its handle first")
    handle = ChunkedLoss(lm, chunk_tokens, kernel)
    if handle.reason is not None:
        warnings.warn(f"qdora.chunked_loss: {handle.reason}; {type(lm).__name__} keeps computing its loss from "
                      "the whole logits", stacklevel=2)
        return handle
    handle._install()
    return handle


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor,
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `Σ_t log p(token_t | tokens_<t)` over its completion tokens (`completion_mask` 1; a
    sequence's first token is never scored), and their count: `(logps (B,), tokens (B,))`, differentiable.

    For the model types `chunked_loss` is exact for, the LM head and the log-softmax run over chunks of
    tokens, one row at a time (`qdora.core.loss.chunked_cross_entropy`): no `tokens × vocab` tensor is
    formed. Any other model computes its whole logits once and gathers from their fp32 log-softmax."""
    lm = causal_lm(model)
    targets = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, IGNORE_INDEX)
    keep = targets != IGNORE_INDEX
    counts = keep.sum(1)
    if unsupported(lm) is not None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
        picked = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * keep).sum(1), counts
    head = lm.get_output_embeddings()
    _, hidden = head_input(lm, lambda: model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False),
                           "sequence_logps")
    hidden = hidden[:, :-1]
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    logps = [-chunked_cross_entropy(hidden[i][keep[i]], head.weight, targets[i][keep[i]], head.bias,
                                    chunk_tokens=chunk_tokens, softcap=softcap) for i in range(hidden.shape[0])]
    return torch.stack(logps), counts
