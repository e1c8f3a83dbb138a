"""transformers configs as the checkpoints qdora writes record them: the tensors' dtype, and no
quantization settings for a plain checkpoint."""

from __future__ import annotations

import copy

import torch


def set_config_dtype(config, dtype: torch.dtype) -> None:
    import transformers  # heavy, used here only
    if int(transformers.__version__.split(".")[0]) >= 5:
        config.dtype = dtype
    else:
        config.torch_dtype = dtype


def plain_config(config, dtype: torch.dtype):
    """A copy of a transformers config for a plain checkpoint of `dtype` tensors: no quantization
    settings (a GGUF or bitsandbytes load records them), `dtype` as the checkpoint's dtype."""
    config = copy.deepcopy(config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    set_config_dtype(config, dtype)
    return config
