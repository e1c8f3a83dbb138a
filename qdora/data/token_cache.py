"""Tokenized examples, with each one's length before the cut to `cutoff_len`, cached on disk per
(data content, tokenizer, chat template, cutoff and the settings that shape the labels), so that a
second run over the same data starts at once.

The cache is a safetensors file (no pickle) under `$QDORA_CACHE/tokenized/` (default
`~/.cache/qdora`), written atomically; a file that cannot be read is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qdora.core.safetensors_io import save_file_atomic
from qdora.data.examples import Record, Tokenized, tokenize_all

CACHE_VERSION = 2
"""Raised when what tokenization produces changes, so that older cached files are not reused."""


def cache_root() -> Path:
    return Path(os.environ.get("QDORA_CACHE", Path.home() / ".cache" / "qdora")) / "tokenized"


def data_fingerprint(path: str | os.PathLike) -> str:
    """The content of a data file, or of every file in a data folder (names and bytes)."""
    p = Path(path)
    digest = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        digest.update(f"{f.relative_to(p) if p.is_dir() else ''}:{f.stat().st_size};".encode())
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides a tokenizer's output: its whole definition (vocabulary, merges, normalizer,
    pre- and post-processing) when it is a fast tokenizer, else its vocabulary; its special tokens;
    its chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = [type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None),
                getattr(tokenizer, "chat_template", None)]
    digest.update(json.dumps(settings, default=str).encode())
    return digest.hexdigest()


def cached_examples(data: str | os.PathLike, records: Sequence[Record], tokenizer, cutoff_len: int,
                    train_on_prompt: bool, format: str = "auto", progress: bool = True) -> Tokenized:
    """`tokenize_all(records, ...)` for the records read from `data` (the examples cut to
    `cutoff_len`, and each one's length before the cut): from the cache when this data was
    tokenized the same way before, else tokenized now and stored."""
    key = hashlib.sha256(json.dumps([CACHE_VERSION, data_fingerprint(data), tokenizer_fingerprint(tokenizer),
                                     cutoff_len, train_on_prompt, format, len(records)]).encode()).hexdigest()
    path = cache_root() / f"{key[:32]}.safetensors"
    if path.is_file():
        try:
            return _unflatten(load_file(str(path)), cutoff_len)
        except (SafetensorError, OSError, KeyError, ValueError):
            pass  # unreadable or from elsewhere: rebuilt below
    tokenized = tokenize_all(records, tokenizer, cutoff_len, train_on_prompt, progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file_atomic(_flatten(tokenized), path, {"version": str(CACHE_VERSION), "data": str(data)})
    except OSError:
        pass  # a cache that cannot be written costs only the next run's tokenizing time
    return tokenized


def _flatten(tokenized: Tokenized) -> dict[str, torch.Tensor]:
    """The examples end to end (`lengths`: each one's tokens) and each one's length before the cut
    (`whole_lengths`)."""
    examples = tokenized.examples
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    return {"input_ids": torch.tensor(ids, dtype=torch.int32), "labels": torch.tensor(labels, dtype=torch.int32),
            "lengths": torch.tensor([len(ex["input_ids"]) for ex in examples], dtype=torch.int64),
            "whole_lengths": torch.tensor(tokenized.lengths, dtype=torch.int64)}


def _unflatten(tensors: dict[str, torch.Tensor], cutoff_len: int) -> Tokenized:
    lengths = tensors["lengths"].tolist()
    whole = tensors["whole_lengths"].tolist()
    if int(sum(lengths)) != tensors["labels"].numel() or len(whole) != len(lengths) \
            or any(n != min(w, cutoff_len) for n, w in zip(lengths, whole)):
        raise ValueError("inconsistent cache file")
    ids = tensors["input_ids"].split(lengths)
    labels = tensors["labels"].split(lengths)
    return Tokenized([{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in zip(ids, labels)], whole,
                     cutoff_len)
