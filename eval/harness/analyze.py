"""`qdora analyze`: magnitude and direction changes of fine-tuned weights (DoRA paper, §2.2, Fig. 2).

For a weight `W` of shape `(out, in)` the DoRA magnitude runs over the output rows `k`:

    ΔM = mean_k | ||W_t,k|| − ||W_0,k|| |          ΔD = mean_k ( 1 − cos(W_t,k, W_0,k) )

per module and layer, for each fine-tuned checkpoint: a full transformers checkpoint, or an adapter
(qdora or PEFT format), whose effective weight `(m/n)·(W0 + s·B·A)` is compared with the base it was
trained on (the dequantized NF4 weight for q-methods). The paper's finding: LoRA's ΔM and ΔD move
together (positive slope), full fine-tuning and DoRA's do not (negative slope).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
from pathlib import Path

import torch

from qdora.core.layer import QDoRALinear
from qdora.core.safetensors_io import write_text_atomic
from qdora.export.merge import merged_weight
from qdora.models.adapter_io import adapter_config, load_adapter, read_adapter
from qdora.models.loading import CheckpointReader, load_model
from qdora.options import Parser

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def delta_m_d(W0: torch.Tensor, Wt: torch.Tensor, eps: float = 1e-12) -> tuple[float, float]:
    """(ΔM, ΔD) of `Wt` against `W0`, rows as the magnitude axis, in fp64."""
    if W0.shape != Wt.shape:
        raise ValueError(f"weight shapes differ: {tuple(W0.shape)} vs {tuple(Wt.shape)}")
    W0, Wt = W0.double(), Wt.double()
    n0, nt = W0.norm(dim=1), Wt.norm(dim=1)
    dm = (nt - n0).abs().mean().item()
    cos = (W0 * Wt).sum(1) / (n0 * nt).clamp_min(eps)
    return dm, (1 - cos).mean().item()


def _module_of(name: str) -> tuple[str, int | None]:
    match = _LAYER.search(name + ".")
    return name.rsplit(".", 1)[-1], int(match.group(1)) if match else None


def weight_pairs(base: str | os.PathLike, tuned: str | os.PathLike, modules: tuple[str, ...]):
    """Yield (module name, W0, Wt) for the linear weights of `modules` (leaf names)."""

    tuned = Path(tuned)
    if (tuned / "config.json").is_file():  # a full checkpoint: compare with the original base weights
        a, b = CheckpointReader(base), CheckpointReader(tuned)
        for key in b.keys():
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and _module_of(name)[0] in modules and key in a.file_of:
                yield name, a.get(key).float(), b.get(key).float()
        return

    fmt, meta, found = read_adapter(tuned)
    cfg = adapter_config(fmt, meta, found, quantized=True)
    model, _ = load_model(base, method=cfg.method, cfg=cfg, add=False, progress=False)
    load_adapter(model, tuned, verbose=False)
    for name, layer in model.named_modules():
        if isinstance(layer, QDoRALinear) and _module_of(name)[0] in modules:
            yield name, layer.dequantized_base(torch.float32), merged_weight(layer, torch.float32)


def analyze(base, tuned: list[tuple[str, str]], modules=("q_proj", "v_proj")) -> list[dict]:
    """Rows {checkpoint, module, layer, name, delta_m, delta_d} for each (label, path) in `tuned`."""
    rows = []
    for label, path in tuned:
        for name, W0, Wt in weight_pairs(base, path, tuple(modules)):
            module, layer = _module_of(name)
            dm, dd = delta_m_d(W0, Wt)
            rows.append({"checkpoint": label, "module": module, "layer": layer, "name": name,
                         "delta_m": dm, "delta_d": dd})
    return rows


def _slope_corr(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares slopes and Pearson correlations along the last dimension."""
    xc, yc = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    sxy = (xc * yc).sum(-1)
    return sxy / (xc * xc).sum(-1), sxy / (xc.norm(dim=-1) * yc.norm(dim=-1))


