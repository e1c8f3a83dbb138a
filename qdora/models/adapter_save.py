"""Writing adapter files, in our format or PEFT's, and `save_pretrained` on an adapted model.

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

A model adapted by `qdora.add_adapters` (or `qdora.load_model`) is a transformers model whose linear
layers hold packed NF4 weights; its own `save_pretrained` would write them as a checkpoint nothing
can load. `route_save_pretrained` makes that model's `save_pretrained` (and so a plain
`Trainer.save_model`) write the adapter instead, as `peft.PeftModel.save_pretrained` does.
Safetensors only; `qdora.models.adapter_io` reads what is written here.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn

from qdora.core.config import AdapterConfig
from qdora.core.experts import AdaptedRouter
from qdora.core.layer import QDoRALinear
from qdora.core.safetensors_io import save_file_atomic, write_text_atomic
from qdora.models.moe import expert_owner, peft_expert_tensors

QDORA_CONFIG, QDORA_WEIGHTS = "qdora_adapter.json", "adapter.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1
TRAINED = ("lora_A", "lora_B", "vera_lambda_d", "vera_lambda_b", "magnitude_delta")
SHARED = ("vera_A", "vera_B")


def adapter_layers(model: nn.Module) -> dict[str, QDoRALinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QDoRALinear)}


def require_adapters(model: nn.Module) -> tuple[dict[str, QDoRALinear], AdapterConfig]:
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


def save_adapter(model: nn.Module, path: str | os.PathLike, format: str = "qdora",
                 base_model_name_or_path: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters to folder `path` in `format` `"qdora"` or `"peft"`.
    Each file is written to a temporary name and renamed; the config is written last.
    `tensors` (`<module>.<attr>` -> tensor) overrides the layers' own parameters: a sharded model
    passes its gathered whole parameters (`qdora.train.fsdp.save_adapter_gathered`)."""
    if format not in ("qdora", "peft"):
        raise ValueError(f"format={format!r} is unknown; use 'qdora' or 'peft'")
    layers, cfg = require_adapters(model)
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
            for attr in TRAINED:
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
    gates = [name for name in layers if isinstance(model.get_submodule(name.rpartition(".")[0]), AdaptedRouter)]
    if gates:
        raise ValueError(f"PEFT cannot express an adapter on an MoE router ({gates[0].rpartition('.')[0]}: not a "
                         "linear layer in transformers); save with format='qdora'")
    experts, target_parameters = peft_expert_tensors(layers, model, value)
    tensors.update({PEFT_PREFIX + key: t for key, t in experts.items()})
    plain = [name for name in layers if expert_owner(name, model) is None]
    for name, layer in ((name, layers[name]) for name in plain):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = value(name, layer, "lora_A")
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = value(name, layer, "lora_B")
        if layer.use_dora:  # PEFT stores the whole magnitude m = ||W0 row|| + delta
            delta = value(name, layer, "magnitude_delta").float()
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.base_norm.detach().cpu() + delta
    save_file_atomic(tensors, path / PEFT_WEIGHTS, {"format": "pt"})
    peft_cfg = peft_lora_config(cfg.r, cfg.alpha, sorted(plain), base_model_name_or_path, dropout=cfg.dropout,
                                use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)
    if target_parameters:  # PEFT's LoRA on 3-D expert parameters (it takes no dropout there)
        peft_cfg.update(target_parameters=target_parameters, lora_dropout=0.0)
    write_text_atomic(path / PEFT_CONFIG, json.dumps(peft_cfg, indent=2) + "\n")
    return path


def peft_lora_config(r: int, alpha: float, target_modules: list[str], base_model_name_or_path: str | None,
                     dropout: float = 0.0, use_dora: bool = False, use_rslora: bool = False,
                     rank_pattern: dict[str, int] | None = None,
                     alpha_pattern: dict[str, float] | None = None) -> dict:
    """PEFT's `adapter_config.json` for a LoRA (or DoRA) adapter with no bias and nothing else trained."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_dora": use_dora, "use_rslora": use_rslora,
        "target_modules": target_modules, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }




def peft_expressible(model: nn.Module) -> bool:
    """Whether PEFT's LoRA format can hold the model's adapters (no VeRA direction, no magnitude-only modules)."""
    layers, cfg = require_adapters(model)
    on_experts = any(expert_owner(name, model) is not None for name in layers)
    if any(isinstance(model.get_submodule(name.rpartition(".")[0]), AdaptedRouter) for name in layers):
        return False
    return cfg.direction == "lora" and all(layer.r > 0 for layer in layers.values()) \
        and not (on_experts and cfg.use_dora)


def save_pretrained_adapter(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                            push_to_hub: bool = False, adapter_format: str | None = None, **ignored) -> None:
    """`save_pretrained` of a qdora-adapted model: the adapter, not the packed base. PEFT's format
    (what `peft.PeftModel.from_pretrained` reads) where it can express the adapter, else ours; both
    load with `qdora.load_adapter`. `state_dict`, `safe_serialization` and the like are transformers'
    options for whole checkpoints and mean nothing here. A merged model: `qdora.merge_and_save`."""
    if push_to_hub:
        raise ValueError("push_to_hub is not supported for a qdora model: save the adapter, then upload the folder "
                         "(huggingface_hub.upload_folder)")
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ValueError("this model is sharded (FSDP): save its adapter with "
                         "qdora.train.fsdp.save_adapter_gathered(model, path) on every rank")
    if not is_main_process:
        return
    fmt = adapter_format or ("peft" if peft_expressible(model) else "qdora")
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    save_adapter(model, save_directory, format=fmt, base_model_name_or_path=base)


def route_save_pretrained(model: nn.Module) -> None:
    """Make `model.save_pretrained(path)` write its adapter (`save_pretrained_adapter`)."""
    model.save_pretrained = types.MethodType(save_pretrained_adapter, model)
