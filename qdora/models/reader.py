"""`CheckpointReader`: the tensors of a safetensors checkpoint folder (one file, or shards with an
index), by name, each shard memory-mapped only while it is read. Only safetensors are read."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointReader:
    """Tensors of a safetensors checkpoint folder (one file or shards with an index), by name.
    Missing shards and unreadable files are reported with the file's name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {self.path}")
        if (self.path / INDEX).is_file():
            try:
                weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{self.path / INDEX}: not a valid safetensors index ({err})") from err
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{self.path}: shard(s) listed in {INDEX} are missing: {', '.join(missing)}")
        elif (self.path / SINGLE).is_file():
            files, weight_map = [SINGLE], None
        else:
            pickles = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
            hint = (f" (found {', '.join(pickles)}: pickle checkpoints are not loaded; convert them to "
                    "safetensors)" if pickles else "")
            raise FileNotFoundError(f"{self.path}: no {SINGLE} or {INDEX}{hint}")
        self.files = files
        self.keys_by_file: dict[str, list[str]] = {}
        for f in files:
            with self.open(f) as handle:
                self.keys_by_file[f] = list(handle.keys())
        self.file_of = {k: f for f, keys in self.keys_by_file.items() for k in keys}
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if self.file_of.get(k) != f)
            if absent:
                raise ValueError(f"{self.path}: {len(absent)} tensor(s) listed in {INDEX} are not in their shard, "
                                 f"e.g. {absent[0]!r} in {weight_map[absent[0]]}")

    @contextlib.contextmanager
    def open(self, file: str):
        """One shard, memory-mapped while the context lasts (its pages leave the process after)."""

        try:
            handle = safe_open(str(self.path / file), framework="pt")
        except Exception as err:  # safetensors' own error types for truncated/corrupt files
            raise ValueError(f"{self.path / file}: corrupt or truncated safetensors file ({err})") from err
        shard = _Shard(handle, self.path / file)
        try:
            yield shard
        finally:
            shard.handle = None  # drop the mapping now, not when the caller's variable goes away
            del handle

    def keys(self) -> list[str]:
        return list(self.file_of)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.file_of:
            raise KeyError(f"{self.path}: no tensor named {key!r}")
        with self.open(self.file_of[key]) as shard:
            return shard.get(key)


class _Shard:
    def __init__(self, handle, file: Path):
        self.handle, self.file = handle, file

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.handle.get_tensor(key)
        except Exception as err:
            raise ValueError(f"{self.file}: cannot read tensor {key!r} ({err})") from err