def fit(rows: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """Least-squares slope of ΔM on ΔD and the Pearson correlation, each with a 95% percentile
    bootstrap interval (`slope_ci95`, `correlation_ci95`) that resamples the weights, a (module,
    layer) pair with all its checkpoints at a time: the points of one weight across checkpoints are
    not independent, the weights are the units."""
    x = torch.tensor([r["delta_d"] for r in rows], dtype=torch.float64)
    y = torch.tensor([r["delta_m"] for r in rows], dtype=torch.float64)
    units = list(dict.fromkeys((r["module"], r["layer"]) for r in rows))
    out = {"points": len(rows), "units": len(units), "slope": math.nan, "correlation": math.nan,
           "slope_ci95": (math.nan, math.nan), "correlation_ci95": (math.nan, math.nan)}
    if len(rows) < 2 or x.std() == 0 or y.std() == 0:
        return out
    slope, corr = _slope_corr(x, y)
    out["slope"], out["correlation"] = slope.item(), corr.item()
    members = [[i for i, r in enumerate(rows) if (r["module"], r["layer"]) == u] for u in units]
    if len(units) < 2 or len({len(m) for m in members}) != 1:  # resampling needs equal-sized units
        return out
    index = torch.tensor(members)  # (units, checkpoints)
    g = torch.Generator().manual_seed(seed)
    picks = index[torch.randint(len(units), (resamples, len(units)), generator=g)].flatten(1)
    slopes, corrs = _slope_corr(x[picks], y[picks])
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    ok = slopes.isfinite() & corrs.isfinite()  # a resample of identical units has no spread
    out["slope_ci95"] = tuple(torch.quantile(slopes[ok], q).tolist())
    out["correlation_ci95"] = tuple(torch.quantile(corrs[ok], q).tolist())
    return out


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["checkpoint", "module", "layer", "name", "delta_m", "delta_d"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _draw(ax, rows: list[dict], title: str, cmap, layers: list[int]) -> dict:
    """One ΔD-vs-ΔM panel on `ax`; returns the fit."""
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    markers = "o^sDvP*Xh<>"
    for r in rows:
        color = cmap(layers.index(r["layer"])) if r["layer"] in layers else "gray"
        ax.scatter(r["delta_d"], r["delta_m"], color=color, s=28,
                   marker=markers[checkpoints.index(r["checkpoint"]) % len(markers)])
    stats = fit(rows)
    if math.isfinite(stats["slope"]):
        xs = torch.tensor([min(r["delta_d"] for r in rows), max(r["delta_d"] for r in rows)])
        my = sum(r["delta_m"] for r in rows) / len(rows)
        mx = sum(r["delta_d"] for r in rows) / len(rows)
        ax.plot(xs, my + stats["slope"] * (xs - mx), "k--", lw=1)
    for i, c in enumerate(checkpoints):
        ax.scatter([], [], color="black", marker=markers[i % len(markers)], label=c)
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("ΔD: mean over rows of 1 − cos")
    ax.set_ylabel("ΔM: mean over rows of |Δ‖row‖|")
    ax.set_title(f"{title}  slope {stats['slope']:.3g}, r = {stats['correlation']:.2f}".strip(), fontsize=9)
    return stats


def plot(rows: list[dict], path: str | os.PathLike, title: str = "") -> bool:
    """ΔD (x) vs ΔM (y): one colour per layer, one marker per checkpoint, with the fitted line.
    Returns False (and writes nothing) when matplotlib is not installed."""
    return plot_panels({title: rows}, path)


def plot_panels(groups: dict[str, list[dict]], path: str | os.PathLike) -> bool:
    """One `plot` panel per group (e.g. per method, as the paper's Fig. 2), side by side, sharing the
    layer colour scale. Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib  # optional: plots only
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional: plots only
    except ImportError:
        return False
    groups = {k: v for k, v in groups.items() if v}
    layers = sorted({r["layer"] for rows in groups.values() for r in rows if r["layer"] is not None})
    cmap = plt.get_cmap("viridis", max(2, len(layers)))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups) + 1, 4.5), squeeze=False,
                             layout="constrained")  # room for every panel's labels and offsets
    for ax, (title, rows) in zip(axes[0], groups.items()):
        _draw(ax, rows, title, cmap, layers)
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(min(layers or [0]), max(layers or [1]))),
                 ax=list(axes[0]), label="layer")
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return True


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="qdora analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base checkpoint folder the tuned weights started from")
    p.add_argument("--tuned", required=True, action="append",
                   help="a full checkpoint folder or an adapter folder; repeat for several (e.g. intermediate "
                        "checkpoints); LABEL=PATH names it in the plot")
    p.add_argument("--modules", default="q_proj,v_proj", help="leaf module names (default: %(default)s)")
    p.add_argument("--out", required=True, help="folder for delta_md.csv and delta_md.png")
    args = p.parse_args(argv)
    tuned = [(t.split("=", 1)[0], t.split("=", 1)[1]) if "=" in t else (Path(t).name, t) for t in args.tuned]
    rows = analyze(args.base, tuned, tuple(m.strip() for m in args.modules.split(",") if m.strip()))
    if not rows:
        p.error(f"no weights of modules {args.modules} found in {[t for _, t in tuned]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "delta_md.csv")
    stats = fit(rows)
    drew = plot(rows, out / "delta_md.png", title=", ".join(label for label, _ in tuned))
    (s0, s1), (c0, c1) = stats["slope_ci95"], stats["correlation_ci95"]
    print(f"{len(rows)} points ({stats['units']} weights): ΔM on ΔD slope {stats['slope']:.4g} [{s0:.4g}, {s1:.4g}], "
          f"correlation {stats['correlation']:.3f} [{c0:.3f}, {c1:.3f}] (95% bootstrap over the weights)")
    print(f"wrote {out / 'delta_md.csv'}" + (f" and {out / 'delta_md.png'}" if drew else
                                               " (install matplotlib for the plot)"))
    return 0
