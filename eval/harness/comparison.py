"""Methods compared across seeds: means and spreads, every pair of methods by a paired t-test over
seeds (same seed: same data order), and the Markdown tables of the report."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import scipy.stats


def _mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def paired_t(d: list[float]) -> float | None:
    """The paired t statistic `mean / (std / sqrt(n))` of per-seed differences; None with fewer than
    2 of them or no spread."""
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return statistics.fmean(d) / (sd / len(d) ** 0.5) if sd > 0 else None


def label(row: dict) -> str:
    """A row's method, with its rank and learning rate in a sweep (`qlora-r8-lr0.0003`)."""
    return row.get("variant", row["method"])


def summarize(rows: list[dict]) -> dict:
    out = {}
    for method in dict.fromkeys(label(r) for r in rows):
        mine = [r for r in rows if label(r) == method]
        s = {k: _mean_std([r[k] for r in mine]) for k in
             ("trainable_params", "peak_rss_growth_mib", "median_step_s", "tokens_per_s", "final_train_loss")}
        for task in mine[0]["tasks"]:
            for k in ("acc_loglik", "acc_generate", "answer_nll", "answer_ppl", "reward_accuracy", "reward_margin"):
                if k in mine[0]["tasks"][task]:
                    s[f"{task}/{k}"] = _mean_std([r["tasks"][task][k] for r in mine])
        out[method] = s
    return out


def separation(rows: list[dict], task: str, metric: str = "answer_nll") -> list[dict]:
    """Every pair of methods compared on `task`/`metric`, paired by seed (same seed: same data order).

    For the per-seed differences `d = a − b`: mean, sample std, and the paired t statistic
    `mean / (std / sqrt(n))`; `separated` is `|t|` above the two-sided 95% Student-t quantile with
    `n − 1` degrees of freedom, i.e. the difference is larger than seed noise explains. Pairs with
    fewer than 2 common seeds get `separated = None`."""
    values: dict[str, dict[int, float]] = {}
    for r in rows:
        v = r["tasks"].get(task, {}).get(metric)
        if v is not None:
            values.setdefault(label(r), {})[r["seed"]] = v
    out = []
    names = list(values)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            seeds = sorted(set(values[a]) & set(values[b]))
            d = [values[a][k] - values[b][k] for k in seeds]
            entry = {"a": a, "b": b, "task": task, "metric": metric, "n": len(d),
                     "mean_diff": statistics.fmean(d) if d else None, "std": None, "t": None, "separated": None}
            if len(d) >= 2:
                sd = statistics.stdev(d)
                entry["std"] = sd
                entry["t"] = math.inf if sd == 0 and entry["mean_diff"] != 0 else (
                    0.0 if sd == 0 else entry["mean_diff"] / (sd / math.sqrt(len(d))))
                entry["separated"] = bool(abs(entry["t"]) > scipy.stats.t.ppf(0.975, len(d) - 1))
            out.append(entry)
    return out


def separation_markdown(pairs: list[dict]) -> str:
    lines = ["| a | b | mean(a − b) | std over seeds | paired t | seeds | beyond seed noise (95%) |",
             "|---|---|---|---|---|---|---|"]
    for p in pairs:
        fmt = lambda v, d=4: "-" if v is None else f"{v:+.{d}f}"  # noqa: E731
        sep = "-" if p["separated"] is None else ("yes" if p["separated"] else "no")
        lines.append(f"| {p['a']} | {p['b']} | {fmt(p['mean_diff'])} | {fmt(p['std'])} | {fmt(p['t'], 1)} | "
                     f"{p['n']} | {sep} |")
    return "\n".join(lines) + "\n"


def interval(stat: dict | None, digits: int = 3) -> str:
    """`mean [low, high]`: the 95% Student-t interval of the mean over seeds (the mean alone for one seed)."""
    if not stat or stat["mean"] is None:
        return "-"
    if stat["n"] < 2:
        return f"{stat['mean']:.{digits}f}"
    half = scipy.stats.t.ppf(0.975, stat["n"] - 1) * stat["std"] / math.sqrt(stat["n"])
    return f"{stat['mean']:.{digits}f} [{stat['mean'] - half:.{digits}f}, {stat['mean'] + half:.{digits}f}]"


def markdown(summary: dict, tasks: list[str]) -> str:
    def fmt(stat, digits=3):
        if stat["mean"] is None:
            return "-"
        return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")
    head = ["method", "trainable", "peak RSS growth (MiB)", "step (s)", "tok/s", "final loss"]
    pairs = any("pairs/reward_accuracy" in s for s in summary.values())
    if pairs:  # a preference comparison: the held-out pairs' reward accuracy and margin (mean, 95% interval)
        head += ["held-out reward accuracy", "reward margin"]
    for t in tasks:
        head += [f"{t} acc (LL)", f"{t} acc (gen)", f"{t} answer NLL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary.items():
        cells = [method, f"{s['trainable_params']['mean']:,.0f}", fmt(s["peak_rss_growth_mib"], 0),
                 fmt(s["median_step_s"], 2), fmt(s["tokens_per_s"], 0), fmt(s["final_train_loss"])]
        if pairs:
            cells += [interval(s.get("pairs/reward_accuracy")), interval(s.get("pairs/reward_margin"))]
        for t in tasks:
            cells += [fmt(s.get(f"{t}/acc_loglik", {"mean": None})), fmt(s.get(f"{t}/acc_generate", {"mean": None})),
                      fmt(s.get(f"{t}/answer_nll", {"mean": None}))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_losses(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib  # optional: plots only
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional: plots only
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], label=f"{r['method']} s{r['seed']}", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def curve_markdown(rows: list[dict], task: str) -> str:
    """The learning curves (`--eval-every`) of `task`: per method and step, the mean ± spread over
    seeds of the accuracy and the answer NLL, and for each pair of methods the mean per-seed
    difference of the accuracy with the paired t statistic. Empty without curves."""
    by_method: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        for point in r.get("curve", []):
            if task in point:
                by_method.setdefault(label(r), {}).setdefault(point["step"], []).append(
                    {"seed": r["seed"], **point[task]})
    if not by_method:
        return ""
    steps = sorted({s for m in by_method.values() for s in m})
    def fmt(stat):
        if stat["mean"] is None:
            return "-"
        return f"{stat['mean']:.3f}" + (f" ± {stat['std']:.3f}" if stat["n"] > 1 else "")
    methods = list(by_method)
    head = ["step"] + [f"{m} acc" for m in methods] + [f"{m} answer NLL" for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in steps:
        cells = [str(step)]
        for key in ("acc_loglik", "answer_nll"):
            cells += [fmt(_mean_std([p[key] for p in by_method[m].get(step, []) if key in p])) for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            lines += ["", f"{a} − {b}, accuracy, paired by seed:", "",
                      "| step | mean difference | per seed | paired t |", "|---|---|---|---|"]
            for step in steps:
                pa = {p["seed"]: p["acc_loglik"] for p in by_method[a].get(step, [])}
                pb = {p["seed"]: p["acc_loglik"] for p in by_method[b].get(step, [])}
                d = [pa[s] - pb[s] for s in sorted(set(pa) & set(pb))]
                if not d:
                    continue
                t = paired_t(d)
                lines.append(f"| {step} | {statistics.fmean(d):+.3f} | {', '.join(f'{x:+.2f}' for x in d)} | "
                             f"{'-' if t is None else f'{t:+.1f}'} |")
    return "\n".join(lines) + "\n"
