"""The runs one `qdora eval` invocation makes, and the report of a sweep.

Without a sweep every method runs once per seed (`<method>-seed<k>`). A rank sweep (`--r 2,4,8`)
or a learning-rate sweep (`--lr 1e-4,3e-4`) runs every method at every setting of the grid
(`<method>-r<r>-lr<lr>-seed<k>`), and its report compares the methods setting by setting, on the
same held-out items: by seed when there are several (paired t), item by item when there is one
(exact McNemar test and a bootstrap interval for the accuracy, a bootstrap interval for the
answer NLL).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from qdora.data.scoring import paired_accuracy, paired_nll
from qdora.eval.harness.comparison import paired_t


@dataclass(frozen=True)
class RunKey:
    method: str
    seed: int
    r: int | None = None
    """The rank of a sweep's run (None: not a sweep, the config's `r`)."""
    lr: float | None = None
    """The learning rate of a sweep's run (None: not a sweep, the config's rate for the method)."""

    @property
    def name(self) -> str:
        if self.r is None and self.lr is None:
            return f"{self.method}-seed{self.seed}"
        return f"{self.method}-r{self.r}-lr{self.lr:g}-seed{self.seed}"


def plan(methods: tuple[str, ...], seeds: int, r: int, lr: float, r_sweep: tuple[int, ...] = (),
         lr_sweep: tuple[float, ...] = ()) -> list[RunKey]:
    """Every run, seed by seed (so that an interrupted invocation has whole seeds first), then
    setting by setting, then method by method."""
    if not r_sweep and not lr_sweep:
        return [RunKey(m, s) for s in range(seeds) for m in methods]
    return [RunKey(m, s, rank, rate) for s in range(seeds) for rank in (r_sweep or (r,))
            for rate in (lr_sweep or (lr,)) for m in methods]


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def compare(a: list[dict], b: list[dict], task: str) -> dict:
    """Method `b` against method `a` at one setting on `task` (rows of the same seeds): the accuracy
    and answer-NLL differences `b − a` with their test. Several common seeds: the per-seed mean
    difference and paired t; one seed: the item-level comparison (`paired_accuracy`, `paired_nll`)."""
    by_seed_a, by_seed_b = {r["seed"]: r["tasks"][task] for r in a}, {r["seed"]: r["tasks"][task] for r in b}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    if not seeds:
        return {"seeds": 0}
    if len(seeds) > 1:
        out = {"seeds": len(seeds), "test": "paired t over seeds"}
        for key in ("acc_loglik", "answer_nll"):
            d = [by_seed_b[s][key] - by_seed_a[s][key] for s in seeds]
            out[key] = {"diff": statistics.fmean(d), "t": paired_t(d)}
        return out
    ta, tb = by_seed_a[seeds[0]], by_seed_b[seeds[0]]
    out = {"seeds": 1, "test": "items of seed " + str(seeds[0])}
    if "predictions" in ta and "answers" in ta:
        right_a = [p == g for p, g in zip(ta["predictions"], ta["answers"])]
        right_b = [p == g for p, g in zip(tb["predictions"], tb["answers"])]
        acc = paired_accuracy(right_a, right_b)
        out["acc_loglik"] = {"diff": acc.difference, "ci95": acc.ci95, "p": acc.p_value,
                             "improved": acc.improved, "worsened": acc.worsened}
    if "answer_logp" in ta:
        nll = paired_nll(ta["answer_logp"], ta["answer_tokens"], tb["answer_logp"], tb["answer_tokens"])
        out["answer_nll"] = {"diff": nll.difference, "ci95": nll.ci95}
    return out


def _cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    text = f"{entry['diff']:+.4f}"
    if "ci95" in entry:
        text += f" [{entry['ci95'][0]:+.4f}, {entry['ci95'][1]:+.4f}]"
    if entry.get("t") is not None:
        text += f" (t {entry['t']:+.1f})"
    if "p" in entry:
        text += f" (+{entry['improved']}/−{entry['worsened']} items, McNemar p {entry['p']:.2f})"
    return text


def sweep_markdown(rows: list[dict], task: str, methods: list[str]) -> str:
    """The sweep's report on `task`: per setting (rank, learning rate) each method's accuracy and
    answer NLL at the end (mean ± spread over seeds), and for each later method against the first
    the difference with its test; then, for a rank sweep, each DoRA-family method at rank r against
    the first method at rank 2r (the DoRA paper's DoRA† claim: half the rank, no worse)."""
    settings = sorted({(r["r_setting"], r["lr"]) for r in rows})
    at = {(s, m): [r for r in rows if (r["r_setting"], r["lr"]) == s and r["method"] == m]
          for s in settings for m in methods}
    head = ["r", "lr"] + [f"{m} acc" for m in methods] + [f"{m} answer NLL" for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in settings:
        cells = [str(s[0]), f"{s[1]:g}"]
        for key in ("acc_loglik", "answer_nll"):
            cells += [_fmt([r["tasks"][task][key] for r in at[s, m]]) for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    first = methods[0]
    pairs = [(s, first, s, m) for m in methods[1:] for s in settings]
    ranks = {s[0]: s for s in settings}
    pairs += [(ranks[2 * s[0]], first, s, m) for m in methods[1:] if "dora" in m
              for s in settings if 2 * s[0] in ranks and ranks[2 * s[0]][1] == s[1]]
    if pairs:
        lines += ["", f"Differences b − a on {task} (accuracy: higher is better for b; answer NLL: lower is "
                  "better for b):", "",
                  "| a | b | accuracy b − a | answer NLL b − a | test |", "|---|---|---|---|---|"]
        for sa, ma, sb, mb in pairs:
            c = compare(at[sa, ma], at[sb, mb], task)
            if not c["seeds"]:
                continue
            lines.append(f"| {ma} r={sa[0]} lr={sa[1]:g} | {mb} r={sb[0]} lr={sb[1]:g} | "
                         f"{_cell(c.get('acc_loglik'))} | {_cell(c.get('answer_nll'))} | {c['test']} |")
    return "\n".join(lines) + "\n"
