"""Drift of an exported model from the adapted NF4 model it came from, beside the floor.

The reference is the model as trained: the in-memory adapted NF4 model (qdora's layers, fp32
compute on CPU). The export is reloaded the way a user would load it (plain transformers; a
bitsandbytes 4-bit model; transformers' GGUF loader) and both are run on the same token ids: a
probe text and a small held-out set (the first records of the vendored ARC-Easy and GSM8K test
slices, which training never sees). The same figures for the unadapted base, exported the same way
and compared with the unadapted NF4 model, are the floor: what the format alone costs.

A third line says how far the adapters move the NF4 model (the unadapted model against the adapted
one): an export whose drift approaches it has lost the adapter (re-quantizing a merged model
snaps a small update back onto the base's quantization grid).

Figures per group of texts: max and mean |Δlogit| over every position and vocabulary entry; the
total-variation distance between the next-token distributions (mean and max over positions);
the share of positions whose argmax agrees; the perplexity of the texts under the reference and
under the export.

The reloaded export computes in fp32 (a 4-bit model's `compute_dtype` is set to fp32 for the
check, and bitsandbytes' CPU repacking is turned off): the figures measure the exported weights,
not a runtime's arithmetic.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn

from qdora.core.layer import QDoRALinear
from qdora.core.nf4 import keep_standard_layout
from qdora.core.safetensors_io import write_text_atomic
from qdora.data.examples import DEMO_DATA, load_records

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Fine-tuning changes what a model says next."
MAX_TOKENS = 256


def held_out_texts(n: int = 8) -> list[str]:
    """`n` texts the adapters were not trained on: prompt and reference answer of the first records
    of the vendored ARC-Easy and GSM8K test slices, alternately."""
    arc = load_records(DEMO_DATA / "arc_easy_test.json")
    gsm = load_records(DEMO_DATA / "gsm8k_test.jsonl")
    texts = []
    for i in range(n):
        r = (arc if i % 2 == 0 else gsm)[i // 2]
        texts.append(r.prompt + r.response)
    return texts


class _BaseOnly(nn.Module):
    """An adapted layer's base alone: its dequantized weight (qdora's own row-block path, not
    bitsandbytes' forward), in fp32, built at each call and freed after it."""

    def __init__(self, layer: QDoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.layer.base_layer.bias
        w = self.layer.dequantized_base(torch.float32)
        return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The model without its adapters: every `QDoRALinear` computes `x·W0ᵀ + bias` alone for the
    duration of the block."""
    swapped = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QDoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _BaseOnly(mod))
            swapped.append((parent, child, mod))
    try:
        yield model
    finally:
        for parent, child, mod in swapped:
            setattr(parent, child, mod)


class _Stats:
    def __init__(self, texts: int):
        self.texts = texts
        self.tokens = self.positions = self.agree = 0
        self.max_abs = self.ref_max_abs = self.sum_abs = self.tv_sum = self.tv_max = 0.0
        self.nll_ref = self.nll = 0.0
        self.values = 0

    def add(self, ref: torch.Tensor, other: torch.Tensor, ids: torch.Tensor) -> None:
        """`ref`, `other`: (positions, vocab) fp32 logits for token ids `ids` (positions,)."""
        for what, logits in (("the reference", ref), ("the export", other)):
            if not torch.isfinite(logits).all():
                raise ValueError(f"the logits of {what} are not finite; the comparison is meaningless")
        diff = (other - ref).abs()
        self.max_abs = max(self.max_abs, diff.max().item())
        self.ref_max_abs = max(self.ref_max_abs, ref.abs().max().item())
        self.sum_abs += diff.double().sum().item()
        self.values += diff.numel()
        p, q = ref.log_softmax(-1), other.log_softmax(-1)
        tv = 0.5 * (p.exp() - q.exp()).abs().sum(-1)
        self.tv_sum += tv.double().sum().item()
        self.tv_max = max(self.tv_max, tv.max().item())
        self.agree += int((ref.argmax(-1) == other.argmax(-1)).sum())
        self.positions += ref.shape[0]
        self.tokens += ids.numel()
        target = ids[1:]
        self.nll_ref -= p[:-1].gather(-1, target[:, None]).double().sum().item()
        self.nll -= q[:-1].gather(-1, target[:, None]).double().sum().item()

    def result(self) -> dict:
        predicted = self.tokens - self.texts
        return {"texts": self.texts, "tokens": self.tokens, "max_abs": self.max_abs,
                "max_rel": self.max_abs / self.ref_max_abs,
                "mean_abs": self.sum_abs / self.values, "tv_mean": self.tv_sum / self.positions,
                "tv_max": self.tv_max, "argmax_agree": self.agree / self.positions,
                "ppl_ref": math.exp(self.nll_ref / predicted), "ppl": math.exp(self.nll / predicted)}


@torch.no_grad()
def compare(reference: nn.Module, other: nn.Module, groups: dict[str, list[torch.Tensor]]) -> dict[str, dict]:
    """Figures for `other` against `reference` for each group of token-id sequences."""
    out = {}
    dev_ref = next(reference.parameters()).device
    dev_other = next(other.parameters()).device
    for name, seqs in groups.items():
        stats = _Stats(len(seqs))
        for ids in seqs:
            a = reference(ids[None].to(dev_ref)).logits[0].float().cpu()
            b = other(ids[None].to(dev_other)).logits[0].float().cpu()
            stats.add(a, b, ids)
        out[name] = stats.result()
    return out


@torch.no_grad()
def adapter_effect(model: nn.Module, groups: dict[str, list[torch.Tensor]]) -> dict[str, dict]:
    """How far the adapters move the NF4 model: the same figures for the unadapted model against the
    adapted one (an export whose drift is of this size has lost the adapter)."""
    out = {}
    device = next(model.parameters()).device
    for name, seqs in groups.items():
        stats = _Stats(len(seqs))
        for ids in seqs:
            a = model(ids[None].to(device)).logits[0].float().cpu()
            with adapters_disabled(model):
                b = model(ids[None].to(device)).logits[0].float().cpu()
            stats.add(a, b, ids)
        out[name] = stats.result()
    return out


def token_groups(tokenizer, texts: list[str] | None = None, max_tokens: int = MAX_TOKENS) -> dict:
    """{'probe': [ids], 'held-out': [ids, ...]}: each text tokenized, cut at `max_tokens`."""
    texts = held_out_texts() if texts is None else texts

    def ids(text):
        return tokenizer(text, return_tensors="pt").input_ids[0, :max_tokens]
    return {"probe": [ids(PROBE_TEXT)], "held-out": [ids(t) for t in texts]}


def load_export(path: str | os.PathLike, fmt: str) -> nn.Module:
    """Reload an export as a user would, in eval mode, computing in fp32 (see the module docstring)."""
    from transformers import AutoModelForCausalLM  # heavy, used here only
    path = Path(path)
    if fmt == "gguf":
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise ValueError(f"{path}: expected one .gguf file, found {len(files)}")
        return AutoModelForCausalLM.from_pretrained(path, gguf_file=files[0].name, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if fmt == "nf4":
        keep_standard_layout(model)
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                mod.compute_dtype = torch.float32
    return model.eval()


def drift_report(model: nn.Module, tokenizer, exported: str | os.PathLike, fmt: str,
                 export_base: Callable[[Path], Path] | None = None, texts: list[str] | None = None,
                 load: Callable[[Path, str], nn.Module] = load_export) -> dict:
    """Compare the export in `exported` (format `fmt`) with the adapted `model`; with `export_base`
    (writes the unadapted model the same way into the folder it is given, returns the path to
    load), also the floor: that export against the unadapted NF4 model. The floor's export is
    written into a temporary folder beside `exported` and removed."""
    exported = Path(exported)
    groups = token_groups(tokenizer, texts)
    was_training = model.training
    model.eval()
    try:
        report = {"format": fmt, "adapted": compare(model, load(exported, fmt), groups),
                  "adapter": adapter_effect(model, groups)}
        if export_base is not None:
            with tempfile.TemporaryDirectory(dir=exported.resolve().parent, prefix=f".{exported.name}.base-") as d:
                path = export_base(Path(d) / "base")
                other = load(path, fmt)
                with adapters_disabled(model):
                    report["base"] = compare(model, other, groups)
                del other
    finally:
        model.train(was_training)
    return report


COLUMNS = ("max |Δlogit|", "mean |Δlogit|", "TV mean", "TV max", "argmax agree", "ppl ref → export")


def format_table(report: dict, label: str) -> str:
    """The report as a text table: one line per (model, group of texts)."""
    rows = [("model", "texts (tokens)") + COLUMNS]
    floor = "base → original checkpoint (floor)" if "original" in report else f"base → {label} (floor)"
    for who, what in (("adapted", f"adapted → {label}"), ("original", f"adapted → {label} on the original base"),
                      ("base", floor), ("adapter", "adapted → base (the adapter's effect)")):
        for group, s in report.get(who, {}).items():
            rows.append((what, f"{group} {s['texts']} ({s['tokens']})", f"{s['max_abs']:.3e}", f"{s['mean_abs']:.3e}",
                         f"{s['tv_mean']:.2e}", f"{s['tv_max']:.2e}", f"{100 * s['argmax_agree']:.1f}%",
                         f"{s['ppl_ref']:.3f} → {s['ppl']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


MIN_EFFECT = 1e-6
"""Below this held-out TV distance the adapter is taken to have no effect to judge drift against."""


FIX = ("merge to a wider type (--dtype float16 or float32, or --quant q8_0) or serve the base with the "
       "adapter")


def verdict(report: dict, max_drift: float, fix: str = FIX) -> tuple[bool | None, str]:
    """(passed, line): the export's drift from the adapted model (held-out texts, mean total-variation
    distance of next-token distributions) as a fraction of the adapter's own effect (adapted vs
    unadapted); it passes at most `max_drift`. None when the adapter has no effect to compare with."""
    group = "held-out" if "held-out" in report["adapted"] else next(iter(report["adapted"]))
    drift, effect = report["adapted"][group]["tv_mean"], report["adapter"][group]["tv_mean"]
    if not effect > MIN_EFFECT:
        return None, (f"verdict: none: the adapter does not change the model on the {group} texts (TV {effect:.1e}), "
                      f"so there is no effect to judge the export's drift (TV {drift:.2e}) against")
    ratio = drift / effect
    figures = (f"the export drifts {ratio:.3g}× the adapter's own effect ({group} texts, mean TV {drift:.2e} "
               f"against {effect:.2e}; --max-drift {max_drift:g})")
    if ratio <= max_drift:
        return True, f"verdict: passed: {figures}"
    return False, f"verdict: FAILED: {figures}; the export loses much of what the adapter learned: {fix}"


def write_json(report: dict, path: str | os.PathLike) -> None:
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
