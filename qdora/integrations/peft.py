"""Accelerate PEFT's DoRA in place: `qdora.patch_peft(peft_model)`.

Every PEFT LoRA layer that runs one DoRA adapter (`LoraConfig(use_dora=True)`) over a
`bnb.nn.Linear4bit` NF4 base or a plain `nn.Linear` base computes through qdora's autograd function
(`qdora.core.function.DoRAFunction`: the factored row norm, row-block dequantization, one pass over the
base weight) instead of PEFT's DoRA, which dequantizes the whole weight and forms `W0 + s·B·A` at
every step. The patched layer reads PEFT's own parameters (`lora_A[name].weight`,
`lora_B[name].weight`, `lora_magnitude_vector[name].weight`, `scaling[name]`,
`lora_dropout[name]`), so PEFT's `save_pretrained` / `from_pretrained`, `merge_and_unload`, adapter
switching and every trainer built on PEFT work unchanged; nothing is added to the state dict.

Semantics. With `lora_dropout=0` a patched layer computes PEFT's DoRA: `y = bias + (m/n)·(x·W0ᵀ +
s·x·Aᵀ·Bᵀ)` with `n = ||W0 + s·B·A||` per row, detached in the backward as PEFT (and the DoRA paper,
§4.3) detach it; outputs and gradients agree to fp32 rounding (tests/test_peft_patch.py). Rows with
`n = 0` are guarded by `eps` (PEFT divides by zero there); the patch bounds PEFT's own row norm
(`get_weight_norm`) the same way, so `merge_and_unload()` writes such rows as 0, finite, not 0/0.
With dropout `p > 0` PEFT runs a second base pass and computes `W0·x + (g−1)·W0·x_d + g·s·B·A·x_d` with
`x_d = dropout(x)`, which equals `g·(W0·x + s·B·A·x_d)` only in expectation; a patched layer computes
`g·(W0·x + s·B·A·x_d)`: dropout on the adapter's input only, no second base pass (as qdora's own layers
do).

A layer is computed by PEFT, unchanged, whenever the patch cannot stand for it: adapters disabled or
merged, a mixed-adapter batch (`adapter_names=`), or other than exactly one active adapter on it
that is DoRA. Layers the patch never takes (`fan_in_fan_out`, 8-bit or FP4 bases, DoRA on
embeddings or convolutions) are named in one warning. The base of a patched layer is kept in the
standard NF4 layout (`qdora.keep_standard_layout`), so bitsandbytes' eval-mode repacking on
AVX512-BF16 CPUs cannot change what it computes; a base already repacked is refused.
"""

from __future__ import annotations

import types
import warnings

import bitsandbytes as bnb
import torch
from packaging.version import Version
from torch import nn

from qdora.core.function import DoRAFunction, LayerSpec
from qdora.core.nf4 import RowBlocks, is_repacked, repacked_message

PEFT_VERSIONS = ("0.21", "0.22")
"""PEFT versions whose LoRA layer layout the patch was written and tested against: [first, last)."""


class PeftPatch:
    """The patch on one model: `layers` (names of the patched layers), `skipped` (name -> why PEFT
    keeps it). `unpatch()` restores PEFT's forward; also a context manager that unpatches on exit."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], skipped: dict[str, str]):
        self.model, self._layers, self.skipped = model, layers, skipped

    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    def unpatch(self) -> int:
        """Give every patched layer PEFT's forward back; returns how many."""
        for layer in self._layers.values():
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("_qdora_patch", None)
            for dora in layer.lora_magnitude_vector.values():
                dora.__dict__.pop("get_weight_norm", None)
        count = len(self._layers)
        self._layers = {}
        if getattr(self.model, "_qdora_peft_patch", None) is self:
            del self.model._qdora_peft_patch
        return count

    def __enter__(self) -> "PeftPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        return f"PeftPatch({len(self._layers)} layers patched, {len(self.skipped)} left to PEFT)"


class _LayerState:
    """What a patched layer keeps besides PEFT's parameters: the row reader over its base and
    `c = rowsum(W0²)` (computed at the first forward on the base's device, again if the base moves)."""

    def __init__(self, original_forward, block_rows: int, eps: float):
        self.original_forward = original_forward
        self.block_rows, self.eps = block_rows, eps
        self._key = None
        self.blocks: RowBlocks | None = None
        self.c: torch.Tensor | None = None

    def terms(self, base: nn.Module) -> tuple[RowBlocks, torch.Tensor]:
        key = (base.weight.data_ptr(), base.weight.device)
        if self._key != key:
            self.blocks = RowBlocks(base, self.block_rows)
            self.c = self.blocks.row_sq_norms()
            self._key = key
        return self.blocks, self.c


def _peft_lora_classes() -> tuple[type, ...]:
    from peft.tuners.lora import layer as lora_layer  # optional: only this path uses PEFT
    classes = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb  # optional: only this path uses PEFT
        if hasattr(lora_bnb, "Linear4bit"):
            classes.append(lora_bnb.Linear4bit)
    except ImportError:  # PEFT without bitsandbytes support
        pass
    return tuple(classes)


def _check_peft_version() -> None:
    import peft  # optional: only this path uses PEFT
    first, last = PEFT_VERSIONS
    if not Version(first) <= Version(Version(peft.__version__).base_version) < Version(last):
        raise ValueError(f"qdora.patch_peft supports peft >= {first}, < {last} (the LoRA layer layout it reads); "
                         f"found peft {peft.__version__}: pip install 'peft>={first},<{last}'")


