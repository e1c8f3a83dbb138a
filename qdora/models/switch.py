"""Switching a model's qdora adapters off and on, under the names PEFT and transformers use.

With the adapters off every adapted layer is its base layer, magnitude included: a DoRA layer's output
is the frozen base's own forward, bit for bit what the model computes without adapters. That is the
reference a preference objective needs (DPO's KL anchor is the model before fine-tuning): the same
model, no second copy. `add_adapters` gives an adapted model these as methods too:

    with model.disable_adapter(): ...          # PEFT's context manager
    model.disable_adapters(); model.enable_adapters()   # transformers' PeftAdapterMixin names
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

from torch import nn

from qdora.core.layer import QDoRALinear


def switchable_layers(model: nn.Module) -> list[QDoRALinear]:
    layers = [m for m in model.modules() if isinstance(m, QDoRALinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no qdora adapters to switch (a merged model has none: the "
                         "reference of a merged adapter cannot be formed; load the base with the adapter instead, "
                         "qdora.load_model then qdora.load_adapter)")
    return layers


def disable_adapters(model: nn.Module) -> None:
    """Every qdora adapter of `model` off: the model computes as its base."""
    for layer in switchable_layers(model):
        layer.disabled = True


def enable_adapters(model: nn.Module) -> None:
    """Every qdora adapter of `model` back on."""
    for layer in switchable_layers(model):
        layer.disabled = False


def adapters_enabled(model: nn.Module) -> bool:
    return not all(layer.disabled for layer in switchable_layers(model))


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """`with disable_adapter(model):` the base model; on leaving, each layer as it was (nesting is safe)."""
    layers = switchable_layers(model)
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def attach_switches(model: nn.Module) -> None:
    """Give `model` the methods `disable_adapter()` (a context manager), `disable_adapters()` and
    `enable_adapters()` (instance attributes: they replace transformers' PEFT-only ones on this model)."""
    model.disable_adapter = types.MethodType(disable_adapter, model)
    model.disable_adapters = types.MethodType(disable_adapters, model)
    model.enable_adapters = types.MethodType(enable_adapters, model)
