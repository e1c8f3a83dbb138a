"""Adapter files: our format and PEFT's, both ways. Safetensors only: nothing is unpickled.

qdora format (a folder):
    qdora_adapter.json       {"format": "qdora", "version": 1, "config": AdapterConfig, "modules": {...}}
    adapter.safetensors      <module>.lora_A (r, in), <module>.lora_B (out, r),
                             <module>.magnitude_delta (out,)   — stored exactly as trained
                             VeRA direction: <module>.vera_lambda_d (r,), <module>.vera_lambda_b (out,),
                             and the shared projections once, as vera_A (r, max_in), vera_B (max_out, r)

PEFT format (what `peft.PeftModel.save_pretrained` writes for `LoraConfig(use_dora=...)`):
    adapter_config.json
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight, ...lora_B.weight,
                               ...lora_magnitude_vector (the full magnitude m)
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors import safe_open
from torch import nn

from qdora.config import AdapterConfig
from qdora.layer import QDoRALinear
from qdora.safetensors_io import NonFiniteTensorError, check_finite, save_file_atomic, write_text_atomic
from qdora.surgery import add_adapters

QDORA_CONFIG, QDORA_WEIGHTS = "qdora_adapter.json", "adapter.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1
_TRAINED = ("lora_A", "lora_B", "vera_lambda_d", "vera_lambda_b", "magnitude_delta")
_SHARED = ("vera_A", "vera_B")


def adapter_layers(model: nn.Module) -> dict[str, QDoRALinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QDoRALinear)}


def _require_adapters(model: nn.Module) -> tuple[dict[str, QDoRALinear], AdapterConfig]:
    layers = adapter_layers(model)
    cfg = getattr(model, "qdora_config", None)
    if cfg is not None and cfg.method == "full":
        raise ValueError("method='full' has no adapter to save; save the whole model "
                         "(model.save_pretrained) or use qdora.merge_and_save")
    if not layers or cfg is None:
        raise ValueError("the model has no qdora adapters; call qdora.add_adapters(model, cfg) first")
    return layers, cfg


BASE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
"""The base model's config fields a qdora adapter file records (`base`), checked when it is loaded."""


def base_fingerprint(model: nn.Module) -> dict:
    """What an adapter needs its base to be: the config's shape fields and, for an NF4 base, how its
    weights were quantized (blocksize, double quantization) as its layers hold them."""
    config = getattr(model, "config", None)
    found = {k: getattr(config, k, None) for k in BASE_FIELDS} if config is not None else {}
    state = next((getattr(m.weight, "quant_state", None) for m in model.modules()
                  if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight, "quant_state", None) is not None), None)
    found["nf4"] = None if state is None else {"blocksize": int(state.blocksize), "double_quant": bool(state.nested)}
    return found


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


def save_adapter(model: nn.Module, path: str | os.PathLike, format: str = "qdora",
                 base_model_name_or_path: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters to folder `path` in `format` `"qdora"` or `"peft"`.
    Each file is written to a temporary name and renamed; the config is written last.
    `tensors` (`<module>.<attr>` -> tensor) overrides the layers' own parameters: a sharded model
    passes its gathered whole parameters (`qdora.fsdp.save_adapter_gathered`)."""
    if format not in ("qdora", "peft"):
        raise ValueError(f"format={format!r} is unknown; use 'qdora' or 'peft'")
    layers, cfg = _require_adapters(model)
    given = tensors or {}

    def value(name: str, layer: QDoRALinear, attr: str) -> torch.Tensor:
        t = given.get(f"{name}.{attr}")
        return (t if t is not None else getattr(layer, attr)).detach().cpu().contiguous()

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    if format == "qdora":
        modules = {}
        for name, layer in layers.items():
            for attr in _TRAINED:
                if getattr(layer, attr, None) is not None:
                    tensors[f"{name}.{attr}"] = value(name, layer, attr)
            if layer.vera is not None and "vera_A" not in tensors:
                tensors["vera_A"] = layer.vera.A.detach().cpu().contiguous()
                tensors["vera_B"] = layer.vera.B.detach().cpu().contiguous()
            modules[name] = {"r": layer.r, "in_features": layer.in_features,
                             "out_features": layer.out_features, "use_dora": layer.use_dora}
        save_file_atomic(tensors, path / QDORA_WEIGHTS, {"format": "qdora"})
        meta = {"format": "qdora", "version": FORMAT_VERSION, "config": cfg.to_dict(), "modules": modules,
                "base_model_name_or_path": base_model_name_or_path, "base": base_fingerprint(model)}
        write_text_atomic(path / QDORA_CONFIG, json.dumps(meta, indent=2) + "\n")
        return path

    if cfg.direction == "vera":
        raise ValueError("PEFT has no DoRA/LoRA adapter with a VeRA direction; save with format='qdora'")
    mag_only = [n for n, layer in layers.items() if layer.r == 0]
    if mag_only:
        raise ValueError(f"PEFT cannot represent magnitude-only modules ({len(mag_only)}, e.g. {mag_only[0]}); "
                         "save with format='qdora'")
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = value(name, layer, "lora_A")
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = value(name, layer, "lora_B")
        if layer.use_dora:  # PEFT stores the whole magnitude m = ||W0 row|| + delta
            delta = value(name, layer, "magnitude_delta").float()
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.base_norm.detach().cpu() + delta
    save_file_atomic(tensors, path / PEFT_WEIGHTS, {"format": "pt"})
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_dora": cfg.use_dora,
        "use_rslora": cfg.use_rslora, "target_modules": sorted(layers), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True,
    }
    write_text_atomic(path / PEFT_CONFIG, json.dumps(peft_cfg, indent=2) + "\n")
    return path


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
            if key in _SHARED:
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
                         target_modules=tuple(sorted(modules)), adapter_dtype="float32")


def load_adapter(model: nn.Module, path: str | os.PathLike, verbose: bool = True) -> nn.Module:
    """Load an adapter folder (qdora or PEFT format) into `model`.

    If the model has no adapters yet they are added from the file's config first; otherwise the
    file must fit the adapters already there. Every mismatch (missing or unexpected modules,
    shapes, DoRA vs LoRA) is listed in one error.
    """
    fmt, meta, modules = read_adapter(path)
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
        for key in _SHARED:
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