def _why_not(layer: nn.Module) -> str | None:
    """Why a PEFT LoRA layer with a DoRA adapter cannot be patched, or None if it can."""
    if not isinstance(layer, _peft_lora_classes()):
        return f"{type(layer).__name__} (DoRA on embeddings, convolutions or other layer types)"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    base = layer.get_base_layer()
    if isinstance(base, bnb.nn.Linear4bit):
        if getattr(base.weight, "quant_type", None) != "nf4":
            return f"a {getattr(base.weight, 'quant_type', '?')} 4-bit base (qdora reads NF4)"
        return None
    if isinstance(base, bnb.nn.Linear8bitLt):
        return "an 8-bit base"
    if type(base) is not nn.Linear:
        return f"a {type(base).__name__} base"
    return None


def _the_dora_adapter(layer: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """The one active DoRA adapter a patched forward computes, or None to let PEFT compute."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or not layer.use_dora.get(active[0], False):
        return None
    return active[0]


def _patched_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    state: _LayerState = self._qdora_patch
    adapter = _the_dora_adapter(self, args, kwargs)
    if adapter is None:
        return state.original_forward(x, *args, **kwargs)
    base = self.get_base_layer()
    blocks, c = state.terms(base)
    if isinstance(base, bnb.nn.Linear4bit):
        compute = base.compute_dtype or x.dtype  # bitsandbytes' own choice for this layer
    else:
        compute = base.weight.dtype
    A = self.lora_A[adapter].weight
    x_lora = self.lora_dropout[adapter](x)
    spec = LayerSpec(blocks=blocks, c=c, bias=base.bias, scaling=float(self.scaling[adapter]), exact=False,
                     eps=state.eps, compute_dtype=compute)
    y = DoRAFunction.apply(x, x_lora, A, self.lora_B[adapter].weight,
                           self.lora_magnitude_vector[adapter].weight, spec)
    return y.to(x.dtype)


def _guarded_norm(get_weight_norm, eps: float):
    """PEFT's row norm bounded below by `eps`, as the patched forward bounds it: PEFT's merge (and its
    own forward) then computes `m / max(n, eps)`, so a zero row (m = 0, n = 0) merges to 0, not 0/0."""
    def guarded(*args, **kwargs) -> torch.Tensor:
        return get_weight_norm(*args, **kwargs).clamp_min(eps)
    return guarded


def patch_peft(model: nn.Module, block_rows: int = 1024, eps: float = 1e-6) -> PeftPatch:
    """Make every PEFT DoRA layer of `model` (a `peft.PeftModel`, or any model holding PEFT LoRA
    layers) compute through qdora; see the module docstring for what changes and what does not.

    Args:
        model: the PEFT model, patched in place.
        block_rows: rows of a base weight dequantized at once.
        eps: lower bound of a row norm (zero rows stay finite).

    Returns:
        A `PeftPatch`: `.layers`, `.skipped`, `.unpatch()`; `with qdora.patch_peft(model): ...`
        unpatches when the block ends.

    Raises:
        ValueError: the model is already patched, has no DoRA layer, its PEFT version is outside
            `PEFT_VERSIONS`, or a base was repacked by bitsandbytes (see `qdora.keep_standard_layout`).
    """
    _check_peft_version()
    from peft.tuners.lora import LoraLayer  # optional: only this path uses PEFT

    if getattr(model, "_qdora_peft_patch", None) is not None:
        raise ValueError("this model is already patched by qdora.patch_peft; call .unpatch() on the returned "
                         "patch (or qdora.unpatch_peft(model)) before patching it again")
    dora = {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and any(getattr(m, "use_dora", {}).values())}
    if not dora:
        raise ValueError(f"{type(model).__name__} has no PEFT LoRA layer with a DoRA adapter: create it with "
                         "peft.LoraConfig(use_dora=True, ...) (qdora.patch_peft accelerates DoRA only)")
    skipped = {name: why for name, m in dora.items() if (why := _why_not(m)) is not None}
    take = {name: m for name, m in dora.items() if name not in skipped}
    repacked = [name for name, m in take.items()
                if isinstance(m.get_base_layer(), bnb.nn.Linear4bit) and is_repacked(m.get_base_layer())]
    if repacked:
        raise ValueError(repacked_message(repacked))
    for name, layer in take.items():
        base = layer.get_base_layer()
        if isinstance(base, bnb.nn.Linear4bit):
            base.support_avx512bf16_for_cpu = False  # qdora.core.nf4._keep_standard_layout
        layer._qdora_patch = _LayerState(layer.forward, block_rows, eps)
        layer.forward = types.MethodType(_patched_forward, layer)
        for dora in layer.lora_magnitude_vector.values():
            dora.get_weight_norm = _guarded_norm(dora.get_weight_norm, eps)
    if skipped:
        shown = "; ".join(f"{name}: {why}" for name, why in list(skipped.items())[:8])
        more = f"; ... ({len(skipped)} in all)" if len(skipped) > 8 else ""
        warnings.warn(f"qdora.patch_peft left {len(skipped)} DoRA layer(s) to PEFT: {shown}{more}", stacklevel=2)
    patch = PeftPatch(model, take, skipped)
    model._qdora_peft_patch = patch
    return patch


def unpatch_peft(model: nn.Module) -> int:
    """Undo `patch_peft(model)`; returns the number of layers given PEFT's forward back (0 if the
    model was not patched)."""
    patch = getattr(model, "_qdora_peft_patch", None)
    return patch.unpatch() if patch is not None else 0
