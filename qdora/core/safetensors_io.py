"""Safetensors files written one tensor at a time, atomically.

The safetensors layout is an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw bytes. Shapes and dtypes are known before any
value is computed, so the header can be written first and each tensor produced, written and freed
in turn: writing a merged 8B checkpoint never holds more than one tensor. Files are written to a
temporary name in the same folder and renamed into place, so a crash never leaves a half file
under the final name. A floating-point tensor with a NaN or an infinity is never written: the
file is refused, naming the tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


class NonFiniteTensorError(ValueError):
    """A tensor about to be written holds a NaN or an infinity."""


def check_finite(name: str, t: torch.Tensor, chunk: int = 1 << 24) -> None:
    """Raise `NonFiniteTensorError` naming `name` if float tensor `t` has a non-finite value
    (checked `chunk` elements at a time: one bool temporary of that size at most)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    flat = t.detach().reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), chunk):
        bad += int((~torch.isfinite(flat[start:start + chunk])).sum())
    if bad:
        raise NonFiniteTensorError(f"tensor {name!r} {tuple(t.shape)} has {bad:,} non-finite value(s) "
                                   "(NaN or infinity)")


def write_streaming(path: str | os.PathLike, specs: Iterable[TensorSpec],
                    produce: Callable[[TensorSpec], torch.Tensor],
                    metadata: dict[str, str] | None = None) -> int:
    """Write tensors `specs` to `path`, calling `produce(spec)` for each in order. Returns bytes written.
    A produced float tensor with a non-finite value stops the write (`NonFiniteTensorError`, which
    names the file and the tensor); nothing is left under `path`."""
    specs = list(specs)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        if spec.dtype not in _DTYPE_CODES:
            raise TypeError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        header[spec.name] = {"dtype": _DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for spec in specs:
                t = produce(spec)
                if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
                    raise ValueError(f"{spec.name}: produced {tuple(t.shape)} {t.dtype}, "
                                     f"planned {tuple(spec.shape)} {spec.dtype}")
                try:
                    check_finite(spec.name, t)
                except NonFiniteTensorError as err:
                    raise NonFiniteTensorError(f"{path}: not written: {err}") from None
                data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
                del t, data
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return 8 + len(encoded) + offset


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, but never leaves a partial file under `path`."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    write_streaming(path, specs, lambda s: tensors[s.name], metadata)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def swap_in_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Replace folder `final` by the finished folder `tmp`: the previous `final` is moved to
    `<name>.old-<pid>` first and removed last, so a crash at any point leaves either the old folder
    (possibly as `.old-<pid>`) or the new one, never a mix. Only such `.old-<pid>` folders are
    removed, this process's and, once the new `final` is in place, those of processes that are gone;
    a `<name>.old` of anyone else's is never touched."""
    final = Path(final)
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    _remove_dead(final, ".old-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_dead(final: Path, infix: str) -> list[Path]:
    """Remove the `<final><infix><pid>` folders whose process is gone."""
    removed = []
    for stale in final.parent.glob(f"{final.name}{infix}*"):
        pid = stale.name.rsplit(infix, 1)[-1]
        if stale.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


def previous_copies(final: str | os.PathLike) -> list[Path]:
    """The `<final>.old-<pid>` folders a crash between `swap_in_dir`'s two renames left, newest first."""
    final = Path(final)
    found = [p for p in final.parent.glob(f"{final.name}.old-*") if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def remove_stale_tmp(final: str | os.PathLike) -> list[Path]:
    """Remove the `<final>.tmp-<pid>` folders that a killed write of `final` left (their process is
    gone); the ones of a live process are left alone. Returns what was removed."""
    return _remove_dead(Path(final), ".tmp-")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Build a folder under a temporary name and swap it in (`swap_in_dir`) only when the block
    completes. Temporary folders of `final` that killed processes left are removed first."""
    final = Path(final)
    remove_stale_tmp(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        swap_in_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_not_an_input(out: str | os.PathLike, inputs: dict[str, str | os.PathLike], flag: str = "--out") -> None:
    """Raise `ValueError` if replacing folder `out` would destroy one of `inputs` ({flag: path}): `out`
    is that path or a folder that holds it. Checked whether or not the user allowed overwriting:
    a command never replaces its own inputs."""
    target = Path(out).resolve()
    for input_flag, path in inputs.items():
        source = Path(path).resolve()
        if source == target or target in source.parents:
            what = "is" if source == target else "holds"
            raise ValueError(f"{flag} {out} {what} {input_flag} {path}: writing there would replace this command's "
                             f"own input; choose another {flag} folder")


def output_folder(out_dir: str | os.PathLike, overwrite: bool, original_checkpoint=None) -> Path:
    """`out_dir` as a Path, once it is known that an export may write there: it does not exist, or
    `overwrite` allows replacing it, and it is not (nor holds) `original_checkpoint`, the export's input."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) or choose another folder")
    if original_checkpoint is not None:
        check_not_an_input(out_dir, {"original_checkpoint": original_checkpoint}, "out_dir")
    return out_dir


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> None:
    """Raise `ValueError` naming `flag` unless `path` is, or can be made, a folder this process can
    write to. Nothing is created: an existing folder is probed with a file that is removed at
    once, a missing one by its nearest existing parent."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is an existing file, not a folder; choose a folder")
    if path.is_dir():
        probe = path / f".qdora-write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"{flag} {path} is not writable ({err.strerror or err}); choose a folder you can "
                             "write to") from None
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, so the folder cannot be made; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(parent) else "permission denied"
        raise ValueError(f"{flag} {path} cannot be created in {parent} ({reason}); choose a folder you can "
                         "write to")


def _read_only_fs(path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_safetensors_file(path: str | os.PathLike, way_out: str = "") -> None:
    """Raise `ValueError` naming `path` if it is missing or not a readable safetensors file (its
    header is parsed and its length checked against it; the tensors are not read)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing" + (f"; {way_out}" if way_out else ""))
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({err})"
                         + (f"; {way_out}" if way_out else "")) from None


def parse_size(size: int | str) -> int:
    """`2GB`, `500MB`, `1GiB` or a byte count."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    if text.isdigit():
        return int(text)
    raise ValueError(f"size {size!r} is not understood; write e.g. '2GB', '500MB' or a byte count")
