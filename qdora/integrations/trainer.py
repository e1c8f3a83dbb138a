"""qdora models under transformers' `Trainer` and TRL's `SFTTrainer`: checkpoints hold the adapter.

A model adapted by `qdora.add_adapters` / `qdora.load_model` is a plain transformers model whose
linear layers are `QDoRALinear`; a bare `Trainer` would save it whole, packed 4-bit weights and all,
as a checkpoint nothing can load. `AdapterCheckpoints` is a mixin that changes only that: saving
(`save_model`, the periodic checkpoints, the best model) writes the adapter with
`qdora.save_adapter` (`adapter_format="peft"`, the default, is what `peft.PeftModel.from_pretrained`
reads; `"qdora"` is ours), and resuming (`train(resume_from_checkpoint=...)`) reads it back with
`qdora.load_adapter`, which checks that it fits the model. Adapters stored in bf16 are trained
through fp32 master copies (`qdora.MasterWeights` wraps the trainer's optimizer), so that no step is
rounded away. Training and evaluation compute the loss with the LM head and the cross-entropy over
chunks of tokens, never the whole logits (`qdora.chunked_loss`, installed for the length of
`train()` and `evaluate()`; `chunked_loss=False` keeps transformers' loss, `loss_chunk_tokens` sizes the
chunks); an evaluation whose metrics need the logits (`compute_metrics`) gets them, computed whole.
TRL's `SFTTrainer` computes its loss over chunks itself (its fused LM head, which the chunked loss
passes every call through to). Rows padded on the right (a padding collator's, TRL's chosen and rejected replies)
reach the decoder without their attention mask where the loss is the same (`qdora.unmasked_padding`: no `T × T`
mask; `keep_padding_mask=True` keeps it), and the model attends through `qdora.packed_sdpa` where it serves it
(packed rows, sliding windows, Gemma 2's soft-capped scores, each without a `T × T` mask or scores;
`packed_attention=False` keeps the model's own). A preference trainer that takes a `ref_model` (TRL's
`DPOTrainer`) and is given none gets `BaseReference(model)`: the model itself with its adapters off, magnitude
included (`qdora.integrations.reference`), instead of a second, full-precision copy TRL would load from disk.
Everything else is the trainer's own.

    from transformers import Trainer
    class QDoRATrainer(qdora.AdapterCheckpoints, Trainer): ...     # or trl's SFTTrainer

`qdora.QDoRATrainer` is that class for `transformers.Trainer`.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch

from qdora.core.loss import check_chunk_tokens, check_loss_kernel
from qdora.core.optim import MasterWeights, needs_master_weights
from qdora.models import head_loss, packed_attention
from qdora.models.adapter_io import adapter_layers, load_adapter, save_adapter

TRAINING_ARGS_NAME = "training_args.bin"


class AdapterCheckpoints:
    """Mix in before a `transformers.Trainer` (or a subclass such as `trl.SFTTrainer`) to save and
    resume a qdora-adapted model by its adapter. `adapter_format`: `"peft"` (default) or `"qdora"`.
    `chunked_loss`: the loss over chunks of `loss_chunk_tokens` tokens (None: sized from the vocabulary)
    while training and evaluating (default True; off with `use_liger_kernel`, whose own loss is used), computed
    by `loss_kernel` ("torch", or on CUDA "liger" or "cce": `qdora.chunked_loss`). `keep_padding_mask`: False (default)
    gives rows padded on the right no attention mask while training and evaluating, where that is exact
    (`qdora.unmasked_padding`). `packed_attention`: True (default) runs the model on `qdora.packed_sdpa` while
    training and evaluating, where that serves it (packed rows: TRL's `padding_free` or `packing`, transformers'
    `DataCollatorWithFlattening`; a sliding window; Gemma 2's soft-capped scores), and gives it its own attention back
    after."""

    def __init__(self, *args, adapter_format: str = "peft", chunked_loss: bool = True,
                 loss_chunk_tokens: int | None = None, loss_kernel: str = "torch", keep_padding_mask: bool = False,
                 packed_attention: bool = True, **kwargs):
        if adapter_format not in ("peft", "qdora"):
            raise ValueError(f"adapter_format={adapter_format!r} is unknown; use 'peft' or 'qdora'")
        if loss_chunk_tokens is not None:
            check_chunk_tokens(loss_chunk_tokens, "loss_chunk_tokens")
        check_loss_kernel(loss_kernel, "loss_kernel")
        self.qdora_chunked_loss, self.qdora_loss_chunk_tokens = bool(chunked_loss), loss_chunk_tokens
        self.qdora_loss_kernel, self.qdora_keep_padding_mask = loss_kernel, bool(keep_padding_mask)
        self.qdora_packed_attention = bool(packed_attention)
        model = kwargs.get("model", args[0] if args else None)
        if model is None or not adapter_layers(model) or getattr(model, "qdora_config", None) is None:
            raise ValueError(f"{type(self).__name__} trains a model adapted by qdora (qdora.add_adapters or "
                             "qdora.load_model); this one has no qdora adapters")
        self.qdora_adapter_format = adapter_format
        args, kwargs = _with_base_reference(type(self), model, args, kwargs)
        # transformers refuses a 4-bit model "without trainable adapters" unless PEFT's flag says it
        # has some; a qdora model has them. The flag is set only while the trainer checks the model.
        previous = model.__dict__.get("_hf_peft_config_loaded")
        model._hf_peft_config_loaded = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            if previous is None:
                del model._hf_peft_config_loaded
            else:
                model._hf_peft_config_loaded = previous

    @contextlib.contextmanager
    def _qdora_forward(self):
        """For the block: the chunked loss on the model, unless it has one already (or is off); `packed_sdpa`, unless
        off; and right padding without its mask, unless kept."""
        handles = []
        if self.qdora_chunked_loss and not getattr(self.args, "use_liger_kernel", False) \
                and head_loss.find_chunked_loss(self.model) is None:
            handles.append(head_loss.chunked_loss(self.model, self.qdora_loss_chunk_tokens,
                                                  kernel=self.qdora_loss_kernel))
        if self.qdora_packed_attention:  # packed rows: TRL's padding_free or packing, transformers' flattening
            packing = getattr(self.args, "padding_free", False) or getattr(self.args, "packing", False) \
                or type(self.data_collator).__name__ == "DataCollatorWithFlattening"
            handles.append(_PackedAttention.on(self.model, bool(packing)))
        if not self.qdora_keep_padding_mask:
            handles.append(packed_attention.unmasked_padding(self.model))
        try:
            yield
        finally:
            for handle in handles:
                if handle is not None:
                    handle.remove()

    def train(self, *args, **kwargs):
        with self._qdora_forward():
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self._qdora_forward():
            return super().evaluate(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The trainer's own. With the chunked loss on: the loss alone, chunked, unless a metric needs
        the logits (`compute_metrics`, `preprocess_logits_for_metrics`), which the model's own forward
        then computes whole."""
        handle = head_loss.find_chunked_loss(self.model)
        if handle is None or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if self.compute_metrics is not None or self.preprocess_logits_for_metrics is not None:
            with handle.paused():
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        return super().prediction_step(model, inputs, True, ignore_keys=ignore_keys)  # nothing reads the logits

    def create_optimizer(self, *args, **kwargs):
        """The trainer's optimizer (or the one passed as `optimizers=`), over fp32 master copies of
        any bf16/fp16 adapter parameters."""
        optimizer = super().create_optimizer(*args, **kwargs)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not isinstance(optimizer, MasterWeights) and needs_master_weights(params):
            optimizer = self.optimizer = MasterWeights(optimizer)
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter (never the packed base), the tokenizer or processor, and the training arguments."""

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        save_adapter(model, output_dir, format=self.qdora_adapter_format, base_model_name_or_path=base)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer._save does

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter(model if model is not None else self.model, resume_from_checkpoint, verbose=False)

    def _load_best_model(self) -> None:
        load_adapter(self.model, self.state.best_model_checkpoint, verbose=False)


class _PackedAttention:
    """`qdora.packed_sdpa` on a model until `remove()`, which gives it back the attention it had."""

    def __init__(self, lm, previous: str):
        self.lm, self.previous = lm, previous

    @classmethod
    def on(cls, model, packing: bool) -> _PackedAttention | None:
        """Switched where it serves the model (`qdora.models.packed_attention.serves`), else None."""
        if not packed_attention.serves(model, packing):
            return None
        lm = head_loss.causal_lm(model)
        previous = lm.config._attn_implementation
        packed_attention.packed_sdpa(lm)
        return cls(lm, previous)

    def remove(self) -> None:
        self.lm.set_attn_implementation(self.previous)


def _next_init(cls: type):
    """The `__init__` that `AdapterCheckpoints.__init__`'s `super()` call reaches in `cls`."""
    mro = cls.__mro__
    return super(AdapterCheckpoints, cls).__init__ if AdapterCheckpoints in mro else None


def _with_base_reference(cls: type, model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`(args, kwargs)` with `ref_model=BaseReference(model)` when the trainer takes a `ref_model` and was
    given none (as a keyword or in its position)."""
    init = _next_init(cls)
    try:
        signature = inspect.signature(init)
    except (TypeError, ValueError):
        return args, kwargs
    if "ref_model" not in signature.parameters:
        return args, kwargs
    bound = signature.bind_partial(None, *args, **kwargs)  # None stands for self
    if bound.arguments.get("ref_model") is not None:
        return args, kwargs  # the caller's own reference
    from qdora.integrations.reference import BaseReference  # only preference trainers need it
    bound.arguments["ref_model"] = BaseReference(model)
    return bound.args[1:], bound.kwargs


def __getattr__(name: str):
    if name == "QDoRATrainer":  # built on first use: transformers' Trainer is a heavy import
        from transformers import Trainer  # heavy, used here only

        class QDoRATrainer(AdapterCheckpoints, Trainer):
            """`transformers.Trainer` that saves and resumes a qdora model by its adapter."""

        globals()["QDoRATrainer"] = QDoRATrainer
        return QDoRATrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
