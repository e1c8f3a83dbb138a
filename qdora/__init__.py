"""qdora: quantized DoRA fine-tuning (DoRA adapters over NF4 bitsandbytes bases)."""

import warnings as _warnings

# bitsandbytes' CPU backend warns at import that an optional PyPI kernel package is missing.
_warnings.filterwarnings("ignore", message="Failed to load CPU gemm_4bit_forward")
import logging as _logging

_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from qdora.adapter_io import load_adapter, save_adapter  # noqa: E402
from qdora.config import METHODS, AdapterConfig  # noqa: E402
from qdora.hf_trainer import AdapterCheckpoints  # noqa: E402
from qdora.layer import QDoRALinear  # noqa: E402
from qdora.loading import load_model  # noqa: E402
from qdora.merge import merge_and_save, merged_weight  # noqa: E402
from qdora.nf4 import RowBlocks, keep_standard_layout, linear4bit_from_linear, quantize_nf4  # noqa: E402
from qdora.peft_patch import patch_peft, unpatch_peft  # noqa: E402
from qdora.surgery import add_adapters, param_report  # noqa: E402

__version__ = "0.1.0"
__all__ = ["AdapterConfig", "METHODS", "QDoRALinear", "add_adapters", "param_report",
           "quantize_nf4", "linear4bit_from_linear", "keep_standard_layout", "RowBlocks", "save_adapter",
           "load_adapter",
           "load_model", "merge_and_save", "merged_weight", "patch_peft", "unpatch_peft", "AdapterCheckpoints",
           "QDoRATrainer"]


def __getattr__(name: str):
    if name == "QDoRATrainer":  # transformers.Trainer with AdapterCheckpoints, imported on first use
        from qdora import hf_trainer  # optional: needs Triton
        return hf_trainer.QDoRATrainer
    raise AttributeError(f"module 'qdora' has no attribute {name!r}")
