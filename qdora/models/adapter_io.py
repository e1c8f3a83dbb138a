"""Reading adapter files (ours and PEFT's, written by `qdora.models.adapter_save`) and loading them into a
model, after checking that they fit it. Safetensors only: nothing is unpickled."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors import safe_open
from torch import nn

from qdora.core.config import AdapterConfig
from qdora.core.safetensors_io import NonFiniteTensorError, check_finite
from qdora.models.adapter_save import (
    BASE_FIELDS,
    FORMAT_VERSION,
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    QDORA_CONFIG,
    QDORA_WEIGHTS,
    SHARED,
    adapter_layers,
    base_fingerprint,
    save_adapter,
)
from qdora.models.moe import expert_count, experts_from_peft, file_expert_count
from qdora.models.surgery import add_adapters


def _check_base(model: nn.Module, saved: dict, path) -> None:
    """Refuse a model whose shape is not the recorded base's (one line, before the list of keys that
    would not fit); warn when only the NF4 quantization differs (its weights differ slightly)."""
    here = base_fingerprint(model)
    differ = [f"{k} {saved[k]} in the adapter's base, {here.get(k)} here" for k in BASE_FIELDS
              if saved.get(k) is not None and here.get(k) is not None and saved[k] != here[k]]
    if differ:
        raise ValueError(f"adapter {path} was trained on another base model ({'; '.join(differ)}); load it on the "
                         "base it was trained on")
    mine, theirs = here.get("nf4"), saved.get("nf4")
    if mine and theirs and mine != theirs:
        what = "; ".join(f"{k} {theirs[k]} then, {mine[k]} here" for k in theirs if theirs[k] != mine.get(k))
        warnings.warn(f"adapter {path} was trained on an NF4 base quantized otherwise ({what}): the base weights "
                      "differ slightly, and so will the outputs; quantize the base as in training (e.g. "
                      "bnb_4bit_use_double_quant) for the trained model", stacklevel=3)


def _check_experts(model: nn.Module, modules: dict, path) -> None:
    """Refuse, in one line, an MoE adapter on a dense model or on an MoE with another expert count."""
    theirs = file_expert_count(modules)
    if theirs is None:
        return
    mine = expert_count(model)
    if mine != theirs:
        here = "no experts (a dense model)" if mine is None else f"{mine} experts per MoE layer"
        raise ValueError(f"adapter {path} adapts the experts of an MoE with {theirs} experts per layer; this model "
                         f"({type(model).__name__}) has {here}: load it on the base it was trained on")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter file; refused, naming the tensor, if one is not finite."""
    if not file.is_file():
        raise FileNotFoundError(f"adapter weights not found: {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
    for key, t in tensors.items():
        try:
            check_finite(key, t)
        except NonFiniteTensorError as err:
            raise NonFiniteTensorError(f"{file}: {err}; the run that wrote it diverged, so this adapter is "
                                       "refused (train again with a lower learning rate)") from None
    return tensors


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: invalid JSON ({err})") from err


def read_adapter(path: str | os.PathLike) -> tuple[str, dict, dict[str, dict[str, torch.Tensor]]]:
    """Read an adapter folder of either format: (format, config dict, {module: {attr: tensor}}).
    PEFT magnitudes come back under `magnitude` (the full m), ours under `magnitude_delta`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {path}")
    if (path / QDORA_CONFIG).is_file():
        meta = _read_json(path / QDORA_CONFIG)
        if meta.get("format") != "qdora" or meta.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path / QDORA_CONFIG}: unsupported format/version "
                             f"{meta.get('format')!r}/{meta.get('version')!r}")
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in _read_tensors(path / QDORA_WEIGHTS).items():
            if key in SHARED:
                meta.setdefault("shared", {})[key] = t
                continue
            name, _, attr = key.rpartition(".")
            modules.setdefault(name, {})[attr] = t
        return "qdora", meta, modules
    if (path / PEFT_CONFIG).is_file():
        meta = _read_json(path / PEFT_CONFIG)
        if meta.get("peft_type") != "LORA":
            raise ValueError(f"{path / PEFT_CONFIG}: peft_type={meta.get('peft_type')!r}; only LORA (with or "
                             "without use_dora) adapters can be loaded")
        for key in ("rank_pattern", "alpha_pattern"):
            if meta.get(key):
                raise ValueError(f"{path / PEFT_CONFIG}: {key} is not supported (one rank and alpha for all modules)")
        if meta.get("bias", "none") != "none" or meta.get("modules_to_save"):
            raise ValueError(f"{path / PEFT_CONFIG}: bias training and modules_to_save are not supported")
        modules = {}
        for key, t in _read_tensors(path / PEFT_WEIGHTS).items():
            name = key.removeprefix(PEFT_PREFIX)
            for suffix, attr in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                                 (".lora_magnitude_vector", "magnitude"),
                                 (".lora_magnitude_vector.weight", "magnitude")):
                if name.endswith(suffix):
                    modules.setdefault(name[: -len(suffix)], {})[attr] = t
                    break
            else:
                raise ValueError(f"{path / PEFT_WEIGHTS}: unexpected tensor {key!r}")
        if meta.get("target_parameters"):  # LoRA on 3-D expert parameters: one entry per expert here
            modules = experts_from_peft(modules, list(meta["target_parameters"]), int(meta["r"]))
        return "peft", meta, modules
    raise FileNotFoundError(f"{path} holds neither {QDORA_CONFIG} (qdora) nor {PEFT_CONFIG} (PEFT)")


def adapter_config(fmt: str, meta: dict, modules: dict, quantized: bool = True) -> AdapterConfig:
    """The `AdapterConfig` an adapter file was trained with. Ours records it; a PEFT file does not
    say how its base was loaded, so `quantized` chooses between the q-methods and the plain ones."""
    if fmt == "qdora":
        return AdapterConfig.from_dict(meta["config"])
    use_dora = bool(meta.get("use_dora", False))
    method = ("q" if quantized else "") + ("dora" if use_dora else "lora")
    return AdapterConfig(method=method, r=int(meta["r"]), alpha=float(meta["lora_alpha"]),
                         dropout=float(meta.get("lora_dropout", 0.0)), use_rslora=bool(meta.get("use_rslora")),
                         target_modules=_peft_targets(meta, modules), adapter_dtype="float32")


def _peft_targets(meta: dict, modules: dict) -> tuple[str, ...]:
    """A PEFT file's adapted modules as targets: by name, the experts by their `target_parameters`."""
    experts = tuple(meta.get("target_parameters") or ())
    return tuple(sorted(n for n in modules if not experts or file_expert_count([n]) is None)) + experts


def load_adapter(model: nn.Module, path: str | os.PathLike, verbose: bool = True) -> nn.Module:
    """Load an adapter folder (qdora or PEFT format) into `model`.

    If the model has no adapters yet they are added from the file's config first; otherwise the
    file must fit the adapters already there. Every mismatch (missing or unexpected modules,
    shapes, DoRA vs LoRA) is listed in one error.
    """
    fmt, meta, modules = read_adapter(path)
    _check_experts(model, modules, path)
    if fmt == "qdora" and isinstance(meta.get("base"), dict):
        _check_base(model, meta["base"], path)
    if not adapter_layers(model):

        quantized = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        add_adapters(model, adapter_config(fmt, meta, modules, quantized), verbose=verbose)
    layers = adapter_layers(model)
    problems = []
    for name in sorted(set(layers) - set(modules)):
        problems.append(f"{name}: in the model, not in the file")
    for name in sorted(set(modules) - set(layers)):
        problems.append(f"{name}: in the file, not in the model")
    for name in sorted(set(layers) & set(modules)):
        layer, saved = layers[name], modules[name]
        expected = {}
        for attr in ("lora_A", "lora_B", "vera_lambda_d", "vera_lambda_b"):
            if getattr(layer, attr, None) is not None:
                expected[attr] = tuple(getattr(layer, attr).shape)
        if layer.use_dora:
            expected["magnitude_delta" if fmt == "qdora" else "magnitude"] = (layer.out_features,)
        for attr in sorted(set(expected) | set(saved)):
            if attr not in saved:
                problems.append(f"{name}.{attr}: missing from the file"
                                + (" (the file is LoRA, the model DoRA)" if "magnitude" in attr else ""))
            elif attr not in expected:
                problems.append(f"{name}.{attr}: in the file but the model has no such tensor"
                                + (" (the file is DoRA, the model LoRA)" if "magnitude" in attr else ""))
            elif tuple(saved[attr].shape) != expected[attr]:
                problems.append(f"{name}.{attr}: file shape {tuple(saved[attr].shape)}, model shape {expected[attr]}")
    shared = meta.get("shared", {}) if fmt == "qdora" else {}
    projections = {id(layer.vera): layer.vera for layer in layers.values() if layer.vera is not None}
    if projections and not shared:
        problems.append("the model has a VeRA direction but the file has no vera_A/vera_B projections")
    for vera in projections.values():
        for key in SHARED:
            if key in shared and shared[key].shape != getattr(vera, key[-1]).shape:
                problems.append(f"{key}: file shape {tuple(shared[key].shape)}, "
                                f"model shape {tuple(getattr(vera, key[-1]).shape)}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"adapter {path} does not fit this model:\n  - " + "\n  - ".join(shown))
    with torch.no_grad():
        for name, layer in layers.items():
            saved = modules[name]
            for attr in ("lora_A", "lora_B", "vera_lambda_d", "vera_lambda_b"):
                if getattr(layer, attr, None) is not None:
                    getattr(layer, attr).copy_(saved[attr])
            if layer.use_dora:
                if fmt == "qdora":
                    layer.magnitude_delta.copy_(saved["magnitude_delta"])
                else:
                    layer.set_magnitude(saved["magnitude"])
        for vera in projections.values():  # shared by every layer: copied once
            vera.A.copy_(shared["vera_A"])
            vera.B.copy_(shared["vera_B"])
    return model


__all__ = ["adapter_config", "adapter_layers", "base_fingerprint", "load_adapter", "read_adapter", "save_adapter"]
