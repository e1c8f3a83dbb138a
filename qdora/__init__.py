"""qdora: quantized DoRA fine-tuning (DoRA adapters over NF4 bitsandbytes bases).

The public names below are imported on first use (PEP 562), so that `import qdora` and the command
line's `qdora --help` / `--version` answer without importing torch, transformers or bitsandbytes.
"""

import importlib as _importlib
import logging as _logging
import warnings as _warnings

# bitsandbytes' CPU backend warns at import that an optional PyPI kernel package is missing; set
# before anything imports bitsandbytes (every public name below does).
_warnings.filterwarnings("ignore", message="Failed to load CPU gemm_4bit_forward")
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

__version__ = "0.1.0"

_PUBLIC = {
    "AdapterCheckpoints": "qdora.integrations.trainer",
    "AdapterConfig": "qdora.core.config",
    "METHODS": "qdora.core.config",
    "MasterWeights": "qdora.core.optim",
    "QDoRALinear": "qdora.core.layer",
    "QDoRATrainer": "qdora.integrations.trainer",  # transformers.Trainer with AdapterCheckpoints
    "RowBlocks": "qdora.core.nf4",
    "add_adapters": "qdora.models.surgery",
    "chunked_loss": "qdora.models.head_loss",
    "disable_adapter": "qdora.models.switch",
    "disable_adapters": "qdora.models.switch",
    "enable_adapters": "qdora.models.switch",
    "extract_lora": "qdora.export.lora",
    "keep_standard_layout": "qdora.core.nf4",
    "linear4bit_from_linear": "qdora.core.nf4",
    "load_adapter": "qdora.models.adapter_io",
    "load_model": "qdora.models.loading",
    "merge_and_save": "qdora.export.merge",
    "merged_weight": "qdora.export.merge",
    "offload_activations": "qdora.models.offload",
    "packed_sdpa": "qdora.models.packed_attention",
    "param_report": "qdora.models.surgery",
    "patch_peft": "qdora.integrations.peft",
    "quantize_nf4": "qdora.core.nf4",
    "save_adapter": "qdora.models.adapter_save",
    "tiled_layers": "qdora.models.tiled_mlp",
    "tiled_mlp": "qdora.models.tiled_mlp",
    "unmasked_padding": "qdora.models.packed_attention",
    "unpatch_peft": "qdora.integrations.peft",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'qdora' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
