"""The reference model of a preference trainer (TRL's `DPOTrainer` and its kind), formed from the policy
itself with its qdora adapters switched off: no second copy of the model in memory, none read from disk.

TRL forms the reference that way only for a PEFT model; for any other model without a `ref_model` it
loads the checkpoint again, in full precision, from its `name_or_path` (for a qdora model: the wrong
policy, off from the NF4 base by the quantization gap, at the cost of a whole model). `AdapterCheckpoints`
passes `BaseReference(model)` as `ref_model` instead. It holds no parameters of its own: its forward is the
policy's under `disable_adapter()`, and so are its backbone (`base_model`), which TRL's fused LM head
calls, and its output embeddings. With the adapters off each adapted layer is its frozen base's own
forward, magnitude included, so at step 0 the reference's log-probabilities equal the policy's bit for bit
(the rewards are exactly 0 and the DPO loss is log 2).
"""

from __future__ import annotations

from torch import nn

from qdora.models.switch import disable_adapter, switchable_layers

ADAPTER_KEYS = ("lora_A", "lora_B", "magnitude_delta", "vera_lambda_d", "vera_lambda_b")


class _Off(nn.Module):
    """`module`'s forward with `model`'s adapters off (held in tuples: not submodules, no parameters)."""

    def __init__(self, model: nn.Module, module: nn.Module):
        super().__init__()
        self._model, self._module = (model,), (module,)

    def forward(self, *args, **kwargs):
        with disable_adapter(self._model[0]):
            return self._module[0](*args, **kwargs)


class BaseReference(nn.Module):
    """`model` with its qdora adapters off, as a module a trainer can call (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        switchable_layers(model)  # one line of error for a model without adapters (a merged one)
        self._model = (model,)
        self.config = model.config

    def forward(self, *args, **kwargs):
        with disable_adapter(self._model[0]):
            return self._model[0](*args, **kwargs)

    @property
    def base_model(self) -> nn.Module:
        return _Off(self._model[0], self._model[0].base_model)

    def get_output_embeddings(self) -> nn.Module:
        return self._model[0].get_output_embeddings()

    def state_dict(self, *args, **kwargs):
        """The base's tensors (what a trainer hashes to key its cached reference log-probabilities)."""
        return {k: v for k, v in self._model[0].state_dict(*args, **kwargs).items()
                if not any(f".{a}" in k for a in ADAPTER_KEYS)}

    @property
    def device(self):
        return self._model[0].device

    @property
    def dtype(self):
        return self._model[0].dtype
