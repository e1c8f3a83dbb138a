"""The checks of a training run that need no model, made before anything slow or anything written:
the output folder, the checkpoint to resume (that it belongs to this run, and that its files can
be read), the model path. A run folder may be moved: `out` is not compared, and `model` and `data`
may move too if their content is the same."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qdora.core.safetensors_io import check_output_dir
from qdora.models.loading import check_model_path
from qdora.train.checkpoint import check_checkpoint, find_checkpoint
from qdora.train.config import TrainConfig

# Fields that may change between a run and its resumption. `out` is not compared: a run folder may
# be moved or copied and resumed where it now is. `model` and `data` may move too if their content
# is the same (`fingerprints`). The chunked loss changes memory, not the run (beyond fp32 rounding): a
# run that ran out of memory may resume with smaller chunks.
_RESUMABLE_CHANGES = {"out", "max_steps", "epochs", "resume", "save_every", "log_every", "progress",
                      "keep_adapters_every", "fsdp", "cpu_offload", "adapter_format", "eval_every", "keep_best",
                      "report_to", "progress_seconds", "chunked_loss", "loss_chunk_tokens", "loss_kernel"}

def _fingerprint(path: str) -> str | None:
    """What identifies a model or data file wherever it lies: the data file's bytes; a model
    folder's config.json and the names and sizes of its weight files; a model file's size and
    first and last MiB. None if `path` is not there."""
    p = Path(path)
    digest = hashlib.sha256()
    if p.is_dir():
        config = p / "config.json"
        digest.update(config.read_bytes() if config.is_file() else b"")
        for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.index.json")):
            digest.update(f"{f.name}:{f.stat().st_size};".encode())
    elif p.is_file():
        size = p.stat().st_size
        with open(p, "rb") as f:
            if size <= 8 << 20:
                digest.update(f.read())
            else:
                digest.update(f"{size};".encode() + f.read(1 << 20))
                f.seek(size - (1 << 20))
                digest.update(f.read())
    else:
        return None
    return digest.hexdigest()


def fingerprints(cfg: TrainConfig) -> dict[str, str | None]:
    paths = {"model": cfg.model, "data": cfg.data, "val_data": cfg.val_data, "chat_template": cfg.chat_template}
    return {name: _fingerprint(path) for name, path in paths.items() if path}


def _check_same_run(out: Path, cfg: TrainConfig) -> None:
    """Raise unless `cfg` continues the run in `out`: every setting that shapes the run must be
    as saved; `out` may differ (a moved folder), `model`/`data` too if their content is the same."""
    path = out / "train_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err}); the run's settings are unknown, so it cannot be "
                         "resumed") from err
    now = cfg.absolute_paths().to_dict()  # as saved: relative paths are the folder's the command runs in
    defaults = TrainConfig(model="", data="", out="").to_dict()  # fields newer than the saved run
    changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k, defaults[k]) != now[k])
    moved = [k for k in ("model", "data", "val_data", "chat_template") if k in changed]
    if moved:
        before, after = saved.get("fingerprints", {}), fingerprints(cfg)
        changed = [k for k in changed if not (k in moved and before.get(k) and before.get(k) == after[k])]
    if changed:
        raise ValueError(f"--resume with different settings than the run in {out}: "
                         + ", ".join(f"{k}: {saved.get(k, defaults[k])!r} -> {now[k]!r}" for k in changed)
                         + "; resume with the run's settings, or start a new run in another --out")


def check_run(cfg: TrainConfig) -> Path | None:
    """Every check of `cfg` that needs no model, made before anything slow or anything written:
    `out` is a writable folder (or can be made one), it holds no checkpoint unless `resume` (and one
    that can be read and belongs to this run if `resume`), the model path exists. Returns the
    checkpoint to resume, or None."""

    out = Path(cfg.out)
    check_output_dir(out, "--out")
    existing = find_checkpoint(out) if out.is_dir() else None
    if existing and not cfg.resume:
        raise FileExistsError(f"{out} already holds a checkpoint ({existing}); pass --resume to continue it "
                              "or choose another --out")
    if cfg.resume:
        if existing is None:
            started = (out / "train_config.json").is_file()
            raise ValueError(f"--resume: {out} holds no checkpoint to continue"
                             + (" (the run there stopped before its first checkpoint)" if started else "")
                             + "; run the same command without --resume to start it")
        _check_same_run(out, cfg)
        check_checkpoint(existing)
    check_model_path(cfg.model)
    return existing
